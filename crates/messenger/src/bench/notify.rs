//! The notify scenario: push notifications through the outbox to a webhook
//! receiver in this process. Recipients register a webhook device through
//! the SDK and go offline; a sender sends to each in turn. Measured: pushes
//! per second for a burst (first send to last push), and the time from the
//! durable ack (the commit) to the push arriving at an offered rate well
//! below saturation.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{body::Bytes, extract::State, http::StatusCode};
use futures::{StreamExt, stream};
use messenger_client::{Client, PushDevice, PushPlatform};
use messenger_platform::auth::AuthOptions;

use super::{
    BenchOptions,
    clients::{connect_all, drain, histogram, millis},
    report::Notify,
    server::Server,
};

/// (conversation, seq) -> when its push arrived.
type Arrivals = Arc<Mutex<HashMap<(String, u64), Instant>>>;

async fn receive(State(arrivals): State<Arrivals>, body: Bytes) -> StatusCode {
    let now = Instant::now();
    let Ok(push) = serde_json::from_slice::<serde_json::Value>(&body) else { return StatusCode::BAD_REQUEST };
    if push["type"] == "message.created" {
        let key = (
            push["data"]["conversation_id"].as_str().unwrap_or_default().to_owned(),
            push["data"]["seq"].as_u64().unwrap_or(0),
        );
        arrivals.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_insert(now);
    }
    StatusCode::NO_CONTENT
}

/// Sends `count` messages over `conversations` in turn, `rate` per second
/// (0: as fast as the sender's 64 in flight allow); returns each one's ack
/// time by (conversation, seq).
async fn send(
    sender: &Client,
    conversations: &[String],
    count: usize,
    rate: u32,
) -> anyhow::Result<HashMap<(String, u64), Instant>> {
    let started = Instant::now();
    let acks: Vec<anyhow::Result<(String, u64, Instant)>> = stream::iter(0..count)
        .map(|index| async move {
            if rate > 0 {
                let due = started + Duration::from_secs_f64(index as f64 / f64::from(rate));
                tokio::time::sleep_until(due.into()).await;
            }
            let conversation = &conversations[index % conversations.len()];
            let ack = sender.send(conversation, "bench push").await?;
            Ok((conversation.clone(), ack.seq, Instant::now()))
        })
        .buffer_unordered(64)
        .collect()
        .await;
    acks.into_iter().map(|ack| ack.map(|(conversation, seq, at)| ((conversation, seq), at))).collect()
}

/// Waits until every acked message's push arrived (at most 60 s).
async fn arrived(arrivals: &Arrivals, acks: &HashMap<(String, u64), Instant>) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let count = {
            let arrivals = arrivals.lock().unwrap_or_else(|e| e.into_inner());
            acks.keys().filter(|key| arrivals.contains_key(*key)).count()
        };
        if count == acks.len() || Instant::now() > deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn notify(options: &BenchOptions, server: &Server, auth: &AuthOptions) -> anyhow::Result<Notify> {
    let arrivals: Arrivals = Arc::default();
    let app = axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(arrivals.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let id = format!("{:x}", messenger_platform::ids::now_ms());
    let recipients: Vec<String> = (0..options.notify_recipients.max(1)).map(|i| format!("push-{id}-{i}")).collect();
    for (client, events) in connect_all(&server.endpoint, auth, &recipients, 64).await? {
        drain(events);
        let device = PushDevice { platform: PushPlatform::Webhook as i32, token: hook.clone(), ..Default::default() };
        client.register_push_device(device).await?;
        client.close().await;
    }
    let sender_id = format!("push-{id}-sender");
    let (sender, events) = connect_all(&server.endpoint, auth, &[sender_id], 1).await?.remove(0);
    drain(events);
    let mut conversations = Vec::new();
    for recipient in &recipients {
        conversations.push(sender.direct(recipient).await?.conversation_id);
    }
    // Presence drops the recipients' sessions.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let before = server.sample();
    let started = Instant::now();
    // One message per conversation: a conversation's pushes that are due
    // together collapse into one, which would flatter the figure.
    let burst = send(&sender, &conversations, conversations.len(), 0).await?;
    let pushed = arrived(&arrivals, &burst).await;
    let last = {
        let arrivals = arrivals.lock().unwrap_or_else(|e| e.into_inner());
        burst.keys().filter_map(|key| arrivals.get(key)).max().copied().unwrap_or(started)
    };
    let cpu = server.sample().cpu_seconds - before.cpu_seconds;
    let burst_seconds = (last - started).as_secs_f64().max(1e-9);

    let paced_count = (f64::from(options.notify_rate) * options.duration.as_secs_f64()).round() as usize;
    let paced_count = paced_count.clamp(1, conversations.len());
    let paced = send(&sender, &conversations, paced_count, options.notify_rate.max(1)).await?;
    arrived(&arrivals, &paced).await;
    let mut latencies = histogram();
    {
        let arrivals = arrivals.lock().unwrap_or_else(|e| e.into_inner());
        for (key, acked) in &paced {
            if let Some(at) = arrivals.get(key) {
                let _ = latencies.record((at.saturating_duration_since(*acked).as_micros() as u64).max(1));
            }
        }
    }
    sender.close().await;
    Ok(Notify {
        recipients: recipients.len(),
        messages: burst.len(),
        pushed,
        pushes_per_sec: pushed as f64 / burst_seconds,
        server_cpu_ms_per_push: cpu * 1000.0 / pushed.max(1) as f64,
        paced_rate: options.notify_rate,
        paced_pushed: latencies.len() as usize,
        commit_to_push_p50_ms: millis(&latencies, 0.5),
        commit_to_push_p99_ms: millis(&latencies, 0.99),
    })
}
