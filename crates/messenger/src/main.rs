//! `messenger`: reads configuration, then runs one command. All logic lives in
//! the library crates; this file only parses flags.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use messenger::{Config, chat, system};
use messenger_platform::{discovery::Role, telemetry};
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
    },
    /// Print the effective configuration as TOML.
    Config,
    /// Create or upgrade the message store's schema (SQLite file or Scylla keyspace), then exit.
    Migrate,
    /// Measure throughput, latency and memory with simulated SDK clients.
    Bench(messenger::bench::BenchOptions),
}

/// The flags layer: only what was given on the command line.
#[derive(Serialize)]
struct Flags {
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: Config = messenger_platform::config::load(cli.config.as_deref(), &Flags { data_dir: cli.data_dir })?;
    match cli.command {
        Command::Config => print!("{}", messenger_platform::config::render(&config)?),
        Command::Migrate => {
            telemetry::init(&config.log);
            system::migrate(&config).await?;
            println!("message store schema is up to date ({:?})", config.message.store);
        }
        Command::Bench(options) => {
            messenger::bench::run(options, &config.auth).await?;
        }
        Command::Token { user, ttl } => {
            println!("{}", messenger_platform::auth::mint_hs256(&config.auth, &user, ttl)?);
        }
        Command::Up => {
            telemetry::init(&config.log);
            let data_dir = config.data_dir.clone();
            let running = system::start(config, &system::ALL_ROLES).await?;
            let endpoint = running.endpoint();
            println!("messenger is up: gateway {endpoint}, data in {}", data_dir.display());
            println!(
                "try it:  messenger chat --user alice --peer bob   (and, in another terminal, --user bob --peer alice)"
            );
            run_until_signal(running).await?;
        }
        Command::Serve { service } => {
            telemetry::init(&config.log);
            let running = system::start(config, &[service]).await?;
            run_until_signal(running).await?;
        }
        Command::Chat { user, token, peer, endpoint, device } => {
            let token = match (token, &user) {
                (Some(token), _) => token,
                (None, Some(user)) => {
                    messenger_platform::auth::mint_hs256(&config.auth, user, Duration::from_secs(86_400))?
                }
                (None, None) => anyhow::bail!("give --user (dev token) or --token"),
            };
            let endpoint = endpoint.unwrap_or_else(|| format!("http://{}", config.gateway.listen));
            let device = device.unwrap_or_else(|| format!("cli-{}", user.as_deref().unwrap_or("user")));
            let client = messenger_client::Options::new(endpoint, token, device);
            chat::run(chat::ChatOptions { client, peer }).await.context("chat failed")?;
        }
    }
    Ok(())
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
