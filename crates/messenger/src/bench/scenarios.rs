//! The five scenarios. Each uses users of its own (prefixed with a run id),
//! so scenarios never see each other's traffic.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{FutureExt, StreamExt, future::join_all, stream};
use messenger_client::{Client, Event};
use messenger_platform::auth::AuthOptions;

use super::{
    BenchOptions, Transport,
    clients::{Recorder, connect_all, drain, histogram, millis, open_loop, stamped_body},
    report::{Direct, DirectRun, Group, History, Idle, Reconnect},
    server::Server,
    websocket,
};

const CONNECT_CONCURRENCY: usize = 256;
const MAX_INFLIGHT: usize = 50_000;
/// How long a run may take to deliver what it sent after its schedule ends.
const DRAIN: Duration = Duration::from_secs(10);

fn run_id() -> String {
    format!("{:x}", messenger_platform::ids::now_ms())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0 / 1024.0
}

/// Waits until `done()` or `within` passes; returns when it stopped waiting.
async fn wait_until(within: Duration, done: impl Fn() -> bool) -> Instant {
    let deadline = Instant::now() + within;
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Instant::now()
}

/// Clients held open by a scenario, over either transport.
enum Fleet {
    Grpc(Vec<Client>),
    Web(Vec<websocket::WebClient>),
}

impl Fleet {
    async fn close(self) {
        match self {
            Fleet::Grpc(clients) => {
                join_all(clients.iter().map(Client::close)).await;
            }
            // Dropping a session closes its socket.
            Fleet::Web(clients) => drop(clients),
        }
    }
}

/// The browser port of `server`, or why the transport cannot run.
fn web_port(server: &Server) -> anyhow::Result<&str> {
    server.web.as_deref().ok_or_else(|| anyhow::anyhow!("the server has no browser port (give --target-web)"))
}

pub async fn idle(
    options: &BenchOptions,
    server: &Server,
    auth: &AuthOptions,
    transport: Transport,
) -> anyhow::Result<Idle> {
    let id = run_id();
    let users: Vec<String> = (0..options.idle_clients).map(|i| format!("idle-{id}-{i}")).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.sample();
    let started = Instant::now();
    let fleet = match transport {
        Transport::Grpc => {
            let fleet = connect_all(&server.endpoint, auth, &users, CONNECT_CONCURRENCY).await?;
            Fleet::Grpc(
                fleet
                    .into_iter()
                    .map(|(client, events)| {
                        drain(events);
                        client
                    })
                    .collect(),
            )
        }
        Transport::Websocket => {
            let recorder = Recorder::new(false);
            Fleet::Web(websocket::connect_all(web_port(server)?, auth, &users, CONNECT_CONCURRENCY, &recorder).await?)
        }
    };
    let connect_seconds = started.elapsed().as_secs_f64();
    // Let connection setup finish (sync, presence) before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = server.sample();
    let window_start = server.sample();
    tokio::time::sleep(options.idle_window).await;
    let window_end = server.sample();
    fleet.close().await;
    Ok(Idle {
        clients: users.len(),
        connect_seconds,
        server_rss_before_mib: mib(before.rss_bytes),
        server_rss_after_mib: mib(after.rss_bytes),
        server_bytes_per_client: after.rss_bytes.saturating_sub(before.rss_bytes) as f64 / users.len().max(1) as f64,
        idle_server_cpu_percent: (window_end.cpu_seconds - window_start.cpu_seconds)
            / options.idle_window.as_secs_f64()
            * 100.0,
    })
}

/// Who sends in `direct`: an SDK client or a browser-like session.
#[derive(Clone)]
enum Sender {
    Grpc(Client),
    Web(Arc<websocket::WebClient>),
}

impl Sender {
    async fn send(self, conversation: String, body: String) -> bool {
        match self {
            Sender::Grpc(client) => client.send(&conversation, &body).await.is_ok(),
            Sender::Web(client) => client.send(&conversation, &body).await,
        }
    }
}

/// One open-loop run of direct messages at `rate`.
async fn direct_run(
    options: &BenchOptions,
    server: &Server,
    senders: &Arc<Vec<(Sender, String)>>,
    recorder: &Recorder,
    rate: u32,
) -> DirectRun {
    recorder.reset();
    let statements_before = server.statements().await;
    let before = server.sample();
    let started = Instant::now();
    let body_size = options.body_size;
    let senders_for_loop = senders.clone();
    let load = open_loop(rate, options.duration, MAX_INFLIGHT, move |k| {
        let (sender, conversation) = &senders_for_loop[k as usize % senders_for_loop.len()];
        sender.clone().send(conversation.clone(), stamped_body(body_size)).boxed()
    })
    .await;
    let issued = load.issued;
    let finished = wait_until(DRAIN, || recorder.count() >= issued).await;
    let failed = load.finish(Duration::from_secs(1)).await;
    let after = server.sample();
    let latencies = recorder.settle().await;
    let delivered = recorder.count();
    let elapsed = (finished - started).as_secs_f64();
    let cpu = after.cpu_seconds - before.cpu_seconds;
    let mut statements_per_delivered = server.statements().await;
    for (key, count) in &mut statements_per_delivered {
        let sent = *count - statements_before.get(key).copied().unwrap_or_default();
        *count = if delivered > 0 { sent / delivered as f64 } else { 0.0 };
    }
    statements_per_delivered.retain(|_, count| *count > 0.0);
    let run = DirectRun {
        offered_per_sec: rate,
        sent: issued,
        skipped: load.skipped,
        failed,
        delivered,
        delivered_per_sec: delivered as f64 / elapsed,
        server_cpu_cores: cpu / elapsed,
        server_cpu_seconds_per_1000: if delivered > 0 { cpu / delivered as f64 * 1000.0 } else { 0.0 },
        delivered_per_server_cpu_second: if cpu > 0.0 { delivered as f64 / cpu } else { 0.0 },
        p50_ms: millis(&latencies, 0.5),
        p99_ms: millis(&latencies, 0.99),
        p999_ms: millis(&latencies, 0.999),
        statements_per_delivered,
    };
    eprintln!(
        "bench:   offered {rate}/s -> delivered {:.0}/s ({} of {}, {} failed, {} skipped), p99 {:.2} ms, server {:.2} cores",
        run.delivered_per_sec, run.delivered, run.sent, run.failed, run.skipped, run.p99_ms, run.server_cpu_cores
    );
    run
}

pub async fn direct(
    options: &BenchOptions,
    server: &Server,
    auth: &AuthOptions,
    transport: Transport,
) -> anyhow::Result<Direct> {
    let id = run_id();
    let sender_users: Vec<String> = (0..options.pairs).map(|i| format!("direct-{id}-s{i}")).collect();
    let receiver_users: Vec<String> = (0..options.pairs).map(|i| format!("direct-{id}-r{i}")).collect();
    let senders = connect_all(&server.endpoint, auth, &sender_users, CONNECT_CONCURRENCY).await?;
    let recorder = Recorder::new(false);
    let mut pairs = Vec::with_capacity(options.pairs);
    for ((client, events), receiver) in senders.into_iter().zip(&receiver_users) {
        drain(events);
        let conversation = client.direct(receiver).await?.conversation_id;
        pairs.push((client, conversation));
    }
    // Over WebSocket both ends are browser-like sessions; the SDK clients
    // only made the conversations (a unary call the web app makes over gRPC-Web).
    let (senders, receiving): (Vec<(Sender, String)>, Fleet) = match transport {
        Transport::Grpc => {
            let receivers = connect_all(&server.endpoint, auth, &receiver_users, CONNECT_CONCURRENCY).await?;
            // Keep the receiving clients: dropping a client closes its stream.
            let mut receiving = Vec::with_capacity(receivers.len());
            for (client, events) in receivers {
                recorder.spawn(events);
                receiving.push(client);
            }
            let senders = pairs.into_iter().map(|(client, conversation)| (Sender::Grpc(client), conversation));
            (senders.collect(), Fleet::Grpc(receiving))
        }
        Transport::Websocket => {
            let web = web_port(server)?;
            join_all(pairs.iter().map(|(client, _)| client.close())).await;
            let receivers = websocket::connect_all(web, auth, &receiver_users, CONNECT_CONCURRENCY, &recorder).await?;
            // What the senders' own sessions receive (their sends) is not measured.
            let echo = Recorder::new(false);
            let web_senders = websocket::connect_all(web, auth, &sender_users, CONNECT_CONCURRENCY, &echo).await?;
            let senders = web_senders
                .into_iter()
                .zip(pairs)
                .map(|(session, (_, conversation))| (Sender::Web(Arc::new(session)), conversation));
            (senders.collect(), Fleet::Web(receivers))
        }
    };
    // Warm-up, not measured: one message per pair, so every receiving session
    // has met its conversation (the first live message of a conversation in
    // a session makes it sync that conversation first).
    let body = stamped_body(options.body_size);
    join_all(senders.iter().map(|(sender, conversation)| sender.clone().send(conversation.clone(), body.clone())))
        .await;
    wait_until(DRAIN, || recorder.count() >= options.pairs as u64).await;
    let senders = Arc::new(senders);
    let mut runs = Vec::new();
    let mut saturation: f64 = 0.0;
    for &rate in &options.rates {
        let run = direct_run(options, server, &senders, &recorder, rate).await;
        saturation = saturation.max(run.delivered_per_sec);
        let saturated = run.delivered_per_sec < 0.9 * rate as f64 || run.skipped > 0 || run.p99_ms > 2_000.0;
        runs.push(run);
        if saturated {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let half = (saturation / 2.0).round() as u32;
    let half_saturation = if half > 0 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Some(direct_run(options, server, &senders, &recorder, half).await)
    } else {
        None
    };
    receiving.close().await;
    for (sender, _) in senders.iter() {
        if let Sender::Grpc(client) = sender {
            client.close().await;
        }
    }
    Ok(Direct {
        pairs: options.pairs,
        body_size: options.body_size,
        runs,
        saturation_per_sec: saturation,
        half_saturation,
    })
}

pub async fn group(options: &BenchOptions, server: &Server, auth: &AuthOptions) -> anyhow::Result<Vec<Group>> {
    let mut results = Vec::new();
    for &size in &options.group_sizes {
        let id = run_id();
        let users: Vec<String> = (0..size.max(2)).map(|i| format!("group-{id}-{i}")).collect();
        eprintln!("bench:   group of {size}: connecting");
        let mut fleet = connect_all(&server.endpoint, auth, &users, CONNECT_CONCURRENCY).await?;
        let (owner, owner_events) = fleet.remove(0);
        drain(owner_events);
        let members: Vec<&str> = users[1..].iter().map(String::as_str).collect();
        let conversation = owner.create_group(&format!("bench {size}"), &members).await?.conversation_id;
        let recorder = Recorder::new(true);
        let mut clients = Vec::with_capacity(fleet.len());
        for (client, events) in fleet {
            recorder.spawn(events);
            clients.push(client);
        }
        // The creation entry reaches everyone first; then measure.
        let recipients = (users.len() - 1) as u64;
        wait_until(DRAIN, || recorder.count() >= recipients).await;
        let run = GroupRun {
            server,
            owner: &owner,
            readers: &clients,
            conversation: &conversation,
            recorder: &recorder,
            recipients,
        };
        let first = run.measure(options, options.group_rate, false).await;
        // Latency at saturation only measures the queue: like `direct`, run
        // once more at half of what was delivered.
        let offered = f64::from(options.group_rate) * recipients as f64;
        let saturated = first.deliveries_per_sec < 0.9 * offered || first.messages_reaching_everyone < first.messages;
        let half_rate = (first.deliveries_per_sec / recipients as f64 / 2.0).floor() as u32;
        results.push(first);
        if saturated && half_rate > 0 {
            // The saturated run's backlog must not count in this one.
            server.settle().await;
            results.push(run.measure(options, half_rate, true).await);
        }
        join_all(clients.iter().chain([&owner]).map(Client::close)).await;
    }
    Ok(results)
}

/// Of the cache reads of `kind` between two samples, the share that hit
/// (None without a metrics port or without such reads).
fn hit_ratio(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
    kind: &str,
) -> Option<f64> {
    let delta = |result: &str| {
        let key = format!("{kind}/{result}");
        after.get(&key).copied().unwrap_or(0.0) - before.get(&key).copied().unwrap_or(0.0)
    };
    let (hits, misses) = (delta("hit"), delta("miss") + delta("bypass"));
    (hits + misses > 0.0).then(|| hits / (hits + misses))
}

/// One group, connected, measured at a given rate.
struct GroupRun<'a> {
    server: &'a Server,
    owner: &'a Client,
    /// Members that open the conversation (read its newest page) while it is busy.
    readers: &'a [Client],
    conversation: &'a str,
    recorder: &'a Recorder,
    recipients: u64,
}

impl GroupRun<'_> {
    async fn measure(&self, options: &BenchOptions, rate: u32, at_half_saturation: bool) -> Group {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.recorder.reset();
        let before = self.server.sample();
        let started = Instant::now();
        let body_size = options.body_size;
        let (sender, target) = (self.owner.clone(), self.conversation.to_owned());
        let cache_before = self.server.cache_reads().await;
        let load = open_loop(rate, options.duration, MAX_INFLIGHT, move |_| {
            let (sender, target) = (sender.clone(), target.clone());
            async move { sender.send(&target, &stamped_body(body_size)).await.is_ok() }.boxed()
        });
        // Meanwhile members open the conversation, 10 a second, each a
        // history read that asks for the reader's membership first.
        let reads = async {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            for reader in self.readers.iter().cycle() {
                tick.tick().await;
                let _ = reader.history(self.conversation, 0, 20).await;
            }
            std::future::pending::<()>().await
        };
        let load = tokio::select! {
            load = load => load,
            () = reads => unreachable!("the readers read until the load ends"),
        };
        let cache_after = self.server.cache_reads().await;
        let expected = load.issued * self.recipients;
        let finished = wait_until(DRAIN, || self.recorder.count() >= expected).await;
        load.finish(Duration::from_secs(1)).await;
        let after = self.server.sample();
        self.recorder.settle().await;
        let elapsed = (finished - started).as_secs_f64();
        let cpu = after.cpu_seconds - before.cpu_seconds;
        let deliveries = self.recorder.count();
        let mut last_member = histogram();
        let per_message = self.recorder.per_message.as_ref().expect("per-message recording");
        let mut reached_all = 0;
        for (count, slowest) in per_message.lock().unwrap_or_else(|e| e.into_inner()).values() {
            if u64::from(*count) >= self.recipients {
                reached_all += 1;
                let _ = last_member.record(*slowest);
            }
        }
        let result = Group {
            members: self.recipients as usize + 1,
            offered_messages_per_sec: rate,
            at_half_saturation,
            messages: load.issued,
            deliveries,
            deliveries_per_sec: deliveries as f64 / elapsed,
            deliveries_per_server_cpu_second: if cpu > 0.0 { deliveries as f64 / cpu } else { 0.0 },
            messages_reaching_everyone: reached_all,
            last_member_p50_ms: millis(&last_member, 0.5),
            last_member_p99_ms: millis(&last_member, 0.99),
            membership_cache_hit_ratio: hit_ratio(&cache_before, &cache_after, "member"),
        };
        eprintln!(
            "bench:   group of {} at {rate} msgs/s: {:.0} deliveries/s, last member p99 {:.2} ms",
            result.members, result.deliveries_per_sec, result.last_member_p99_ms
        );
        result
    }
}

pub async fn history(options: &BenchOptions, server: &Server, auth: &AuthOptions) -> anyhow::Result<History> {
    let id = run_id();
    let users = vec![format!("history-{id}-a"), format!("history-{id}-b")];
    let mut fleet = connect_all(&server.endpoint, auth, &users, 2).await?;
    let (reader, reader_events) = fleet.pop().expect("two clients");
    let (writer, writer_events) = fleet.pop().expect("two clients");
    drain(reader_events);
    drain(writer_events);
    let conversation = writer.direct(&users[1]).await?.conversation_id;
    let body = "h".repeat(options.body_size);
    let sends = stream::iter(0..options.history_messages)
        .map(|_| writer.send(&conversation, &body))
        .buffer_unordered(512)
        .collect::<Vec<_>>()
        .await;
    sends.into_iter().collect::<Result<Vec<_>, _>>()?;
    let page_size = 50;
    // Older pages are never cached (misses: store reads); the newest page is
    // what opening a conversation reads, and is cached after the first read (hits).
    let mut misses = histogram();
    let mut hits = histogram();
    let mut position = 0u64;
    for _ in 0..options.history_reads {
        // Spread reads over the whole conversation (a cheap deterministic walk).
        position = (position + 7_919) % (options.history_messages as u64 - page_size as u64);
        let before_seq = position + 1 + page_size as u64;
        let started = Instant::now();
        let page = reader.history(&conversation, before_seq, page_size).await?;
        let _ = misses.record((started.elapsed().as_micros() as u64).max(1));
        anyhow::ensure!(!page.messages.is_empty(), "history page came back empty");
        let started = Instant::now();
        let newest = reader.history(&conversation, 0, page_size).await?;
        let _ = hits.record((started.elapsed().as_micros() as u64).max(1));
        anyhow::ensure!(newest.messages.len() == page_size as usize, "newest page came back short");
    }
    Ok(History {
        messages: options.history_messages,
        reads: options.history_reads,
        page_size,
        hit_p50_ms: millis(&hits, 0.5),
        hit_p99_ms: millis(&hits, 0.99),
        miss_p50_ms: millis(&misses, 0.5),
        miss_p99_ms: millis(&misses, 0.99),
    })
}

pub async fn reconnect(options: &BenchOptions, server: &Server, auth: &AuthOptions) -> anyhow::Result<Reconnect> {
    let id = run_id();
    let late_user = format!("reconnect-{id}-late");
    let senders: Vec<String> = (0..options.reconnect_conversations).map(|i| format!("reconnect-{id}-s{i}")).collect();
    let fleet = connect_all(&server.endpoint, auth, &senders, CONNECT_CONCURRENCY).await?;
    let body = "r".repeat(options.body_size);
    let per = options.reconnect_messages;
    let work = fleet.into_iter().map(|(client, events)| {
        drain(events);
        let (late_user, body) = (late_user.clone(), body.clone());
        async move {
            let conversation = client.direct(&late_user).await?.conversation_id;
            let sends = stream::iter(0..per).map(|_| client.send(&conversation, &body)).buffer_unordered(64);
            sends.collect::<Vec<_>>().await.into_iter().collect::<Result<Vec<_>, _>>()?;
            Ok::<_, messenger_client::Error>(client)
        }
    });
    let clients = join_all(work).await.into_iter().collect::<Result<Vec<_>, _>>()?;
    let missed = options.reconnect_conversations * per;
    let started = Instant::now();
    let mut late = connect_all(&server.endpoint, auth, std::slice::from_ref(&late_user), 1).await?;
    let (late_client, mut events) = late.pop().expect("one client");
    let mut received = 0;
    tokio::time::timeout(Duration::from_secs(120), async {
        while received < missed {
            match events.next().await {
                Some(Event::Message(_)) => received += 1,
                Some(_) => {}
                None => break,
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("reconnect: only {received} of {missed} messages within 120 s"))?;
    let seconds = started.elapsed().as_secs_f64();
    late_client.close().await;
    join_all(clients.iter().map(Client::close)).await;
    Ok(Reconnect {
        conversations: options.reconnect_conversations,
        missed_messages: missed,
        seconds_to_caught_up: seconds,
    })
}
