//! Results: one struct per scenario, a table for people and JSON for
//! comparing runs.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{BenchOptions, Scenario, Store, server::Server};

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenarios: Vec<Scenario>,
    pub store: Store,
    /// The server's trace sample ratio (`--trace-samples`); none: tracing off.
    pub trace_sample: Option<f64>,
    /// Spans the OTLP receiver got from this variant's servers.
    pub spans_received: Option<u64>,
    pub machine: Machine,
    pub synchronous: String,
    /// Where the server's cache lives: "memory" or the Redis URL.
    pub cache: String,
    pub idle: Option<Idle>,
    pub direct: Option<Direct>,
    /// The same two scenarios over the browser port's WebSocket.
    pub idle_websocket: Option<Idle>,
    pub direct_websocket: Option<Direct>,
    pub group: Vec<Group>,
    pub history: Option<History>,
    pub reconnect: Option<Reconnect>,
    pub media: Option<Media>,
    pub notify: Option<Notify>,
    /// The CQL node's own limits (`--scenarios node`).
    pub node: Option<super::node::NodeLimits>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_gib: f64,
    pub server_started_here: bool,
}

#[derive(Debug, Serialize)]
pub struct Idle {
    pub clients: usize,
    pub connect_seconds: f64,
    pub server_rss_before_mib: f64,
    pub server_rss_after_mib: f64,
    pub server_bytes_per_client: f64,
    pub idle_server_cpu_percent: f64,
}

#[derive(Debug, Serialize)]
pub struct DirectRun {
    pub offered_per_sec: u32,
    pub sent: u64,
    pub skipped: u64,
    pub failed: u64,
    pub delivered: u64,
    pub delivered_per_sec: f64,
    pub server_cpu_cores: f64,
    pub server_cpu_seconds_per_1000: f64,
    pub delivered_per_server_cpu_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// CQL requests to the node per delivered message, by `statement/mode`
    /// (a Scylla store; counted from the server's `/metrics`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub statements_per_delivered: BTreeMap<String, f64>,
}

#[derive(Debug, Serialize)]
pub struct Direct {
    pub pairs: usize,
    pub body_size: usize,
    pub runs: Vec<DirectRun>,
    /// Highest delivered rate seen.
    pub saturation_per_sec: f64,
    /// A run at half of saturation.
    pub half_saturation: Option<DirectRun>,
}

#[derive(Debug, Serialize)]
pub struct Group {
    pub members: usize,
    pub offered_messages_per_sec: u32,
    /// A second run, at half of what the first (saturated) one delivered.
    pub at_half_saturation: bool,
    pub messages: u64,
    pub deliveries: u64,
    pub deliveries_per_sec: f64,
    pub deliveries_per_server_cpu_second: f64,
    pub messages_reaching_everyone: u64,
    pub last_member_p50_ms: f64,
    pub last_member_p99_ms: f64,
    /// Of the memberships asked for by members' history reads (10 a second
    /// during the run), the share the message service's cache answered: a
    /// send moves no membership, so a busy group keeps hitting.
    pub membership_cache_hit_ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct History {
    pub messages: usize,
    pub reads: usize,
    pub page_size: u32,
    /// Newest page, served by the message service's read cache.
    pub hit_p50_ms: f64,
    pub hit_p99_ms: f64,
    /// Older pages, read from the store.
    pub miss_p50_ms: f64,
    pub miss_p99_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Reconnect {
    pub conversations: usize,
    pub missed_messages: usize,
    pub seconds_to_caught_up: f64,
}

#[derive(Debug, Serialize)]
pub struct Notify {
    /// Offline recipients, each with a webhook device.
    pub recipients: usize,
    /// The burst: one message to each recipient, as fast as the sender goes.
    pub messages: usize,
    pub pushed: usize,
    /// From the first send to the last push's arrival.
    pub pushes_per_sec: f64,
    pub server_cpu_ms_per_push: f64,
    /// The paced run: offered messages per second, pushes measured, and the
    /// time from the durable ack to the push's arrival.
    pub paced_rate: u32,
    pub paced_pushed: usize,
    pub commit_to_push_p50_ms: f64,
    pub commit_to_push_p99_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Media {
    pub clients: usize,
    /// Upload tickets (membership, type, quota and rate checks, presigning).
    pub tickets: usize,
    pub tickets_per_sec: f64,
    pub ticket_p50_ms: f64,
    pub ticket_p99_ms: f64,
    pub server_cpu_ms_per_ticket: f64,
    /// Completes of 64 KiB files already in storage (HEAD, type check).
    pub completes: usize,
    pub completes_per_sec: f64,
    pub server_cpu_ms_per_complete: f64,
    /// Complete of a 12-megapixel JPEG: decode, re-encode without
    /// metadata, thumbnail, BlurHash (median of the runs).
    pub photo_bytes: usize,
    pub photo_complete_p50_s: f64,
    /// One file in parts, ticket to complete.
    pub large_mib: usize,
    pub large_upload_mib_per_sec: f64,
    /// 4 MiB files uploaded at once, in all.
    pub parallel_uploads: usize,
    pub parallel_upload_mib_per_sec: f64,
}

impl Report {
    pub fn new(options: &BenchOptions, server: &Server, store: Store, trace_sample: Option<f64>) -> Self {
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|info| info.lines().next()?.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
        Report {
            scenarios: options.scenarios.clone(),
            store,
            trace_sample,
            spans_received: None,
            machine: Machine {
                cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
                memory_gib: (memory_gib * 10.0).round() / 10.0,
                server_started_here: options.target.is_none() && server.pid.is_some(),
            },
            synchronous: options.synchronous.clone(),
            cache: options.redis_cache.clone().unwrap_or_else(|| "memory".into()),
            idle: None,
            direct: None,
            idle_websocket: None,
            direct_websocket: None,
            group: Vec::new(),
            history: None,
            reconnect: None,
            media: None,
            notify: None,
            node: None,
        }
    }

    /// The human-readable summary.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let machine = &self.machine;
        out += &format!(
            "\nmessenger bench — {:?} store, {} cores, {} GiB, server and clients on this machine, sqlite synchronous={}, cache {}\n",
            self.store, machine.cores, machine.memory_gib, self.synchronous, self.cache
        );
        if let Some(ratio) = self.trace_sample {
            out += &format!(
                "  tracing: {}% of traces sampled, exported over OTLP to a receiver in the bench process; {} spans received\n",
                ratio * 100.0,
                self.spans_received.unwrap_or(0)
            );
        }
        for (label, idle) in [("grpc", &self.idle), ("websocket", &self.idle_websocket)] {
            if let Some(idle) = idle {
                out += &idle_line(label, idle);
            }
        }
        for (label, direct) in [("grpc", &self.direct), ("websocket", &self.direct_websocket)] {
            if let Some(direct) = direct {
                out += &direct_table(label, direct);
            }
        }
        if let Some(node) = &self.node {
            out += &node.table();
            out += &node_ratios(self, node);
        }
        if let Some(line) = transport_ratios(self) {
            out += &line;
        }
        if !self.group.is_empty() {
            out += "\ngroup    members  msgs/s offered  deliveries/s  per cpu-s  reached all  last member p50 ms  p99 ms  membership cache hits\n";
            for group in &self.group {
                let hits =
                    group.membership_cache_hit_ratio.map_or("-".to_owned(), |ratio| format!("{:.0}%", ratio * 100.0));
                out += &format!(
                    "         {:>7}  {:>14}  {:>12.0}  {:>9.0}  {:>5}/{:<5}  {:>17.2}  {:>6.2}  {:>21}{}\n",
                    group.members,
                    group.offered_messages_per_sec,
                    group.deliveries_per_sec,
                    group.deliveries_per_server_cpu_second,
                    group.messages_reaching_everyone,
                    group.messages,
                    group.last_member_p50_ms,
                    group.last_member_p99_ms,
                    hits,
                    if group.at_half_saturation { "  (half of saturation)" } else { "" }
                );
            }
        }
        if let Some(history) = &self.history {
            out += &format!(
                "\nhistory  {} x 2 reads of {}-message pages from {} messages: cache hit p50 {:.2} ms, p99 {:.2} ms; miss (store) p50 {:.2} ms, p99 {:.2} ms\n",
                history.reads,
                history.page_size,
                history.messages,
                history.hit_p50_ms,
                history.hit_p99_ms,
                history.miss_p50_ms,
                history.miss_p99_ms
            );
        }
        if let Some(reconnect) = &self.reconnect {
            out += &format!(
                "\nreconnect  {} missed messages over {} conversations: caught up in {:.2} s\n",
                reconnect.missed_messages, reconnect.conversations, reconnect.seconds_to_caught_up
            );
        }
        if let Some(media) = &self.media {
            out += &format!(
                "\nmedia    {} clients: {:.0} tickets/s (p50 {:.2} ms, p99 {:.2} ms, {:.2} server cpu-ms each); \
                 {:.0} completes/s ({:.2} cpu-ms each)\n         12 MP JPEG ({:.1} MiB) complete {:.2} s; \
                 upload {:.0} MiB/s ({} MiB in parts), {:.0} MiB/s ({} x 4 MiB at once)\n",
                media.clients,
                media.tickets_per_sec,
                media.ticket_p50_ms,
                media.ticket_p99_ms,
                media.server_cpu_ms_per_ticket,
                media.completes_per_sec,
                media.server_cpu_ms_per_complete,
                media.photo_bytes as f64 / 1024.0 / 1024.0,
                media.photo_complete_p50_s,
                media.large_upload_mib_per_sec,
                media.large_mib,
                media.parallel_upload_mib_per_sec,
                media.parallel_uploads
            );
        }
        if let Some(notify) = &self.notify {
            out += &format!(
                "\nnotify   {} offline recipients: {} of {} pushed, {:.0} pushes/s ({:.2} server cpu-ms each); \
                 commit to push at {}/s: p50 {:.1} ms, p99 {:.1} ms ({} pushes)\n",
                notify.recipients,
                notify.pushed,
                notify.messages,
                notify.pushes_per_sec,
                notify.server_cpu_ms_per_push,
                notify.paced_rate,
                notify.commit_to_push_p50_ms,
                notify.commit_to_push_p99_ms,
                notify.paced_pushed
            );
        }
        out
    }
}

fn idle_line(transport: &str, idle: &Idle) -> String {
    format!(
        "\nidle ({transport})  {} clients connected in {:.1} s: server RSS {:.0} -> {:.0} MiB = {:.1} KB per client; idle server CPU {:.1}%\n",
        idle.clients,
        idle.connect_seconds,
        idle.server_rss_before_mib,
        idle.server_rss_after_mib,
        idle.server_bytes_per_client / 1000.0,
        idle.idle_server_cpu_percent
    )
}

fn direct_table(transport: &str, direct: &Direct) -> String {
    let mut out =
        format!("\ndirect ({transport})  {} pairs, {}-byte bodies, open loop\n", direct.pairs, direct.body_size);
    out += "  offered/s  delivered/s  server cores  cpu-s/1000  per cpu-s     p50 ms    p99 ms   p999 ms  skipped  failed\n";
    for run in direct.runs.iter().chain(direct.half_saturation.iter()) {
        out += &format!(
            "  {:>9}  {:>11.0}  {:>12.2}  {:>10.3}  {:>9.0}  {:>9.2}  {:>8.2}  {:>8.2}  {:>7}  {:>6}\n",
            run.offered_per_sec,
            run.delivered_per_sec,
            run.server_cpu_cores,
            run.server_cpu_seconds_per_1000,
            run.delivered_per_server_cpu_second,
            run.p50_ms,
            run.p99_ms,
            run.p999_ms,
            run.skipped,
            run.failed
        );
    }
    out += &format!("  saturation: {:.0} delivered/s (last row: half of it)\n", direct.saturation_per_sec);
    for run in direct.runs.iter().chain(direct.half_saturation.iter()) {
        out += &statements_line(run);
    }
    out
}

/// CQL requests per delivered message at one rate: the total by mode, then
/// each statement, most frequent first (nothing for a store without CQL).
fn statements_line(run: &DirectRun) -> String {
    if run.statements_per_delivered.is_empty() {
        return String::new();
    }
    let mut by_mode: BTreeMap<&str, f64> = BTreeMap::new();
    for (key, count) in &run.statements_per_delivered {
        *by_mode.entry(key.rsplit('/').next().unwrap_or_default()).or_default() += count;
    }
    let total: f64 = by_mode.values().sum();
    let modes: Vec<String> = by_mode.iter().map(|(mode, count)| format!("{mode} {count:.2}")).collect();
    let mut statements: Vec<(&String, &f64)> = run.statements_per_delivered.iter().collect();
    statements.sort_by(|a, b| b.1.total_cmp(a.1));
    let each: Vec<String> = statements.iter().map(|(key, count)| format!("{key} {count:.2}")).collect();
    format!(
        "  CQL requests per delivered message at {}/s: {total:.2} ({})\n    {}\n",
        run.offered_per_sec,
        modes.join(", "),
        each.join(", ")
    )
}

/// WebSocket against gRPC, on the same figures: bytes per idle session, and
/// deliveries per server CPU-second at each offered rate both ran.
fn transport_ratios(report: &Report) -> Option<String> {
    let mut parts = Vec::new();
    if let (Some(grpc), Some(web)) = (&report.idle, &report.idle_websocket) {
        parts.push(format!(
            "server bytes per idle session {:.2}x",
            ratio(web.server_bytes_per_client, grpc.server_bytes_per_client)
        ));
    }
    if let (Some(grpc), Some(web)) = (&report.direct, &report.direct_websocket) {
        let same_rate: Vec<String> = web
            .runs
            .iter()
            .filter_map(|web| {
                let grpc = grpc.runs.iter().find(|grpc| grpc.offered_per_sec == web.offered_per_sec)?;
                Some(format!(
                    "{:.2}x at {}/s",
                    ratio(web.delivered_per_server_cpu_second, grpc.delivered_per_server_cpu_second),
                    web.offered_per_sec
                ))
            })
            .collect();
        if !same_rate.is_empty() {
            parts.push(format!("deliveries per server CPU-second {}", same_rate.join(", ")));
        }
        parts.push(format!("saturation {:.2}x", ratio(web.saturation_per_sec, grpc.saturation_per_sec)));
    }
    (!parts.is_empty()).then(|| format!("\nwebsocket / grpc: {}\n", parts.join("; ")))
}

/// The store's direct figures as ratios to the node's own, from the same run.
fn node_ratios(report: &Report, node: &super::node::NodeLimits) -> String {
    let Some(direct) = &report.direct else { return String::new() };
    let lwt = node.kinds.iter().find(|kind| kind.statement == "lwt_update");
    let mut parts = Vec::new();
    if let Some(lwt) = lwt {
        parts.push(format!(
            "direct saturation {:.2}x the node's lwt_update rate",
            ratio(direct.saturation_per_sec, lwt.per_sec)
        ));
        if let Some(half) = &direct.half_saturation {
            parts.push(format!("p50 at half saturation {:.1}x its p50", ratio(half.p50_ms, lwt.p50_ms)));
        }
    }
    if parts.is_empty() { String::new() } else { format!("  {}\n", parts.join("; ")) }
}

fn ratio(value: f64, to: f64) -> f64 {
    if to > 0.0 { value / to } else { 0.0 }
}

/// Key figures of each store in one table, with each store's ratio to the first.
pub fn side_by_side(reports: &[Report]) -> String {
    type Figure = (&'static str, fn(&Report) -> Option<f64>);
    let figures: [Figure; 14] = [
        ("direct saturation, delivered/s", |r| r.direct.as_ref().map(|d| d.saturation_per_sec)),
        ("direct p50 ms at half saturation", |r| r.direct.as_ref()?.half_saturation.as_ref().map(|h| h.p50_ms)),
        ("direct p99 ms at half saturation", |r| r.direct.as_ref()?.half_saturation.as_ref().map(|h| h.p99_ms)),
        ("direct server CPU s per 1000 (half sat.)", |r| {
            r.direct.as_ref()?.half_saturation.as_ref().map(|h| h.server_cpu_seconds_per_1000)
        }),
        ("group deliveries/s (first size)", |r| r.group.first().map(|g| g.deliveries_per_sec)),
        ("history hit p50 ms", |r| r.history.as_ref().map(|h| h.hit_p50_ms)),
        ("history miss p50 ms", |r| r.history.as_ref().map(|h| h.miss_p50_ms)),
        ("history miss p99 ms", |r| r.history.as_ref().map(|h| h.miss_p99_ms)),
        ("reconnect catch-up s", |r| r.reconnect.as_ref().map(|c| c.seconds_to_caught_up)),
        ("media tickets/s", |r| r.media.as_ref().map(|m| m.tickets_per_sec)),
        ("media completes/s", |r| r.media.as_ref().map(|m| m.completes_per_sec)),
        ("media 12 MP photo complete s", |r| r.media.as_ref().map(|m| m.photo_complete_p50_s)),
        ("notify pushes/s", |r| r.notify.as_ref().map(|n| n.pushes_per_sec)),
        ("notify commit to push p99 ms", |r| r.notify.as_ref().map(|n| n.commit_to_push_p99_ms)),
    ];
    let mut out = String::from("\nside by side (ratio to the first column)\n");
    out += &format!("  {:<40}", "");
    for report in reports {
        let label = match report.trace_sample {
            Some(ratio) => format!("{:?} trace {}%", report.store, ratio * 100.0),
            None => format!("{:?}", report.store),
        };
        out += &format!("  {label:>18}");
    }
    out += "\n";
    for (name, figure) in figures {
        let values: Vec<Option<f64>> = reports.iter().map(figure).collect();
        if values.iter().all(Option::is_none) {
            continue;
        }
        out += &format!("  {name:<40}");
        for value in &values {
            out += &match (value, values[0]) {
                (Some(value), Some(first)) if first > 0.0 => format!("  {value:>10.2} ({:>4.2}x)", value / first),
                (Some(value), _) => format!("  {value:>18.2}"),
                (None, _) => format!("  {:>18}", "-"),
            };
        }
        out += "\n";
    }
    out
}
