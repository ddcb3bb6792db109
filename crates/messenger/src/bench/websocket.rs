//! Browser-like sessions: the gateway's WebSocket transport, spoken as the
//! web app speaks it (Hello with the token, one protobuf frame per message,
//! an Ack for every message received), so `idle` and `direct` measure it
//! beside the gRPC stream.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use futures::{SinkExt, StreamExt, stream};
use messenger_platform::auth::{AuthOptions, mint_hs256};
use messenger_proto::v1::{self as pb, client_frame::Frame as In, server_frame::Frame as Out};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest, http::HeaderValue};

use super::clients::{PER_SOURCE_ADDRESS, Recorder};

/// Frames a session may have waiting for its socket.
const OUTBOUND_DEPTH: usize = 1024;
/// How long a send waits for its SendAck.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// One open WebSocket session; its socket closes when this is dropped.
pub struct WebClient {
    outbound: mpsc::Sender<pb::ClientFrame>,
    /// Sends awaiting their SendAck (true) or Error (false), by client_msg_id.
    pending: Arc<Mutex<HashMap<String, oneshot::Sender<bool>>>>,
    next_id: AtomicU64,
}

impl WebClient {
    /// Sends `body` and waits for its ack; false when refused or not acked in time.
    pub async fn send(&self, conversation_id: &str, body: &str) -> bool {
        let client_msg_id = format!("web-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let (acked, answer) = oneshot::channel();
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(client_msg_id.clone(), acked);
        let send = pb::SendRequestFrame {
            conversation_id: conversation_id.to_owned(),
            client_msg_id: client_msg_id.clone(),
            body: body.to_owned(),
            ..Default::default()
        };
        let acked = self.outbound.send(frame(In::Send(send))).await.is_ok()
            && matches!(tokio::time::timeout(SEND_TIMEOUT, answer).await, Ok(Ok(true)));
        // Not answered (in time): nobody waits for it any more.
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&client_msg_id);
        acked
    }
}

fn frame(frame: In) -> pb::ClientFrame {
    pb::ClientFrame { frame: Some(frame), trace_context: Default::default() }
}

/// Opens a session for each of `users` on the browser port at `web`
/// (`host:port`), `concurrency` at a time, in the order of `users`; every
/// message each receives goes to `recorder`.
pub async fn connect_all(
    web: &str,
    auth: &AuthOptions,
    users: &[String],
    concurrency: usize,
    recorder: &Recorder,
) -> anyhow::Result<Vec<WebClient>> {
    let address: SocketAddr = tokio::net::lookup_host(web).await?.next().context("no address for the web port")?;
    let total = users.len();
    let results: Vec<anyhow::Result<WebClient>> = stream::iter(users.iter().enumerate())
        .map(|(index, user)| async move {
            let token = mint_hs256(auth, user, Duration::from_secs(24 * 3600))?;
            let local = (total > PER_SOURCE_ADDRESS)
                .then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (index / PER_SOURCE_ADDRESS) as u8)));
            connect(address, &token, local, recorder.clone()).await
        })
        .buffered(concurrency)
        .collect()
        .await;
    results.into_iter().collect()
}

async fn connect(
    address: SocketAddr,
    token: &str,
    local: Option<IpAddr>,
    recorder: Recorder,
) -> anyhow::Result<WebClient> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    if let Some(local) = local {
        socket.bind(SocketAddr::new(local, 0))?;
    }
    let tcp = socket.connect(address).await?;
    tcp.set_nodelay(true)?;
    let mut request = format!("ws://{address}/v1/stream").into_client_request()?;
    request.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static("messenger.v1"));
    let (socket, _) = tokio_tungstenite::client_async(request, tcp).await?;
    let (mut sink, mut source) = socket.split();
    let hello = pb::Hello { device_id: "bench-browser".into(), access_token: token.to_owned() };
    sink.send(Message::Binary(frame(In::Hello(hello)).encode_to_vec().into())).await?;
    match tokio::time::timeout(Duration::from_secs(30), source.next()).await {
        Ok(Some(Ok(Message::Binary(bytes)))) => match pb::ServerFrame::decode(bytes)?.frame {
            Some(Out::Ready(_)) => {}
            other => bail!("expected Ready, got {other:?}"),
        },
        other => bail!("no Ready: {other:?}"),
    }
    let (outbound, mut queued) = mpsc::channel::<pb::ClientFrame>(OUTBOUND_DEPTH);
    tokio::spawn(async move {
        while let Some(frame) = queued.recv().await {
            if sink.send(Message::Binary(frame.encode_to_vec().into())).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    let pending: Arc<Mutex<HashMap<String, oneshot::Sender<bool>>>> = Arc::default();
    let (acks, answers) = (outbound.downgrade(), pending.clone());
    tokio::spawn(async move {
        while let Some(Ok(message)) = source.next().await {
            let Message::Binary(bytes) = message else { continue };
            let Ok(pb::ServerFrame { frame: Some(received) }) = pb::ServerFrame::decode(bytes) else { continue };
            match received {
                Out::Message(message) => {
                    recorder.record(&message.conversation_id, message.seq, &message.body);
                    let ack = pb::Ack { conversation_id: message.conversation_id, seq: message.seq };
                    // As the web app: every message received is acked.
                    match acks.upgrade() {
                        Some(acks) => {
                            let _ = acks.try_send(frame(In::Ack(ack)));
                        }
                        None => return,
                    }
                }
                Out::SendAck(ack) => answer(&answers, &ack.client_msg_id, true),
                Out::Error(error) if !error.client_msg_id.is_empty() => answer(&answers, &error.client_msg_id, false),
                _ => {}
            }
        }
        // The socket is gone: every send still waiting fails now, not at its timeout.
        answers.lock().unwrap_or_else(|e| e.into_inner()).clear();
    });
    Ok(WebClient { outbound, pending, next_id: AtomicU64::new(0) })
}

fn answer(pending: &Mutex<HashMap<String, oneshot::Sender<bool>>>, client_msg_id: &str, acked: bool) {
    if let Some(waiting) = pending.lock().unwrap_or_else(|e| e.into_inner()).remove(client_msg_id) {
        let _ = waiting.send(acked);
    }
}
