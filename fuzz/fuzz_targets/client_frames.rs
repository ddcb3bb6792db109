//! Decodes the input as a sequence of length-delimited `ClientFrame`s and
//! plays it on a real Connect stream to a whole system running in process
//! (every service on loopback, SQLite): any panic in any task aborts, and a
//! stream that neither ends nor answers within 10 s counts as a hang.
//!
//! The first byte's low bit puts a Hello in front (most inputs then get past
//! it); a `conversation_id` of "c" is replaced by a direct conversation the
//! fuzz user really has, so sends, reads, acks and typing reach the store.

#![no_main]

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use libfuzzer_sys::fuzz_target;
use messenger_proto::v1::{self as pb, client_frame::Frame, gateway_service_client::GatewayServiceClient};
use prost::Message as _;

/// Frames taken from one input (the rest is ignored).
const MAX_FRAMES: usize = 64;

struct Target {
    runtime: tokio::runtime::Runtime,
    endpoint: String,
    token: String,
    conversation: String,
    sessions: AtomicU64,
    _running: messenger::system::Running,
    _dir: tempfile::TempDir,
}

/// The fuzz user's limits are far above anything an input can reach: limits
/// have their own tests; here they would only cut inputs short.
const UNLIMITED: &str = r#"
[gateway]
sends_per_second = 1000000
send_burst = 1000000
typing_per_second = 1000000
[gateway.rate_limits]
reads = { per_second = 1000000, burst = 1000000 }
modifications = { per_second = 1000000, burst = 1000000 }
group_changes = { per_second = 1000000, burst = 1000000 }
direct_conversations = { per_second = 1000000, burst = 1000000 }
queries = { per_second = 1000000, burst = 1000000 }
connects_per_user = { per_second = 1000000, burst = 1000000 }
connects_per_address = { per_second = 1000000, burst = 1000000 }
max_pre_hello_streams_per_address = 1000000
"#;

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut config = messenger::Config::for_loopback(dir.path());
        let limits: messenger::Config = messenger_platform::config::parse(UNLIMITED).expect("limits parse");
        config.gateway.rate_limits = limits.gateway.rate_limits;
        config.gateway.sends_per_second = limits.gateway.sends_per_second;
        config.gateway.send_burst = limits.gateway.send_burst;
        config.gateway.typing_per_second = limits.gateway.typing_per_second;
        let token = messenger_platform::auth::mint_hs256(&config.auth, "fuzz", Duration::from_secs(86_400)).unwrap();
        let (running, conversation) = runtime.block_on(async {
            let running = messenger::system::start(config.clone(), &messenger::system::ALL_ROLES).await.unwrap();
            let mut client = client(&running.endpoint()).await;
            let request = authorized(&token, pb::GetOrCreateDirectRequest { peer_id: "peer".into() });
            let direct = client.get_or_create_direct(request).await.unwrap().into_inner();
            (running, direct.conversation.unwrap().conversation_id)
        });
        Target {
            endpoint: running.endpoint(),
            runtime,
            token,
            conversation,
            sessions: AtomicU64::new(0),
            _running: running,
            _dir: dir,
        }
    })
}

async fn client(endpoint: &str) -> GatewayServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned()).unwrap().connect().await.unwrap();
    GatewayServiceClient::new(channel)
}

fn authorized<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn frames(data: &[u8], conversation: &str, session: u64) -> Vec<pb::ClientFrame> {
    let Some((&first, mut rest)) = data.split_first() else { return Vec::new() };
    let mut frames = Vec::new();
    if first & 1 == 1 {
        // A device per session: sessions never take each other's place.
        frames.push(pb::ClientFrame {
            frame: Some(Frame::Hello(pb::Hello { device_id: format!("d{session}"), ..Default::default() })),
            trace_context: Default::default(),
        });
    }
    while !rest.is_empty() && frames.len() < MAX_FRAMES {
        let Ok(mut frame) = pb::ClientFrame::decode_length_delimited(&mut rest) else { break };
        let id = match &mut frame.frame {
            Some(Frame::Send(send)) => Some(&mut send.conversation_id),
            Some(Frame::Read(read)) => Some(&mut read.conversation_id),
            Some(Frame::Typing(typing)) => Some(&mut typing.conversation_id),
            Some(Frame::Ack(ack)) => Some(&mut ack.conversation_id),
            _ => None,
        };
        if let Some(id) = id.filter(|id| id.as_str() == "c") {
            *id = conversation.to_owned();
        }
        frames.push(frame);
    }
    frames
}

fuzz_target!(|data: &[u8]| {
    let target = target();
    let session = target.sessions.fetch_add(1, Ordering::Relaxed);
    let frames = frames(data, &target.conversation, session);
    target.runtime.block_on(async {
        let mut client = client(&target.endpoint).await;
        let request = authorized(&target.token, futures::stream::iter(frames));
        let played = tokio::time::timeout(Duration::from_secs(10), async {
            // Refused at once (a status) or answered until the stream ends.
            let Ok(response) = client.connect(request).await else { return };
            let mut stream = response.into_inner();
            while let Ok(Some(_)) = stream.message().await {}
        })
        .await;
        assert!(played.is_ok(), "the stream neither ended nor answered within 10 s");
    });
});
