//! The `roomcast` binary: command-line parsing, logging, signals. Everything else is in the
//! library.

use std::io::IsTerminal;

use clap::{Parser, Subcommand};
use roomcast_broker::{Config, serve, server::bind_tcp};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// roomcast: an edge real-time broker (rooms over WebSocket, CBOR events).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (single node; cluster mode over NATS with `--nats`).
    Serve(Box<Config>),
    /// Certificate helpers.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Configuration file helpers.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Mint an HS256 test token (development; production tokens come from your auth server).
    Token(TokenArgs),
    /// Write a fresh HMAC secret (random bytes from the operating system) for an `[auth]` key,
    /// readable by its owner only.
    Keygen(KeygenArgs),
}

#[derive(clap::Args)]
struct KeygenArgs {
    /// The key file to write (the `file` of a key in the configuration's `[auth]` keys).
    #[arg(long)]
    out: std::path::PathBuf,
    /// The key's algorithm: the secret gets as many bytes as its hash's output (32, 48, 64).
    #[arg(long, value_enum, default_value = "HS256")]
    algorithm: HmacAlgorithm,
    /// Replace the file if it exists (tokens signed with the old secret stop verifying).
    #[arg(long)]
    force: bool,
}

/// The algorithms `keygen` makes secrets for.
#[derive(Clone, Copy, clap::ValueEnum)]
#[allow(clippy::upper_case_acronyms)]
enum HmacAlgorithm {
    #[value(name = "HS256")]
    HS256,
    #[value(name = "HS384")]
    HS384,
    #[value(name = "HS512")]
    HS512,
}

fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    use roomcast_broker::auth::Algorithm;
    let algorithm = match args.algorithm {
        HmacAlgorithm::HS256 => Algorithm::HS256,
        HmacAlgorithm::HS384 => Algorithm::HS384,
        HmacAlgorithm::HS512 => Algorithm::HS512,
    };
    let len = roomcast_broker::auth::generate_secret_file(&args.out, algorithm, args.force)?;
    eprintln!(
        "wrote a {len}-byte {algorithm:?} secret to {} (mode 0600)",
        args.out.display()
    );
    Ok(())
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file (and load its key files), then print the effective
    /// configuration with every default filled in. The `serve` flags (and `ROOMCAST_*`
    /// variables) given here are checked too: timers that cannot work together are refused.
    Check {
        /// The TOML file.
        file: std::path::PathBuf,
        /// The settings `serve` would run with.
        #[command(flatten)]
        serve: Box<Config>,
    },
}

#[derive(clap::Args)]
struct TokenArgs {
    /// File holding the HS256 secret (its raw bytes, at least 32).
    #[arg(long)]
    secret_file: std::path::PathBuf,
    /// User id (`sub`).
    #[arg(long)]
    sub: String,
    /// Room grant `PATTERN=sub[,pub]`, e.g. `orders:1042=sub` or `bids:*=sub,pub`; repeatable.
    #[arg(long = "grant", value_parser = roomcast_broker::auth::parse_grant)]
    grants: Vec<(String, Vec<String>)>,
    /// Lifetime, e.g. `1h`, `15m`.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: std::time::Duration,
    /// `aud` claim.
    #[arg(long)]
    aud: Option<String>,
    /// `iss` claim.
    #[arg(long)]
    iss: Option<String>,
    /// `kid` header (the key id in the broker's `[auth]` keys).
    #[arg(long)]
    kid: Option<String>,
}

fn mint_token(args: TokenArgs) -> anyhow::Result<()> {
    let secret = std::fs::read(&args.secret_file)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.secret_file.display()))?;
    anyhow::ensure!(
        secret.len() >= 32,
        "an HS256 secret needs at least 32 bytes"
    );
    let spec = roomcast_broker::auth::TokenSpec {
        sub: args.sub,
        rooms: args.grants.into_iter().collect(),
        ttl: args.ttl,
        not_before: None,
        audience: args.aud,
        issuer: args.iss,
        kid: args.kid,
    };
    println!("{}", roomcast_broker::auth::mint_hs256(&secret, &spec)?);
    Ok(())
}

fn check_config(file: &std::path::Path, serve: &Config) -> anyhow::Result<()> {
    for warning in serve.check()? {
        eprintln!("warning: {warning}");
    }
    let security = roomcast_broker::gate::Security::load(file)?;
    print!("{}", security.file.effective());
    eprintln!("{}: ok", file.display());
    Ok(())
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a development certificate and key (ECDSA P-256, valid 13 days, for localhost,
    /// 127.0.0.1 and ::1) and print the hashes browsers pin.
    Dev {
        /// Folder to write cert.pem and key.pem into (created if missing).
        #[arg(long, default_value = "certs")]
        out: std::path::PathBuf,
    },
}

fn write_dev_cert(out: &std::path::Path) -> anyhow::Result<()> {
    use base64::Engine;
    let dev = roomcast_broker::certs::generate_dev_cert()?;
    std::fs::create_dir_all(out)?;
    let (cert, key) = (out.join("cert.pem"), out.join("key.pem"));
    std::fs::write(&cert, &dev.cert_pem)?;
    std::fs::write(&key, &dev.key_pem)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    println!("wrote {} and {}", cert.display(), key.display());
    println!("certificate SHA-256 (serverCertificateHashes, roomcast-cli --cert-hash):");
    println!("  hex    {}", dev.info.hex());
    println!("  base64 {}", dev.info.base64());
    println!("public key (SPKI) SHA-256, base64 (chromium --ignore-certificate-errors-spki-list):");
    println!("  {}", b64.encode(dev.spki_sha256));
    println!(
        "valid until {} (unix seconds); serve it with: roomcast serve --tls-cert {} --tls-key {}",
        dev.info.not_after_unix.unwrap_or_default(),
        cert.display(),
        key.display()
    );
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    info!("shutdown signal received: draining");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_env("ROOMCAST_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Serve(config) => {
            // Every session holds a file descriptor: use all the hard limit allows.
            match rlimit::increase_nofile_limit(u64::MAX) {
                Ok(limit) => info!(limit, "open-file limit"),
                Err(e) => warn!(error = %e, "could not raise the open-file limit"),
            }
            let listener = bind_tcp(config.listen)?;
            let addr = listener.local_addr()?;
            let (ws, http) = if config.tls_cert.is_some() {
                ("wss", "https")
            } else {
                ("ws", "http")
            };
            info!(%addr, "listening: WebSocket {ws}://{addr}/ws, health {http}://{addr}/healthz, metrics {http}://{addr}/metrics");
            if let Some(dir) = &config.dev_ui {
                anyhow::ensure!(dir.is_dir(), "--dev-ui {}: not a folder", dir.display());
                info!(dir = %dir.display(), "dev UI: open {http}://{addr}/ (development only)");
            }
            serve(listener, *config, shutdown_signal()).await
        }
        Command::Certs(CertsCommand::Dev { out }) => write_dev_cert(&out),
        Command::Config(ConfigCommand::Check { file, serve }) => check_config(&file, &serve),
        Command::Token(args) => mint_token(args),
        Command::Keygen(args) => keygen(args),
    }
}
