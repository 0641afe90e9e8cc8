//! Real `nats-server` processes for cluster tests, and a raw HTTP request helper.
//!
//! Each server gets its own directory with a generated config file, listens on loopback only
//! with ports the server picks itself (`-1`), and is killed on Drop. A missing `nats-server`
//! fails the test with the install command; it never skips.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::WAIT;

/// How to get the binary when it is missing.
pub const INSTALL_HINT: &str = "nats-server is required by the cluster tests and was not found on PATH: install it with `apt-get install -y nats-server` (scripts/test does this)";

/// One running (or killed) nats-server.
pub struct NatsServer {
    child: Option<Child>,
    dir: PathBuf,
    /// Config text without the listen lines (kept for restarts).
    body: String,
    /// Client port.
    pub port: u16,
    /// HTTP monitoring port.
    pub monitor_port: u16,
    /// Gateway port, when the config has a gateway block.
    pub gateway_port: Option<u16>,
    /// The listen ports the config names (`-1`: the server picked), kept for reloads.
    listen: (String, String),
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl NatsServer {
    /// Starts a server whose config is `body` (server_name, authorization, gateway block, …)
    /// plus loopback listen lines with server-chosen ports.
    pub fn start(body: &str) -> NatsServer {
        match Command::new("nats-server").arg("--version").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!("{INSTALL_HINT} (`nats-server --version` failed: {out:?})"),
            Err(e) => panic!("{INSTALL_HINT} ({e})"),
        }
        let dir = std::env::temp_dir().join(format!(
            "roomcast-nats-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = NatsServer {
            child: None,
            dir,
            body: body.to_owned(),
            port: 0,
            monitor_port: 0,
            gateway_port: None,
            listen: Default::default(),
        };
        server.spawn(None);
        server
    }

    /// Writes the config file for these client and monitoring ports (`-1`: the server picks).
    fn write_config(&self, client: &str, monitor: &str) -> PathBuf {
        let body = match self.gateway_port {
            // A restarted server keeps its gateway port, so its peers find it again.
            Some(port) => self
                .body
                .replace("127.0.0.1:-1", &format!("127.0.0.1:{port}")),
            None => self.body.clone(),
        };
        // JetStream on (room history), its store kept across restarts of this server.
        let store = self.dir.join("jetstream");
        let jetstream = if body.contains("jetstream") {
            String::new()
        } else {
            format!(
                "jetstream {{ store_dir: {:?} }}\n",
                store.display().to_string()
            )
        };
        let config =
            format!("listen: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\n{jetstream}{body}\n");
        let conf = self.dir.join("nats.conf");
        std::fs::write(&conf, config).unwrap();
        conf
    }

    /// Writes the config and starts the process; `ports` fixes the client and monitoring
    /// ports (a restart), else the server picks them.
    fn spawn(&mut self, ports: Option<(u16, u16)>) {
        let (client, monitor) = ports.map_or(("-1".to_owned(), "-1".to_owned()), |(c, m)| {
            (c.to_string(), m.to_string())
        });
        let conf = self.write_config(&client, &monitor);
        self.listen = (client, monitor);
        let log = self.dir.join("nats.log");
        let _ = std::fs::remove_file(&log);
        for entry in std::fs::read_dir(&self.dir).unwrap().flatten() {
            if entry.path().extension().is_some_and(|e| e == "ports") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&conf)
            .arg("--ports_file_dir")
            .arg(&self.dir)
            .arg("-l")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{INSTALL_HINT} ({e})"));
        let ports_file = self.dir.join(format!("nats-server_{}.ports", child.id()));
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        let ports: serde_json::Value = loop {
            let read = std::fs::read_to_string(&ports_file)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
            if let Some(ports) = read {
                break ports;
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not start; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let port_of = |key: &str| -> u16 {
            let url = ports[key][0].as_str().expect("port in the ports file");
            url.rsplit(':').next().unwrap().parse().unwrap()
        };
        self.port = port_of("nats");
        self.monitor_port = port_of("monitoring");
        if self.body.contains("gateway") && self.gateway_port.is_none() {
            // The ports file has no gateway entry: read the log line.
            let deadline = Instant::now() + WAIT;
            self.gateway_port = loop {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let port = text
                    .lines()
                    .find_map(|l| l.split("Listening for gateways connections on ").nth(1))
                    .and_then(|addr| addr.trim().rsplit(':').next()?.parse().ok());
                if port.is_some() {
                    break port;
                }
                assert!(
                    Instant::now() < deadline,
                    "no gateway port in the log: {text}"
                );
                std::thread::sleep(Duration::from_millis(20));
            };
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: clients see the connection drop at once).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn(Some((self.port, self.monitor_port)));
    }

    /// Starts the server again on the same ports with the config `body` (as in [`Self::start`]).
    pub fn restart_with(&mut self, body: &str) {
        body.clone_into(&mut self.body);
        self.restart();
    }

    /// Rewrites the config with `body` (as in [`Self::start`]) and has the running server
    /// reload it (SIGHUP).
    pub fn reload_with(&mut self, body: &str) {
        body.clone_into(&mut self.body);
        // The same listen lines: a server refuses to reload a changed listen address.
        self.write_config(&self.listen.0, &self.listen.1);
        let pid = self.child.as_ref().expect("a running server").id();
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(pid.to_string())
            .status()
            .expect("kill -HUP");
        assert!(status.success(), "kill -HUP {pid}");
    }

    /// GET on the monitoring port, parsed as JSON.
    pub async fn monitor(&self, path: &str) -> serde_json::Value {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.monitor_port));
        let (status, body) = http(addr, "GET", path, &[], b"").await;
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).expect("monitoring JSON")
    }

    /// The client connection named `name` in `/connz?subs=1`, if connected.
    pub async fn connection(&self, name: &str) -> Option<serde_json::Value> {
        let connz = self.monitor("/connz?subs=1").await;
        connz["connections"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
    }

    /// The subjects the connection named `name` subscribes to (empty if not connected).
    pub async fn subjects_of(&self, name: &str) -> Vec<String> {
        self.connection(name)
            .await
            .and_then(|c| {
                c["subscriptions_list"].as_array().map(|subs| {
                    subs.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
            })
            .unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One HTTP/1.1 request (`Connection: close`); returns (status, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    super::http_response(stream).await
}

/// `POST /api/publish` of the JSON `body` with the backend key `key`; returns (status, body).
pub async fn api_publish(addr: SocketAddr, key: &str, body: &str) -> (u16, String) {
    http(
        addr,
        "POST",
        "/api/publish",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &format!("Bearer {key}")),
        ],
        body.as_bytes(),
    )
    .await
}

/// A TCP proxy on 127.0.0.1 port 0 that forwards to `target` and holds every chunk going
/// *to* the target for `delay` (replies pass at once): a slow link from one node to NATS.
/// Lives as long as the test's runtime.
pub async fn delaying_proxy(target: SocketAddr, delay: Duration) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(target).await else {
                continue;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            });
            // Chunks are stamped when read and written in order once due.
            let (chunks, mut due) =
                tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(1024);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match tokio::io::AsyncReadExt::read(&mut client_read, &mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let at = tokio::time::Instant::now() + delay;
                            if chunks.send((at, buf[..n].to_vec())).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
            tokio::spawn(async move {
                while let Some((at, chunk)) = due.recv().await {
                    tokio::time::sleep_until(at).await;
                    if server_write.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}
