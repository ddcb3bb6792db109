//! The notify service over gRPC, as message instances and gateways use it,
//! pushing to loopback fakes of each platform that check what the real one
//! checks: APNs over HTTP/2 + TLS verifying the ES256 provider token and the
//! headers; FCM with its OAuth token endpoint verifying the service
//! account's RS256 assertion; a Web Push receiver that checks the VAPID JWT
//! and decrypts each payload with the subscription's private key (and, in
//! one test, Python's `http_ece` decrypts it too).

mod fake_apns;
mod fake_fcm;
mod fake_web_push;
mod tls;

use std::{path::Path, sync::Arc, time::Duration};

use messenger_notify::{Options, store::PushStore};
use messenger_platform::{server::ServerOptions, supervise::Supervisor};
use messenger_proto::v1::{self as pb, notify_service_client::NotifyServiceClient};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(10);

/// A notify service on a loopback port, its store kept on disk in `dir`.
pub struct Notify {
    pub client: NotifyServiceClient<Channel>,
    pub store: Arc<dyn PushStore>,
    shutdown: CancellationToken,
}

impl Drop for Notify {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Options every test starts from: pushes leave at once, retries come fast.
pub fn options() -> Options {
    Options {
        read_grace: Duration::ZERO,
        poll_interval: Duration::from_millis(20),
        retry_initial_delay: Duration::from_millis(100),
        credentials_reload_interval: Duration::from_millis(100),
        ..Options::default()
    }
}

pub async fn start(options: Options, dir: &Path) -> Notify {
    let shutdown = CancellationToken::new();
    let deps = messenger_notify::Deps {
        server: ServerOptions::default(),
        tls: None,
        supervisor: Supervisor::new(shutdown.clone()),
        data_dir: dir.to_owned(),
        scylla: Default::default(),
    };
    let server = messenger_notify::Server::build(options, deps).await.unwrap();
    let store = server.store();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(server.serve(listener, shutdown.clone()));
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
    Notify { client: NotifyServiceClient::new(channel), store, shutdown }
}

impl Notify {
    pub async fn register(&self, user: &str, device: pb::PushDevice) -> pb::RegisterPushDeviceResponse {
        let request = pb::NotifyRegisterDeviceRequest { user_id: user.into(), device: Some(device) };
        self.client.clone().register_device(request).await.unwrap().into_inner()
    }

    pub async fn devices(&self, user: &str) -> Vec<String> {
        let request = pb::NotifyListDevicesRequest { user_id: user.into() };
        let devices = self.client.clone().list_devices(request).await.unwrap().into_inner().devices;
        devices.into_iter().map(|device| device.device_id).collect()
    }

    /// Hands over a committed text message of `conversation` from alice for
    /// `user`, whose devices are all offline.
    pub async fn message(&self, user: &str, conversation: &str, seq: u64, body: &str) -> u32 {
        let entry = pb::PushEntry {
            conversation_id: conversation.into(),
            seq,
            sender_id: "alice".into(),
            kind: pb::MessageKind::Text as i32,
            body: body.into(),
            title: String::new(),
            sent_at_ms: messenger_platform::ids::now_ms(),
            recipients: vec![pb::PushRecipient { user_id: user.into(), online_device_ids: Vec::new() }],
        };
        let request = pb::EnqueueRequest { entries: vec![entry] };
        self.client.clone().enqueue(request).await.unwrap().into_inner().queued
    }

    pub async fn read(&self, user: &str, conversation: &str, read_seq: u64) -> pb::NotifyReadResponse {
        let request = pb::NotifyReadRequest { user_id: user.into(), conversation_id: conversation.into(), read_seq };
        self.client.clone().read(request).await.unwrap().into_inner()
    }
}

/// Polls `check` until it holds or `WAIT` passes.
pub async fn eventually<F: FnMut() -> bool>(what: &str, mut check: F) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn conversation() -> String {
    uuid::Uuid::now_v7().to_string()
}

mod apns;
mod fcm;
mod web_push;
