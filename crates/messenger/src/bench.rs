//! `messenger bench`: how fast and how lean the system is, measured the same
//! way every time. It starts `messenger up` as a child process on loopback
//! (or drives `--target`), drives it with simulated clients made with the
//! client SDK, reads the server's CPU and memory from `/proc`, and prints a
//! table plus JSON for comparing runs.
//!
//! Layout: `bench/server.rs` (the system under test and its /proc figures),
//! `bench/clients.rs` (client fleets, latency stamps, histograms),
//! `bench/scenarios.rs` (idle, direct, group, history, reconnect),
//! `bench/websocket.rs` (browser-like sessions: idle and direct over the
//! gateway's WebSocket transport, beside gRPC),
//! `bench/media.rs` (tickets, completes, a 12 MP photo, upload throughput),
//! `bench/notify.rs` (pushes per second through the outbox, commit to push),
//! `bench/report.rs` (results, table, JSON).

mod clients;
mod media;
mod node;
mod notify;
mod report;
mod scenarios;
mod server;
mod websocket;

use std::{path::PathBuf, time::Duration};

use clap::Args;
use messenger_platform::auth::AuthOptions;

pub use report::Report;

/// Which message store the server it starts uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Store {
    Sqlite,
    /// A CQL cluster (`--scylla`): ScyllaDB, or Cassandra.
    Scylla,
}

/// How clients reach the gateway in `idle` and `direct`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// The SDK's gRPC `Connect` stream.
    Grpc,
    /// Browser-like sessions on the browser port (WebSocket).
    Websocket,
}

/// Which scenarios to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Idle,
    Direct,
    Group,
    History,
    Reconnect,
    /// Upload tickets and completes per second, a 12 MP photo's complete, PUT throughput.
    Media,
    /// Pushes per second through the outbox to a webhook, and commit to push.
    Notify,
    /// The CQL node's own statement rates (`--scylla`), beside the Scylla store's figures.
    Node,
}

#[derive(Args, Debug, Clone)]
pub struct BenchOptions {
    /// Scenarios to run, in order.
    #[arg(long, value_delimiter = ',', default_values = ["idle", "direct", "group", "history", "reconnect", "media", "notify"])]
    pub scenarios: Vec<Scenario>,
    /// Drive this running gateway instead of starting one (server figures need --server-pid).
    #[arg(long)]
    pub target: Option<String>,
    /// Process id of the --target server, for its CPU and memory figures.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The --target gateway's browser port (`host:port`), for the WebSocket transport.
    #[arg(long)]
    pub target_web: Option<String>,
    /// Transports `idle` and `direct` measure, each in turn (side by side).
    #[arg(long, value_delimiter = ',', default_values = ["grpc", "websocket"])]
    pub transports: Vec<Transport>,
    /// SQLite durability of the server it starts: full (default) or normal.
    #[arg(long, default_value = "full")]
    pub synchronous: String,
    /// Put the server's cache in this Redis (`redis://host:port`) instead of in process.
    #[arg(long)]
    pub redis_cache: Option<String>,
    /// Message stores to measure, each scenario on each in turn (side by
    /// side in one run: the machine's noise hits both alike).
    #[arg(long, value_delimiter = ',', default_values = ["sqlite"])]
    pub stores: Vec<Store>,
    /// The CQL node (`host:port`) for `--stores scylla`; each server started
    /// migrates a fresh keyspace `bench_<id>` there.
    #[arg(long)]
    pub scylla: Option<String>,
    /// Trace sample ratios to measure side by side, e.g. `off,0.01,1`: each
    /// store at each ratio, its spans exported over OTLP to a receiver in
    /// this process (`off`: no exporter, the default server). Empty: off.
    #[arg(long, value_delimiter = ',', value_parser = trace_sample)]
    pub trace_samples: Vec<Option<f64>>,
    /// Idle: connected clients.
    #[arg(long, default_value_t = 10_000)]
    pub idle_clients: usize,
    /// Idle: how long to measure idle CPU.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub idle_window: Duration,
    /// Direct: sender/receiver pairs.
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Direct: offered loads in messages per second (open loop), ascending.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000u32, 2_000, 5_000, 10_000, 20_000, 40_000])]
    pub rates: Vec<u32>,
    /// Length of each measured run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Message body size in bytes (the first 20 carry the send time).
    #[arg(long, default_value_t = 100)]
    pub body_size: usize,
    /// Group: member counts.
    #[arg(long, value_delimiter = ',', default_values_t = [10usize, 100, 1000])]
    pub group_sizes: Vec<usize>,
    /// Group: messages per second the sender offers.
    #[arg(long, default_value_t = 100)]
    pub group_rate: u32,
    /// History: messages in the conversation, and page reads measured.
    #[arg(long, default_value_t = 5_000)]
    pub history_messages: usize,
    #[arg(long, default_value_t = 2_000)]
    pub history_reads: usize,
    /// Reconnect: conversations, and messages missed in each.
    #[arg(long, default_value_t = 100)]
    pub reconnect_conversations: usize,
    #[arg(long, default_value_t = 100)]
    pub reconnect_messages: usize,
    /// Media: clients uploading at once, tickets and completes measured,
    /// 12-megapixel photos completed, and the large file's size in MiB.
    #[arg(long, default_value_t = 20)]
    pub media_clients: usize,
    #[arg(long, default_value_t = 2_000)]
    pub media_tickets: usize,
    #[arg(long, default_value_t = 200)]
    pub media_completes: usize,
    #[arg(long, default_value_t = 3)]
    pub media_photos: usize,
    #[arg(long, default_value_t = 64)]
    pub media_large_mib: usize,
    /// Notify: offline recipients (one push each in the burst), and the
    /// offered rate (messages per second, for `--duration`) of the latency run.
    #[arg(long, default_value_t = 1_000)]
    pub notify_recipients: usize,
    #[arg(long, default_value_t = 100)]
    pub notify_rate: u32,
    /// Write the JSON report here (it is also printed).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `off`, or a sample ratio between 0 and 1.
fn trace_sample(text: &str) -> Result<Option<f64>, String> {
    if text == "off" {
        return Ok(None);
    }
    match text.parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(Some(ratio)),
        _ => Err(format!("{text:?} is neither `off` nor a ratio between 0 and 1")),
    }
}

/// A server for the next measurement on the same store: a new one (each
/// transport, like each scenario, starts on a server with no leftovers), or
/// the --target again once it is quiet.
async fn fresh(
    options: &BenchOptions,
    server: server::Server,
    store: Store,
    tracing: Option<(f64, std::net::SocketAddr)>,
) -> anyhow::Result<server::Server> {
    if options.target.is_some() {
        server.settle().await;
        return Ok(server);
    }
    server.stop().await;
    server::Server::start(options, store, tracing).await
}

/// Runs the benchmark and prints its report.
pub async fn run(options: BenchOptions, auth: &AuthOptions) -> anyhow::Result<Report> {
    let wanted_files = (options.idle_clients as u64 * 2 + 10_000).max(65_536);
    // Root may raise the hard limit too (the child server inherits both).
    let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, wanted_files, wanted_files);
    match rlimit::increase_nofile_limit(wanted_files) {
        Ok(limit) if limit < wanted_files => eprintln!("bench: open-file limit is {limit}; idle clients may be capped"),
        Ok(_) => {}
        Err(error) => eprintln!("bench: cannot raise the open-file limit: {error}"),
    }
    // A --target server is what it is: one store, shared by every scenario.
    let stores = if options.target.is_some() { vec![options.stores[0]] } else { options.stores.clone() };
    if stores.contains(&Store::Scylla) && options.scylla.is_none() && options.target.is_none() {
        anyhow::bail!("--stores scylla needs --scylla host:port (a ScyllaDB or Cassandra node)");
    }
    // Each store at each trace sample ratio (or with tracing off).
    let samples: Vec<Option<f64>> = if options.trace_samples.is_empty() || options.target.is_some() {
        vec![None]
    } else {
        options.trace_samples.clone()
    };
    let variants: Vec<(Store, Option<f64>)> =
        stores.iter().flat_map(|store| samples.iter().map(move |sample| (*store, *sample))).collect();
    let receiver = match samples.iter().any(Option::is_some) {
        true => Some(crate::otlp::Receiver::start(([127, 0, 0, 1], 0).into(), false).await?),
        false => None,
    };
    let mut reports: Vec<Report> = Vec::new();
    let mut shared: Option<server::Server> = None;
    for (index, scenario) in options.scenarios.iter().enumerate() {
        for (slot, &(store, sample)) in variants.iter().enumerate() {
            let store = &store;
            let tracing = sample.zip(receiver.as_ref()).map(|(ratio, receiver)| (ratio, receiver.address()));
            // A server started here is started afresh for each scenario and
            // store, so none pays for another's leftovers (after 10,000 idle
            // connections close, the allocator keeps their memory and
            // `direct` measured 9-14% more server CPU). A --target server
            // is shared; only quiet is awaited.
            let mut server = match shared.take() {
                Some(server) => server,
                None => server::Server::start(&options, *store, tracing).await?,
            };
            if index == 0 {
                eprintln!("bench: {store:?} server at {} (pid {:?})", server.endpoint, server.pid);
                reports.push(Report::new(&options, &server, *store, sample));
            }
            let spans_before = receiver.as_ref().map_or(0, crate::otlp::Receiver::count);
            let report = &mut reports[slot];
            server.settle().await;
            eprintln!("bench: {scenario:?} on {store:?} ...");
            match scenario {
                // Each transport in turn, each on a server of its own.
                Scenario::Idle | Scenario::Direct => {
                    for (turn, &transport) in options.transports.iter().enumerate() {
                        if turn > 0 {
                            server = fresh(&options, server, *store, tracing).await?;
                        }
                        let web = transport == Transport::Websocket;
                        if *scenario == Scenario::Idle {
                            let idle = Some(scenarios::idle(&options, &server, auth, transport).await?);
                            *(if web { &mut report.idle_websocket } else { &mut report.idle }) = idle;
                        } else {
                            let direct = Some(scenarios::direct(&options, &server, auth, transport).await?);
                            *(if web { &mut report.direct_websocket } else { &mut report.direct }) = direct;
                        }
                    }
                }
                Scenario::Group => report.group = scenarios::group(&options, &server, auth).await?,
                Scenario::History => report.history = Some(scenarios::history(&options, &server, auth).await?),
                Scenario::Reconnect => report.reconnect = Some(scenarios::reconnect(&options, &server, auth).await?),
                Scenario::Media => report.media = Some(media::media(&options, &server, auth).await?),
                Scenario::Notify => report.notify = Some(notify::notify(&options, &server, auth).await?),
                // The node itself, once: in the Scylla store's report.
                Scenario::Node if *store == Store::Scylla => report.node = Some(node::node(&options).await?),
                Scenario::Node => {}
            }
            if options.target.is_some() {
                shared = Some(server);
            } else {
                // Stopping flushes what its exporter still holds.
                server.stop().await;
            }
            if sample.is_some() {
                let received = receiver.as_ref().map_or(0, crate::otlp::Receiver::count) - spans_before;
                *report.spans_received.get_or_insert(0) += received;
            }
        }
    }
    if let Some(server) = shared {
        server.stop().await;
    }
    for report in &reports {
        print!("{}", report.table());
    }
    if reports.len() > 1 {
        print!("{}", report::side_by_side(&reports));
    }
    let json = if reports.len() == 1 {
        serde_json::to_string_pretty(&reports[0])?
    } else {
        serde_json::to_string_pretty(&reports)?
    };
    println!("{json}");
    if let Some(path) = &options.json {
        std::fs::write(path, &json)?;
    }
    Ok(reports.into_iter().next().expect("at least one store"))
}
