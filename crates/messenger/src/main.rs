//! `messenger`: reads configuration, then runs one command. All logic lives in
//! the library crates; this file only parses flags.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use messenger::{Config, chat, system};
use messenger_platform::{
    discovery::Role,
    telemetry::{self, TracingOptions},
};
use serde::Serialize;

#[derive(Parser)]
#[command(name = "messenger", version, about = "A Messenger-class chat backend: gRPC services in one binary")]
struct Cli {
    /// TOML configuration file (layered over defaults, under MESSENGER_* env and flags).
    #[arg(long, global = true, env = "MESSENGER_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for embedded data (overrides data_dir).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every service in this process with embedded defaults.
    Up,
    /// Run one service.
    Serve {
        /// gateway, message or presence
        #[arg(long)]
        service: Role,
    },
    /// Mint a development token (HS256, auth.hs256_secret) for USER.
    Token {
        user: String,
        /// Lifetime, e.g. 1h, 30d.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Interactive terminal chat.
    Chat {
        /// Who you are; a development token is minted for this user unless --token is given.
        #[arg(long)]
        user: Option<String>,
        #[arg(long, env = "MESSENGER_TOKEN")]
        token: Option<String>,
        /// Start chatting with this user right away.
        #[arg(long)]
        peer: Option<String>,
        /// Gateway URL; defaults to the configured gateway.listen.
        #[arg(long)]
        endpoint: Option<String>,
        /// Device id; defaults to `cli-<user>`.
        #[arg(long)]
        device: Option<String>,
        /// CA certificate (PEM) that signed the gateway's certificate (an `https://` endpoint).
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Name the gateway's certificate must be valid for; defaults to the endpoint's host.
        #[arg(long)]
        server_name: Option<String>,
    },
    /// Write a development cluster CA, a certificate per role and a public
    /// certificate for the gateway (PEM files), and print the [tls] settings.
    Certs {
        /// Directory to write into.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Names the public certificate is valid for (DNS names or IP addresses).
        #[arg(long = "public-name", default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned()])]
        public_names: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 90)]
        days: u32,
    },
    /// Print the effective configuration as TOML.
    Config {
        /// Only check it (every layer merged, every value and the key files
        /// it names): print a one-line verdict, exit non-zero when invalid.
        #[arg(long)]
        check: bool,
    },
    /// Create or upgrade the stores' schemas (SQLite file or Scylla keyspace), then exit.
    Migrate,
    /// Measure throughput, latency and memory with simulated SDK clients.
    Bench(Box<messenger::bench::BenchOptions>),
}

/// The `MESSENGER_*` variables that are flags of this binary (clap reads
/// them), not settings.
const FLAG_VARIABLES: &[&str] = &["CONFIG", "TOKEN"];

/// The flags layer: only what was given on the command line.
#[derive(Serialize)]
struct Flags {
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    messenger_platform::tls::install_default_provider();
    let cli = Cli::parse();
    let flags = Flags { data_dir: cli.data_dir };
    let config: Config = messenger_platform::config::load(cli.config.as_deref(), &flags, FLAG_VARIABLES)?;
    match cli.command {
        Command::Certs { out, public_names, days } => {
            let generated = messenger::certs::generate(&out, &config.tls.cluster_domain, &public_names, days)?;
            println!("wrote a development CA and certificates to {}", generated.dir.display());
            println!("a process running every role (messenger up) uses:\n\n{}", generated.config_snippet("all"));
            println!("one role per process: cluster_cert_file = <role>.pem, cluster_key_file = <role>-key.pem");
        }
        Command::Config { check: true } => println!("configuration is valid"),
        Command::Config { check: false } => print!("{}", messenger_platform::config::render_redacted(&config)?),
        Command::Migrate => {
            let _telemetry = telemetry::init(&config.log, &TracingOptions::default(), "messenger-migrate");
            println!("{}", system::migrate(&config).await?);
        }
        Command::Bench(options) => {
            messenger::bench::run(*options, &config.auth.clone().or_development()).await?;
        }
        Command::Token { user, ttl } => {
            println!("{}", messenger_platform::auth::mint_hs256(&config.auth.or_development(), &user, ttl)?);
        }
        Command::Up => {
            let telemetry = telemetry::init(&config.log, &config.tracing, "messenger");
            raise_open_file_limit();
            let mut config = config;
            config.auth = config.auth.or_development();
            // No object storage configured: the one in this process.
            if config.media.s3.endpoint.is_empty() {
                config.media.s3.embedded = true;
            }
            if messenger::certs::ephemeral_cluster_tls(&mut config)? {
                tracing::info!("internal hops use mutual TLS with a cluster CA made for this run");
            } else if config.tls.insecure_cluster_plaintext {
                tracing::warn!("tls.insecure_cluster_plaintext: internal ports accept any caller as any user");
            }
            let data_dir = config.data_dir.clone();
            let dev_tokens = config.auth.uses_development_secret();
            let running = system::start(config, &system::ALL_ROLES).await?;
            let endpoint = running.endpoint();
            println!("messenger is up: gateway {endpoint}, data in {}", data_dir.display());
            match running.web_url() {
                Some(web) if dev_tokens => println!("web app: {web}   (sign in with any user id: development tokens)"),
                Some(web) => println!("web app: {web}"),
                None => {}
            }
            if let Some(admin) = running.addresses.admin {
                println!("metrics: http://{admin}/metrics   (liveness /livez, readiness /readyz)");
            }
            println!(
                "try it:  messenger chat --user alice --peer bob   (and, in another terminal, --user bob --peer alice)"
            );
            let stopped = run_until_signal(running).await;
            flush(telemetry).await;
            stopped?;
        }
        Command::Serve { service } => {
            let telemetry = telemetry::init(&config.log, &config.tracing, &format!("messenger-{service}"));
            raise_open_file_limit();
            let running = system::start(config, &[service]).await?;
            let stopped = run_until_signal(running).await;
            // After the drain: what the last calls traced goes out too.
            flush(telemetry).await;
            stopped?;
        }
        Command::Chat { user, token, peer, endpoint, device, ca_file, server_name } => {
            let token = match (token, &user) {
                (Some(token), _) => token,
                (None, Some(user)) => {
                    let auth = config.auth.clone().or_development();
                    messenger_platform::auth::mint_hs256(&auth, user, Duration::from_secs(86_400))?
                }
                (None, None) => anyhow::bail!("give --user (dev token) or --token"),
            };
            let scheme = if config.tls.public_cert_file.is_some() || ca_file.is_some() { "https" } else { "http" };
            let endpoint = endpoint.unwrap_or_else(|| format!("{scheme}://{}", config.gateway.listen));
            let device = device.unwrap_or_else(|| format!("cli-{}", user.as_deref().unwrap_or("user")));
            let mut client = messenger_client::Options::new(endpoint, token, device);
            if let Some(path) = &ca_file {
                let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
                client.tls.ca_pem = Some(pem);
            }
            client.tls.server_name = server_name;
            chat::run(chat::ChatOptions { client, peer }).await.context("chat failed")?;
        }
    }
    Ok(())
}

/// Exports what telemetry still holds (blocking, so off the runtime's workers).
async fn flush(telemetry: telemetry::Telemetry) {
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
}

/// Serves until SIGTERM/Ctrl-C, drains, and exits at once on a second signal.
async fn run_until_signal(running: system::Running) -> anyhow::Result<()> {
    let token = running.shutdown_token();
    tokio::spawn(async move {
        messenger_platform::shutdown::shutdown_signal().await;
        tracing::info!("shutting down; send the signal again to exit at once");
        token.cancel();
        messenger_platform::shutdown::shutdown_signal().await;
        std::process::exit(130);
    });
    running.wait().await
}

/// A server holds a socket per client: the soft open-file limit (often
/// 1,024, reached by about a thousand connected apps) is raised to the hard
/// limit at start.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit; connections may run out of files"),
    }
}
