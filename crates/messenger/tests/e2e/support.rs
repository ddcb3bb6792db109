//! What every end-to-end test uses: the system started in-process on loopback
//! ports, and SDK clients connected to it.

use std::time::Duration;

use messenger::{Config, system};
use messenger_client::{Client, Event, Events, Message, Options};
use messenger_platform::auth;
use tempfile::TempDir;

pub const WAIT: Duration = Duration::from_secs(15);

/// Whether this run puts the message store on the suite's CQL node
/// (`MESSENGER_TEST_STORE=scylla`, as `scripts/test.sh` runs the suite a
/// second time) instead of SQLite.
pub fn on_scylla() -> bool {
    std::env::var("MESSENGER_TEST_STORE").is_ok_and(|store| store == "scylla")
}

/// A fresh keyspace on the shared Cassandra node (or `MESSENGER_TEST_SCYLLA`).
pub async fn scylla_cluster() -> messenger_platform::cql::Cluster {
    let node = tokio::task::spawn_blocking(messenger_testkit::shared_cassandra).await.unwrap();
    let keyspace = format!("e2e_{}", uuid::Uuid::now_v7().simple());
    messenger_platform::cql::Cluster { nodes: vec![node], keyspace, migrate_on_start: true, ..Default::default() }
}

/// Drops a test's keyspace (hundreds of them would fill the node's heap).
/// Blocking: called from `Drop`, on a thread of its own with its own runtime.
pub fn drop_keyspace(options: &messenger_platform::cql::Cluster) {
    let (nodes, keyspace) = (options.nodes.clone(), options.keyspace.clone());
    let dropped = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let session = scylla::client::session_builder::SessionBuilder::new().known_nodes(&nodes).build().await?;
            let mut drop = scylla::statement::unprepared::Statement::new(format!("DROP KEYSPACE IF EXISTS {keyspace}"));
            drop.set_request_timeout(Some(Duration::from_secs(60)));
            session.query_unpaged(drop, &[]).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
    })
    .join();
    if let Ok(Err(error)) = dropped {
        eprintln!("could not drop keyspace {}: {error}", options.keyspace);
    }
}

pub struct TestSystem {
    pub running: Option<system::Running>,
    /// The configuration with every port pinned to what was bound, so a restart reuses them.
    pub config: Config,
    pub endpoint: String,
    _dir: TempDir,
}

impl Drop for TestSystem {
    fn drop(&mut self) {
        if self.config.message.store == messenger_message::StoreBackend::Scylla {
            drop_keyspace(&self.config.scylla);
        }
    }
}

impl TestSystem {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::for_loopback(dir.path());
        config.message.max_body_bytes = 1024;
        config.server.drain_grace = Duration::from_secs(2);
        // Tests that push volume are not about the rate limit; the one that is sets its own.
        config.gateway.sends_per_second = 100_000;
        config.gateway.send_burst = 100_000;
        if on_scylla() {
            config.message.store = messenger_message::StoreBackend::Scylla;
            config.scylla = scylla_cluster().await;
            // The media records and the push outbox go in the same keyspace.
            config.media.store = messenger_media::StoreBackend::Scylla;
            config.notify.store = messenger_notify::StoreBackend::Scylla;
        }
        adjust(&mut config);
        let running = system::start(config.clone(), &system::ALL_ROLES).await.unwrap();
        let bound = &running.addresses;
        config.gateway.listen = bound.gateway.unwrap().to_string();
        config.gateway.internal_listen = bound.gateway_internal.unwrap().to_string();
        config.gateway.web.listen = bound.web.unwrap().to_string();
        config.message.listen = bound.message.unwrap().to_string();
        config.presence.listen = bound.presence.unwrap().to_string();
        config.media.listen = bound.media.unwrap().to_string();
        config.admin.listen = bound.admin.unwrap().to_string();
        if let Some(objects) = &bound.objects {
            config.media.s3.embedded_listen = objects.trim_start_matches("http://").to_owned();
        }
        let endpoint = running.endpoint();
        Self { running: Some(running), config, endpoint, _dir: dir }
    }

    pub async fn stop(&mut self) {
        self.running.take().expect("running").stop().await.unwrap();
    }

    /// Starts again on the same ports and data directory.
    pub async fn start_again(&mut self) {
        let mut last = None;
        for _ in 0..100 {
            match system::start(self.config.clone(), &system::ALL_ROLES).await {
                Ok(running) => {
                    self.running = Some(running);
                    return;
                }
                Err(error) => last = Some(error),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("could not start again on the same ports: {last:?}");
    }

    /// Where the embedded object store keeps its files.
    pub fn objects_dir(&self) -> std::path::PathBuf {
        self.config.data_dir.join("objects")
    }

    pub fn token(&self, user: &str) -> String {
        auth::mint_hs256(&self.config.auth, user, Duration::from_secs(3600)).unwrap()
    }

    pub fn options(&self, user: &str, device: &str) -> Options {
        let mut options = Options::new(self.endpoint.clone(), self.token(user), device);
        options.reconnect_min = Duration::from_millis(50);
        options.reconnect_max = Duration::from_millis(300);
        options.ack_interval = Duration::from_millis(10);
        // Cassandra's LWTs (one per send to claim its id) are several times
        // slower than ScyllaDB's: bursts of thousands take longer there.
        options.send_timeout = Duration::from_secs(if on_scylla() { 60 } else { 20 });
        options
    }

    pub async fn connect(&self, user: &str, device: &str) -> (Client, Events) {
        Client::connect(self.options(user, device)).await.unwrap()
    }
}

/// The next message event, skipping connection events.
pub async fn next_message(events: &mut Events) -> Message {
    loop {
        // On Cassandra a killed instance's in-flight send is taken over only
        // after 2 x lock_timeout (12 s in the cluster tests), under load.
        let wait = if on_scylla() { WAIT * 3 } else { WAIT };
        match tokio::time::timeout(wait, events.next()).await.expect("no message in time") {
            Some(Event::Message(message)) => return message,
            Some(_) => continue,
            None => panic!("event stream ended"),
        }
    }
}

pub async fn messages(events: &mut Events, count: usize) -> Vec<Message> {
    let mut received = Vec::with_capacity(count);
    while received.len() < count {
        received.push(next_message(events).await);
    }
    received
}

/// Asserts no further message arrives within a short quiet period.
pub async fn assert_quiet(events: &mut Events) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(400);
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_) => return,
            Ok(Some(Event::Message(message))) => panic!("unexpected message {message:?}"),
            Ok(Some(_)) => continue,
            Ok(None) => return,
        }
    }
}

/// Reads a message straight from the store through a connection of its own
/// (a separate SQLite connection, or a new CQL session): it is visible
/// there only once committed.
pub async fn committed_body(config: &Config, conversation_id: &str, seq: u64) -> Option<String> {
    if on_scylla() {
        use messenger_message::store::{HistoryRange, MessageStore, SeqBounds};
        let store =
            messenger_message::scylla::ScyllaStore::connect(&config.scylla, &config.message.scylla).await.unwrap();
        let id = conversation_id.parse().unwrap();
        let page = store.history(id, HistoryRange::After(seq - 1), SeqBounds::ALL, 1).await.unwrap();
        return page.into_iter().find(|m| m.seq == seq).map(|m| m.body);
    }
    use r2d2_sqlite::rusqlite::{Connection, OpenFlags, OptionalExtension};
    let connection = Connection::open_with_flags(config.database_path(), OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    connection
        .query_row(
            "SELECT body FROM messages WHERE conversation_id = ?1 AND seq = ?2",
            (conversation_id, seq as i64),
            |row| row.get(0),
        )
        .optional()
        .unwrap()
}

/// A gateway client without the SDK, on `channel`: for tests that misbehave on purpose.
pub type RawClient = messenger_proto::v1::gateway_service_client::GatewayServiceClient<tonic::transport::Channel>;

impl TestSystem {
    /// A fresh HTTP/2 connection to the gateway.
    pub async fn raw_channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.endpoint.clone()).unwrap().connect().await.unwrap()
    }

    /// `message` with `user`'s bearer token attached.
    pub fn authorized<T>(&self, user: &str, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert("authorization", format!("Bearer {}", self.token(user)).parse().unwrap());
        request
    }

    /// Opens a Connect stream whose first frame is Hello: the sender feeds
    /// further client frames (drop it to end the client's side).
    pub async fn raw_stream(
        &self,
        channel: tonic::transport::Channel,
        user: &str,
        device: &str,
    ) -> (tokio::sync::mpsc::Sender<messenger_proto::v1::ClientFrame>, tonic::Streaming<messenger_proto::v1::ServerFrame>)
    {
        let (frames, frames_rx) = tokio::sync::mpsc::channel(8);
        frames.send(hello(device)).await.unwrap();
        let request = self.authorized(user, tokio_stream::wrappers::ReceiverStream::new(frames_rx));
        let stream = RawClient::new(channel).connect(request).await.unwrap().into_inner();
        (frames, stream)
    }
}

pub fn hello(device: &str) -> messenger_proto::v1::ClientFrame {
    use messenger_proto::v1::{self as pb, client_frame::Frame};
    pb::ClientFrame {
        trace_context: Default::default(),
        frame: Some(Frame::Hello(pb::Hello { device_id: device.into(), ..Default::default() })),
    }
}

/// The next presence update, skipping other events; None if none comes soon.
pub async fn presence_update(events: &mut Events) -> Option<messenger_client::PresenceUpdate> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(Event::Presence(update))) => return Some(update),
            Ok(Some(_)) => continue,
            Err(_) | Ok(None) => return None,
        }
    }
}

/// A TCP relay in front of the gateway's internal port (the address the
/// gateway advertises for `Deliver`), whose link can be cut: while cut,
/// open connections are reset and new ones closed at once, so the message
/// service's `Deliver` calls fail as they would over a broken network.
pub struct DeliveryLink {
    address: std::net::SocketAddr,
    target: std::sync::Arc<std::sync::OnceLock<std::net::SocketAddr>>,
    cut: tokio::sync::watch::Sender<bool>,
}

impl DeliveryLink {
    pub async fn bind() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let target = std::sync::Arc::new(std::sync::OnceLock::<std::net::SocketAddr>::new());
        let (cut, _) = tokio::sync::watch::channel(false);
        let (relay_target, watch) = (target.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cut = watch.subscribe();
                let Some(&target) = relay_target.get() else { continue };
                if *cut.borrow_and_update() {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Self { address, target, cut }
    }

    /// Routes the gateway's `Deliver` calls through this link.
    pub fn route(&self, config: &mut Config) {
        config.gateway.advertise_internal = Some(self.address.to_string());
    }

    /// Where the link leads: the gateway's bound internal port.
    pub fn lead_to(&self, system: &TestSystem) {
        let internal = system.config.gateway.internal_listen.parse().unwrap();
        self.target.set(internal).expect("lead_to is called once");
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}
