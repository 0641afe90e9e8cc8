//! The `roomcast` binary as users run it: started as a process on 127.0.0.1 port 0 and stopped
//! with SIGTERM.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Instant,
};

use common::{
    WAIT, http_get_at,
    wt::{expect_session_code, session_at},
};
use roomcast_protocol::{ClientFrame, Code};

/// Kills the broker if a test ends early.
struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `roomcast serve` on 127.0.0.1 port 0; returns the process and its TCP address.
fn start_binary() -> (Broker, std::net::SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("ROOMCAST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("roomcast starts");
    let stderr = child.stderr.take().unwrap();
    let (found, addr) = mpsc::channel();
    // Reads the log to its end, so the broker never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening: WebSocket ws://").nth(1) {
                let _ = found.send(rest.split('/').next().unwrap().to_owned());
            }
        }
    });
    let addr = addr.recv_timeout(WAIT).expect("roomcast listens in time");
    (Broker(child), addr.parse().unwrap())
}

/// Waits for the process to exit, up to `WAIT`.
fn wait_exit(broker: &mut Broker) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = broker.0.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "roomcast did not exit in time");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_webtransport_sessions_with_shutting_down_before_exit() {
    let (mut broker, addr) = start_binary();
    let (status, body) = http_get_at(addr, "/cert-hash").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let hex = json["hex"].as_str().unwrap();
    let hash: [u8; 32] = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let url = format!("https://127.0.0.1:{}/wt", addr.port());
    // The client grants 16 bytes of stream credit and reads nothing: the broker cannot even
    // write Welcome, let alone Close, so only its connection close can tell the client.
    let connection = session_at(&url, hash, Some(16)).await.expect("session");
    let (mut send, _recv) = connection.open_bi().await.unwrap().await.unwrap();
    let hello = ClientFrame::Hello {
        version: 1,
        token: None,
    }
    .encode();
    let mut wire = Vec::new();
    roomcast_protocol::stream::write_prefix(hello.len(), &mut wire);
    wire.extend_from_slice(&hello);
    send.write_all(&wire).await.unwrap();
    let pid = broker.0.id();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let exit = tokio::task::block_in_place(|| wait_exit(&mut broker));
    assert!(exit.success(), "{exit:?}");
    // The session learns of the close (its capsule, or the connection close after it), not
    // from an idle timeout.
    expect_session_code(&connection, Code::ShuttingDown).await;
}

/// Runs the binary with `args`; returns (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(args)
        .output()
        .expect("roomcast runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh folder holding a copy of `examples/security/roomcast.toml` (without its key file,
/// which is not in the repository).
fn example_copy(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("roomcast-bin-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/security/roomcast.toml"
    );
    std::fs::copy(example, dir.join("roomcast.toml")).unwrap();
    dir
}

/// `roomcast keygen --out DIR/dev-secret.key`: the example's key file.
fn keygen_example(dir: &std::path::Path) -> std::path::PathBuf {
    let key = dir.join("dev-secret.key");
    let (ok, _, stderr) = run(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    key
}

#[test]
fn the_example_needs_a_generated_secret_and_keygen_makes_one() {
    let dir = example_copy("keygen");
    let config = dir.join("roomcast.toml");
    let key = dir.join("dev-secret.key");
    // Without its key file the example is refused, with the command that creates it.
    let (ok, _, stderr) = run(&["config", "check", config.to_str().unwrap()]);
    assert!(!ok);
    let create = format!("roomcast keygen --out {}", key.display());
    assert!(stderr.contains(&create), "{create} missing from: {stderr}");
    // `serve` refuses to start the same way.
    let serve = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("roomcast starts");
    let mut serve = Broker(serve);
    let status = wait_exit(&mut serve);
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut serve.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains(&create), "{create} missing from: {stderr}");
    // keygen writes 32 random bytes, readable by the owner only.
    keygen_example(&dir);
    let secret = std::fs::read(&key).unwrap();
    assert_eq!(secret.len(), 32);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    // It never overwrites a secret unless told to.
    let (ok, _, stderr) = run(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("pass --force"), "{stderr}");
    assert_eq!(std::fs::read(&key).unwrap(), secret);
    let (ok, _, stderr) = run(&["keygen", "--force", "--out", key.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let replaced = std::fs::read(&key).unwrap();
    assert_eq!(replaced.len(), 32);
    assert_ne!(replaced, secret);
    let (ok, _, stderr) = run(&["config", "check", config.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    // HS512 gets 64 bytes; a secret shorter than its hash is refused, naming file and sizes.
    let long = dir.join("hs512.key");
    let (ok, _, stderr) = run(&[
        "keygen",
        "--algorithm",
        "HS512",
        "--out",
        long.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(std::fs::read(&long).unwrap().len(), 64);
    std::fs::write(&key, &secret[..31]).unwrap();
    let (ok, _, stderr) = run(&["config", "check", config.to_str().unwrap()]);
    assert!(!ok);
    let expected = format!(
        "auth key {}: 31 bytes, but an HS256 secret needs at least 32",
        key.display()
    );
    assert!(
        stderr.contains(&expected),
        "{expected} missing from: {stderr}"
    );
}

#[test]
fn config_check_prints_the_effective_policy_and_refuses_bad_files() {
    let dir = example_copy("check");
    keygen_example(&dir);
    let example = dir.join("roomcast.toml");
    let (ok, stdout, stderr) = run(&["config", "check", example.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    for needle in [
        "required = true",
        "[namespaces.orders]",
        "publish = \"backend\"",
        "payload = { text: tstr",
        // Defaults the file leaves out are printed too.
        "publish_bytes_per_second",
        "per_ip_sessions",
        // The per-user budget: four sessions at the largest per-session rates (gps: 200, 400).
        "user_publish_per_second = 800\n",
        "user_publish_burst = 1600\n",
    ] {
        assert!(stdout.contains(needle), "{needle} missing from:\n{stdout}");
    }
    // The chat namespace's own publish rates, with the ones it inherits filled in.
    let chat = stdout
        .split("[namespaces.chat]\n")
        .nth(1)
        .and_then(|rest| rest.split("\n[").next())
        .expect("a chat table");
    for needle in [
        "publish_per_second = 2\n",
        "publish_burst = 5\n",
        "publish_bytes_per_second = 67108864\n",
    ] {
        assert!(chat.contains(needle), "{needle} missing from:\n{chat}");
    }
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[namespaces.orders]\nsubscribe = \"everyone\"\n").unwrap();
    let (ok, _, stderr) = run(&["config", "check", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("unknown variant"), "{stderr}");
    std::fs::write(&bad, "[namespaces.chat]\npublish_per_second = 0\n").unwrap();
    let (ok, _, stderr) = run(&["config", "check", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("namespaces.chat.publish_per_second must be at least 1"),
        "{stderr}"
    );
    let missing_key = dir.join("missing-key.toml");
    std::fs::write(
        &missing_key,
        "[auth]\nkeys = [{ algorithm = \"HS256\", file = \"nope.key\" }]\n",
    )
    .unwrap();
    let (ok, _, stderr) = run(&["config", "check", missing_key.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("nope.key"), "{stderr}");
}

#[test]
fn token_command_mints_a_token_the_example_config_accepts() {
    let dir = example_copy("token");
    let secret = keygen_example(&dir);
    let secret = secret.to_str().unwrap();
    let (ok, stdout, stderr) = run(&[
        "token",
        "--secret-file",
        secret,
        "--sub",
        "alice",
        "--grant",
        "orders:1042=sub",
        "--grant",
        "chat:*=sub,pub",
        "--aud",
        "roomcast",
        "--kid",
        "dev",
        "--ttl",
        "1h",
    ]);
    assert!(ok, "{stderr}");
    let security = roomcast_broker::gate::Security::load(&dir.join("roomcast.toml")).unwrap();
    let claims = security
        .verifier
        .verify(stdout.trim())
        .expect("token verifies");
    assert_eq!(claims.sub, "alice");
    let room = |name| roomcast_protocol::RoomName::new(name).unwrap();
    use roomcast_broker::auth::Capability;
    assert!(claims.grants(&room("orders:1042"), Capability::Sub));
    assert!(!claims.grants(&room("orders:1042"), Capability::Pub));
    assert!(claims.grants(&room("chat:lobby"), Capability::Pub));
    let (ok, _, stderr) = run(&[
        "token",
        "--secret-file",
        secret,
        "--sub",
        "a",
        "--grant",
        "x",
    ]);
    assert!(!ok);
    assert!(stderr.contains("PATTERN=sub"), "{stderr}");
}

#[test]
fn config_check_refuses_timers_that_cannot_work_together() {
    let dir = std::env::temp_dir().join(format!("roomcast-bin-timers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("open.toml");
    std::fs::write(&file, "[default]\n").unwrap();
    let file = file.to_str().unwrap();
    let (ok, _, stderr) = run(&["config", "check", file]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = run(&[
        "config",
        "check",
        file,
        "--idle-timeout",
        "2s",
        "--ping-interval",
        "10s",
    ]);
    assert!(!ok, "contradicting timers were accepted");
    assert!(
        stderr.contains("--ping-interval (10s) must be shorter than --idle-timeout (2s)"),
        "{stderr}"
    );
    // Working but poor combinations pass with a warning.
    let (ok, _, stderr) = run(&[
        "config",
        "check",
        file,
        "--idle-timeout",
        "10s",
        "--ping-interval",
        "8s",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("warning: --ping-interval (8s) is more than half"),
        "{stderr}"
    );
    // serve refuses them too, before it listens.
    let (ok, _, stderr) = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--idle-timeout",
        "2s",
        "--ping-interval",
        "10s",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("must be shorter than --idle-timeout"),
        "{stderr}"
    );
}
