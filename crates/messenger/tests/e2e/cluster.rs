//! Distributed mode, as separate OS processes of the `messenger` binary: a
//! real etcd and redis-server, one presence, two message services sharing
//! one database, two gateways. Clients chat across gateways, and instances
//! are killed (`kill -9`), paused (SIGSTOP) and etcd restarted under them;
//! every check is a count.

use std::{
    collections::HashSet,
    fs::File,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use messenger_client::{Client, Events, Options};
use messenger_platform::discovery::{Discovery, EtcdDiscovery, EtcdOptions, Role, rank};
use messenger_testkit::{EtcdServer, RedisServer, free_port};
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// How long a registration outlives its instance in these tests.
const LEASE_TTL: Duration = Duration::from_secs(2);

struct Node {
    name: String,
    role: Role,
    config: PathBuf,
    child: Option<Child>,
    /// The port others reach it at (for a gateway: its public port).
    port: u16,
    /// Its admin port (`/metrics`).
    admin: u16,
}

struct Cluster {
    dir: tempfile::TempDir,
    etcd: EtcdServer,
    _redis: RedisServer,
    nodes: Vec<Node>,
    discovery: Arc<EtcdDiscovery>,
    watching: CancellationToken,
    auth: messenger_platform::auth::AuthOptions,
    /// Every hop is mutual TLS, each process with its own role's certificate.
    certs: messenger::certs::Generated,
    /// With `MESSENGER_TEST_STORE=scylla`: the keyspace both message
    /// instances share on the CQL node (else they share one SQLite file).
    scylla: Option<messenger_platform::cql::Cluster>,
    /// More TOML every process's configuration ends with.
    extra: String,
}

/// The cluster's own HS256 secret: `messenger serve` refuses to start without a key.
const CLUSTER_SECRET: &str = "cluster-test-secret-not-the-development-one";

impl Cluster {
    /// One presence, two message services, two gateways, all registered.
    async fn start() -> Self {
        Self::start_with("").await
    }

    /// As [`Cluster::start`], every process's configuration ending with `extra`.
    async fn start_with(extra: &str) -> Self {
        let etcd = EtcdServer::start();
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let certs =
            messenger::certs::generate(&dir.path().join("certs"), "messenger.internal", &["127.0.0.1".into()], 1)
                .unwrap();
        let watching = CancellationToken::new();
        let discovery = EtcdDiscovery::start(etcd_options(&etcd), watching.clone()).await;
        let scylla = if on_scylla() { Some(scylla_cluster().await) } else { None };
        let mut cluster = Self {
            dir,
            etcd,
            _redis: redis,
            nodes: Vec::new(),
            discovery,
            watching,
            auth: messenger_platform::auth::AuthOptions {
                hs256_secret: Some(CLUSTER_SECRET.into()),
                ..Default::default()
            },
            certs,
            scylla,
            extra: extra.to_owned(),
        };
        // In dependency order, each role registered before the next starts:
        // an instance lists etcd before it serves, so every instance knows
        // the roles it calls from its first request on (a message instance
        // that had not yet seen presence would skip live fan-out).
        cluster.add("presence", Role::Presence);
        cluster.wait_registered(Role::Presence, 1).await;
        cluster.add("message-1", Role::Message);
        cluster.add("message-2", Role::Message);
        cluster.wait_registered(Role::Message, 2).await;
        cluster.add("gateway-1", Role::Gateway);
        cluster.add("gateway-2", Role::Gateway);
        cluster.wait_registered(Role::Gateway, 2).await;
        cluster
    }

    fn add(&mut self, name: &str, role: Role) {
        let (port, internal, admin) = (free_port(), free_port(), free_port());
        let dir = self.dir.path();
        let listen = |of: Role| match (of == role, of) {
            (false, _) => String::new(),
            (true, Role::Gateway) => {
                format!(
                    "listen = \"127.0.0.1:{port}\"\ninternal_listen = \"127.0.0.1:{internal}\"\nweb.listen = \"\"\n"
                )
            }
            (true, _) => format!("listen = \"127.0.0.1:{port}\"\n"),
        };
        let (cert, key) = self.certs.role(role.as_str()).unwrap();
        let config = format!(
            r#"data_dir = "{data}"
[admin]
listen = "127.0.0.1:{admin}"
[log]
filter = "info"
[auth]
hs256_secret = "{CLUSTER_SECRET}"
[tls]
cluster_ca_file = "{ca}"
cluster_cert_file = "{cert}"
cluster_key_file = "{key}"
[discovery]
backend = "etcd"
request_timeout = "2s"
unhealthy_for = "5s"
[discovery.etcd]
endpoints = ["{etcd}"]
lease_ttl = "2s"
retry_interval = "200ms"
[message]
{message_listen}database = "{database}"
{store}[message.sqlite]
member_cache_entries = 0
[message.cache]
backend = "redis"
probe_interval = "200ms"
[message.cache.redis]
url = "{redis}"
[presence]
{presence_listen}backend = "redis"
session_ttl = "3s"
[presence.redis]
url = "{redis}"
[notify]
{notify_listen}{notify_store}database = "{notify_database}"
read_grace = "5s"
poll_interval = "50ms"
maintenance_interval = "200ms"
[notify.egress]
allow_http = true
allow_addresses = ["127.0.0.0/8"]
[gateway]
{gateway_listen}presence_renew_interval = "1s"
sends_per_second = 100000
send_burst = 100000
{extra}"#,
            extra = self.extra,
            message_listen = listen(Role::Message),
            presence_listen = listen(Role::Presence),
            gateway_listen = listen(Role::Gateway),
            notify_listen = listen(Role::Notify),
            // The outbox in the message keyspace too, when the store is Scylla.
            notify_store = if self.scylla.is_some() { "store = \"scylla\"\n" } else { "" },
            notify_database = dir.join("notify.db").display(),
            admin = admin,
            data = dir.join(name).display(),
            etcd = self.etcd.endpoint(),
            database = dir.join("messages.db").display(),
            store = self.scylla.as_ref().map_or_else(String::new, |scylla| format!(
                // A killed instance's in-flight sends are taken over after
                // 2 x lock_timeout: within the SDK's send timeout here.
                "store = \"scylla\"\n[scylla]\nnodes = [\"{}\"]\nkeyspace = \"{}\"\n\
                 migrate_on_start = true\nrequest_timeout = \"1s\"\n[message.scylla]\nlock_timeout = \"6s\"\n",
                scylla.nodes[0], scylla.keyspace
            )),
            redis = self._redis.url(),
            ca = self.certs.ca.display(),
            cert = cert.display(),
            key = key.display(),
        );
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let mut node = Node { name: name.to_owned(), role, config: path, child: None, port, admin };
        spawn(&mut node, dir);
        self.nodes.push(node);
    }

    fn etcd_options(&self) -> EtcdOptions {
        etcd_options(&self.etcd)
    }

    fn node(&mut self, name: &str) -> &mut Node {
        self.nodes.iter_mut().find(|node| node.name == name).expect("no such node")
    }

    fn gateway(&self, name: &str) -> String {
        let node = self.nodes.iter().find(|node| node.name == name).expect("no such gateway");
        format!("http://127.0.0.1:{}", node.port)
    }

    fn address(&self, name: &str) -> String {
        let node = self.nodes.iter().find(|node| node.name == name).expect("no such node");
        format!("127.0.0.1:{}", node.port)
    }

    fn kill(&mut self, name: &str) {
        let mut child = self.node(name).child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn signal(&mut self, name: &str, signal: &str) {
        let pid = self.node(name).child.as_ref().expect("running").id();
        assert!(Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap().success());
    }

    fn respawn(&mut self, name: &str) {
        let dir = self.dir.path().to_owned();
        spawn(self.node(name), &dir);
    }

    async fn wait_registered(&self, role: Role, count: usize) {
        self.wait_until(&format!("{count} {role} instance(s) registered"), || {
            self.discovery.endpoints(role).len() == count
        })
        .await;
    }

    async fn wait_until(&self, what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}; logs in {}", self.dir.path().display());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Alice on gateway-1 and Bob on gateway-2, with their direct conversation.
    async fn pair(&self) -> Pair {
        let (alice, alice_events) = self.connect("alice", "gateway-1").await;
        let (bob, bob_events) = self.connect("bob", "gateway-2").await;
        let direct = alice.direct("bob").await.unwrap().conversation_id;
        Pair { alice, _alice_events: alice_events, _bob: bob, bob_events, direct }
    }

    /// The message instance that serves `conversation` now, and the other one.
    fn message_owner(&self, conversation: &str) -> (&'static str, &'static str) {
        let owner = rank(conversation.as_bytes(), &self.discovery.endpoints(Role::Message))[0].clone();
        if owner == self.address("message-1") { ("message-1", "message-2") } else { ("message-2", "message-1") }
    }

    /// A client on `gateway` that fails over to the other one.
    async fn connect(&self, user: &str, gateway: &str) -> (Client, Events) {
        self.connect_device(user, &format!("{user}-phone"), gateway).await
    }

    /// As [`Cluster::connect`], as the device `device`.
    async fn connect_device(&self, user: &str, device: &str, gateway: &str) -> (Client, Events) {
        let other = if gateway == "gateway-1" { "gateway-2" } else { "gateway-1" };
        let token = messenger_platform::auth::mint_hs256(&self.auth, user, Duration::from_secs(3600)).unwrap();
        let mut options = Options::new(self.gateway(gateway), token, device.to_owned());
        options.fallback_endpoints = vec![self.gateway(other)];
        options.reconnect_min = Duration::from_millis(50);
        options.reconnect_max = Duration::from_millis(500);
        options.ack_interval = Duration::from_millis(10);
        // Cassandra: a killed instance's claim is taken over after 12 s.
        options.send_timeout = Duration::from_secs(if on_scylla() { 60 } else { 30 });
        options.connect_timeout = Duration::from_secs(2);
        // Gateways come up before they serve: retry the first connect briefly.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match Client::connect(options.clone()).await {
                Ok(connected) => return connected,
                Err(error) if Instant::now() < deadline => {
                    eprintln!("connect {user} to {gateway}: {error}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!("{user} could not connect to {gateway}: {error}"),
            }
        }
    }
}

struct Pair {
    alice: Client,
    _alice_events: Events,
    _bob: Client,
    bob_events: Events,
    direct: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.watching.cancel();
        if std::thread::panicking() {
            for node in &self.nodes {
                let path = self.dir.path().join(format!("{}.log", node.name));
                let log = std::fs::read(&path).map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
                let log = log.unwrap_or_else(|error| format!("cannot read {}: {error}", path.display()));
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- {} (last lines) ----", node.name);
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = Command::new("kill").arg("-CONT").arg(child.id().to_string()).status();
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(scylla) = &self.scylla {
            drop_keyspace(scylla);
        }
    }
}

fn etcd_options(etcd: &EtcdServer) -> EtcdOptions {
    EtcdOptions {
        endpoints: vec![etcd.endpoint()],
        lease_ttl: LEASE_TTL,
        retry_interval: Duration::from_millis(200),
        ..EtcdOptions::default()
    }
}

fn spawn(node: &mut Node, dir: &std::path::Path) {
    let log = File::options().create(true).append(true).open(dir.join(format!("{}.log", node.name))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_messenger"))
        .arg("--config")
        .arg(&node.config)
        .args(["serve", "--service", node.role.as_str()])
        .env_remove("RUST_LOG")
        // The tests' own settings, not the binary's (it reads `MESSENGER_*` as configuration).
        .env_remove("MESSENGER_TEST_STORE")
        .env_remove("MESSENGER_TEST_SCYLLA")
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("cannot start the messenger binary");
    node.child = Some(child);
}

/// Sends `count` bodies (`"{prefix}{i}"`) one after another in the
/// background; every send must succeed across `what`. Returns the bodies and,
/// once done, their acked seqs.
fn send_in_background(
    client: &Client,
    conversation: &str,
    prefix: &str,
    count: usize,
    what: &'static str,
) -> (Vec<String>, tokio::task::JoinHandle<Vec<u64>>) {
    let bodies: Vec<String> = (0..count).map(|i| format!("{prefix}{i}")).collect();
    let (client, conversation, to_send) = (client.clone(), conversation.to_owned(), bodies.clone());
    let sender = tokio::spawn(async move {
        let mut acked = Vec::with_capacity(to_send.len());
        for body in &to_send {
            let ack =
                client.send(&conversation, body).await.unwrap_or_else(|e| panic!("a send failed across {what}: {e}"));
            acked.push(ack.seq);
        }
        acked
    });
    (bodies, sender)
}

/// Exactly `expected` bodies, in order, each once.
fn assert_exactly_once_in_order(received: &[messenger_client::Message], expected: &[String]) {
    let bodies: Vec<&str> = received.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, expected.iter().map(String::as_str).collect::<Vec<_>>(), "not every message exactly once");
    let seqs: Vec<u64> = received.iter().map(|m| m.seq).collect();
    if on_scylla() {
        // Known gap of the Scylla store (`scylla.rs`, issue 12): an instance
        // killed between reserving a seq and writing its row leaves a hole;
        // readers skip it once it is older than 2 x lock_timeout.
        assert!(seqs.windows(2).all(|w| w[1] > w[0]), "seqs not ascending: {seqs:?}");
        let holes: u64 = seqs.windows(2).map(|w| w[1] - w[0] - 1).sum();
        if holes > 0 {
            eprintln!("scylla store: {holes} seq(s) left as holes by a killed instance");
        }
    } else {
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "seqs not dense and ascending: {seqs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_two_gateways_chat_and_survive_a_gateway_kill() {
    let mut cluster = Cluster::start().await;
    let (alice, mut alice_events) = cluster.connect("alice", "gateway-1").await;
    let (bob, mut bob_events) = cluster.connect("bob", "gateway-2").await;
    let (carol, mut carol_events) = cluster.connect("carol", "gateway-1").await;

    // 1:1 across gateways, both ways.
    let direct = alice.direct("bob").await.unwrap().conversation_id;
    let to_bob: Vec<String> = (0..20).map(|i| format!("to bob {i}")).collect();
    for body in &to_bob {
        alice.send(&direct, body).await.unwrap();
    }
    assert_exactly_once_in_order(&sent_by(&mut bob_events, "alice", &direct, 20).await, &to_bob);
    bob.send(&direct, "hi alice").await.unwrap();
    assert_eq!(next_from(&mut alice_events, "bob").await.body, "hi alice");

    // A group spanning both gateways.
    let group = alice.create_group("trio", &["bob", "carol"]).await.unwrap().conversation_id;
    for (client, name) in [(&alice, "alice"), (&bob, "bob"), (&carol, "carol")] {
        client.send(&group, &format!("{name} in the group")).await.unwrap();
    }
    for events in [&mut alice_events, &mut bob_events, &mut carol_events] {
        let texts: HashSet<String> = group_texts(events, 3).await;
        assert_eq!(texts.len(), 3, "a group member missed a message: {texts:?}");
    }

    // Kill gateway-1 (alice's and carol's) in the middle of a stream of sends.
    let (stream, sender) = send_in_background(&alice, &direct, "stream ", 200, "the gateway kill");
    let before_kill = sent_by(&mut bob_events, "alice", &direct, 50).await;
    cluster.kill("gateway-1");
    let after_kill = sent_by(&mut bob_events, "alice", &direct, 150).await;
    let acked = sender.await.unwrap();
    let received: Vec<_> = before_kill.into_iter().chain(after_kill).collect();
    assert_exactly_once_in_order(&received, &stream);
    assert_eq!(acked, received.iter().map(|m| m.seq).collect::<Vec<_>>(), "acks and deliveries disagree");
    assert_quiet(&mut bob_events).await;

    // Carol was on the dead gateway too: she is back through gateway-2 and
    // gets what the group says now.
    bob.send(&group, "after the kill").await.unwrap();
    assert_eq!(next_group_text(&mut carol_events, &group).await, "after the kill");
    cluster.wait_registered(Role::Gateway, 1).await;
}

/// The next message from `sender` (a device also receives its user's own sends).
async fn next_from(events: &mut Events, sender: &str) -> messenger_client::Message {
    loop {
        let message = next_message(events).await;
        if message.sender_id == sender {
            return message;
        }
    }
}

/// The next `count` messages `sender` sent in `conversation`.
async fn sent_by(
    events: &mut Events,
    sender: &str,
    conversation: &str,
    count: usize,
) -> Vec<messenger_client::Message> {
    let mut received = Vec::with_capacity(count);
    while received.len() < count {
        let message = next_message(events).await;
        if message.sender_id == sender && message.conversation_id == conversation {
            received.push(message);
        }
    }
    received
}

async fn group_texts(events: &mut Events, count: usize) -> HashSet<String> {
    let mut texts = HashSet::new();
    while texts.len() < count {
        let message = next_message(events).await;
        if message.body.ends_with("in the group") {
            texts.insert(message.body);
        }
    }
    texts
}

async fn next_group_text(events: &mut Events, group: &str) -> String {
    loop {
        let message = next_message(events).await;
        if message.conversation_id == group && !message.body.is_empty() {
            return message.body;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_instances_fail_over_without_duplicates_and_leave_discovery_when_paused() {
    let mut cluster = Cluster::start().await;
    let Pair { alice, _alice_events, _bob, mut bob_events, direct } = cluster.pair().await;
    let (owner_name, other_name) = cluster.message_owner(&direct);

    // kill -9 the instance that owns the conversation in the middle of the sends.
    let (stream, sender) = send_in_background(&alice, &direct, "m", 300, "the message-service kill");
    let before = sent_by(&mut bob_events, "alice", &direct, 100).await;
    cluster.kill(owner_name);
    let after = sent_by(&mut bob_events, "alice", &direct, 200).await;
    sender.await.unwrap();
    let received: Vec<_> = before.into_iter().chain(after).collect();
    assert_exactly_once_in_order(&received, &stream);
    let history = alice.history(&direct, 0, 200).await.unwrap().messages;
    if on_scylla() {
        // Holes aside (see `assert_exactly_once_in_order`), still one entry per message.
        let bodies: Vec<&str> = history.iter().map(|m| m.body.as_str()).collect();
        assert_eq!(bodies, stream[100..].iter().map(String::as_str).collect::<Vec<_>>(), "a retried send stored twice");
    } else {
        assert_eq!(history.last().unwrap().seq, 300, "a retried send took a second seq");
    }
    cluster.wait_registered(Role::Message, 1).await;

    // Back, then paused: gone from discovery within the lease, traffic flows
    // through the other instance meanwhile.
    cluster.respawn(owner_name);
    cluster.wait_registered(Role::Message, 2).await;
    cluster.signal(other_name, "STOP");
    let paused = Instant::now();
    let other_address = cluster.address(other_name);
    cluster
        .wait_until("the paused instance left discovery", || {
            !cluster.discovery.endpoints(Role::Message).contains(&other_address)
        })
        .await;
    assert!(paused.elapsed() < LEASE_TTL + Duration::from_secs(2), "took {:?}", paused.elapsed());
    for i in 0..20 {
        alice.send(&direct, &format!("while paused {i}")).await.unwrap();
    }
    assert_eq!(messages(&mut bob_events, 20).await.last().unwrap().body, "while paused 19");

    // Resumed: it registers again and takes traffic again (the other is killed,
    // so every send below can only be served by it).
    cluster.signal(other_name, "CONT");
    cluster.wait_registered(Role::Message, 2).await;
    cluster.kill(owner_name);
    cluster.wait_registered(Role::Message, 1).await;
    assert_eq!(cluster.discovery.endpoints(Role::Message), vec![other_address]);
    for i in 0..10 {
        alice.send(&direct, &format!("after resume {i}")).await.unwrap();
    }
    assert_eq!(messages(&mut bob_events, 10).await.last().unwrap().body, "after resume 9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_restart_costs_clients_nothing_and_registrations_come_back() {
    let mut cluster = Cluster::start().await;
    let Pair { alice, _alice_events, _bob, mut bob_events, direct } = cluster.pair().await;
    // Converged first: the conversation's message instance has seen presence
    // and both gateways in etcd (a live delivery needs all three).
    alice.send(&direct, "before").await.unwrap();
    assert_eq!(next_from(&mut bob_events, "alice").await.body, "before");

    cluster.etcd.stop();
    // Longer than a lease: routing keeps working from what was last seen.
    for i in 0..30 {
        alice.send(&direct, &format!("during {i}")).await.expect("a send failed while etcd was down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sent_by(&mut bob_events, "alice", &direct, 30).await.len(), 30);
    cluster.etcd.restart();
    // A fresh watcher sees what etcd holds now, not what anyone remembered.
    // Registrations stay, kept alive again, past several leases.
    tokio::time::sleep(LEASE_TTL * 3).await;
    let fresh = EtcdDiscovery::start(cluster.etcd_options(), cluster.watching.clone()).await;
    cluster
        .wait_until("every registration is back in etcd", || {
            [(Role::Presence, 1), (Role::Message, 2), (Role::Gateway, 2)]
                .iter()
                .all(|(role, count)| fresh.endpoints(*role).len() == *count)
        })
        .await;
    alice.send(&direct, "after").await.unwrap();
    assert_eq!(next_message(&mut bob_events).await.body, "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_instance_stopped_gracefully_drains_at_once_and_sends_move_on() {
    let mut cluster = Cluster::start().await;
    let Pair { alice, _alice_events, _bob, mut bob_events, direct } = cluster.pair().await;
    let (owner_name, _) = cluster.message_owner(&direct);

    // Sends keep coming while the owner (to which gateway-1 holds a send
    // stream) is stopped with SIGTERM: none may fail, none may be doubled.
    let (stream, sender) = send_in_background(&alice, &direct, "m", 200, "a graceful stop");
    let before = sent_by(&mut bob_events, "alice", &direct, 50).await;
    // The stream ends as the drain starts, so the drain need not wait out its
    // grace period (10s) for a gateway that would never hang up.
    cluster.signal(owner_name, "TERM");
    let stopping = Instant::now();
    let mut child = cluster.node(owner_name).child.take().expect("running");
    while child.try_wait().unwrap().is_none() {
        assert!(stopping.elapsed() < Duration::from_secs(5), "the drain waited on the send stream");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = sent_by(&mut bob_events, "alice", &direct, 150).await;
    sender.await.unwrap();
    let received: Vec<_> = before.into_iter().chain(after).collect();
    assert_exactly_once_in_order(&received, &stream);
    cluster.wait_registered(Role::Message, 1).await;
}

/// The value of the gauge `messenger_notify_outbox` for `state` on a node's `/metrics`.
async fn outbox(admin: u16, state: &str) -> Option<u64> {
    let response = reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await.ok()?;
    let text = response.text().await.ok()?;
    text.lines()
        .find(|line| line.starts_with("messenger_notify_outbox{") && line.contains(&format!("state=\"{state}\"")))
        .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|value| value as u64)
}

/// SIGKILL while every push waits in the outbox (stored, not yet due):
/// after a restart each is delivered, and none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_pushes_survive_a_notify_kill_and_leave_once_each() {
    let mut cluster = Cluster::start_with("").await;
    cluster.add("notify", Role::Notify);
    cluster.wait_registered(Role::Notify, 1).await;
    let (base, hooks) = crate::notify::receiver().await;
    let recipients: Vec<String> = (0..20).map(|i| format!("offline-{i}")).collect();
    for user in &recipients {
        let (client, _events) = cluster.connect(user, "gateway-1").await;
        crate::notify::register(&client, &base, &hooks, &format!("{user}-phone")).await;
        client.close().await;
    }
    let (alice, _alice_events) = cluster.connect("alice", "gateway-2").await;
    let mut conversations = Vec::new();
    for user in &recipients {
        conversations.push(alice.direct(user).await.unwrap().conversation_id);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for conversation in &conversations {
        alice.send(conversation, "queued while notify dies").await.unwrap();
    }
    let admin = cluster.node("notify").admin;
    let deadline = Instant::now() + Duration::from_secs(30);
    // The read grace (5 s) keeps them queued meanwhile.
    while outbox(admin, "queued").await != Some(20) {
        assert!(Instant::now() < deadline, "20 jobs never queued; {:?} pushed", hooks.all().len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(hooks.all().is_empty(), "nothing left before the kill");
    cluster.kill("notify");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(hooks.all().is_empty(), "nobody pushes while notify is down");
    cluster.respawn("notify");
    cluster.wait_until("every queued push delivered", || hooks.all().len() >= 20).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received = hooks.all();
    let ids: HashSet<&str> = received.iter().map(|r| r.webhook_id.as_str()).collect();
    let devices: HashSet<&str> = received.iter().map(|r| r.device.as_str()).collect();
    assert_eq!((received.len(), ids.len(), devices.len()), (20, 20, 20), "each push once, one per device");

    // What a gateway reports of its leases and of the instances it knows.
    let admin = cluster.node("gateway-1").admin;
    let metrics = reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await.unwrap().text().await.unwrap();
    let value = |name: &str, label: &str| {
        metrics
            .lines()
            .find(|line| line.starts_with(name) && line.contains(label))
            .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
    };
    let renewed = value("messenger_gateway_lease_renewals_total{", "outcome=\"ok\"");
    assert!(renewed.is_some_and(|count| count >= 1.0), "{metrics}");
    assert_eq!(value("messenger_discovery_instances{", "role=\"message\""), Some(2.0), "{metrics}");
    assert_eq!(value("messenger_discovery_instances{", "role=\"notify\""), Some(1.0), "{metrics}");
}

/// The count of `messenger_telemetry_spans_total` with `outcome` on a node's `/metrics`.
async fn spans_counted(admin: u16, outcome: &str) -> u64 {
    let Ok(response) = reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await else { return 0 };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|line| line.starts_with("messenger_telemetry_spans_total{"))
        .filter(|line| line.contains(&format!("outcome=\"{outcome}\"")))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_is_one_trace_across_every_process_and_a_dead_collector_costs_nothing() {
    let collector: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let extra = format!(
        "[tracing]\notlp_endpoint = \"http://{collector}\"\nsample_ratio = 1.0\nexport_interval = \"200ms\"\n\
         export_timeout = \"1s\"\nmetrics_interval = \"0s\"\n"
    );
    let mut cluster = Cluster::start_with(&extra).await;
    cluster.add("notify", Role::Notify);
    cluster.wait_registered(Role::Notify, 1).await;
    let Pair { alice, _alice_events, _bob, mut bob_events, direct } = cluster.pair().await;
    // Bob's tablet is offline, with a webhook: the message is pushed to it.
    let (hook, hooks) = crate::notify::receiver().await;
    let (tablet, _tablet_events) = cluster.connect_device("bob", "bob-tablet", "gateway-1").await;
    crate::notify::register(&tablet, &hook, &hooks, "bob-tablet").await;
    tablet.close().await;

    // No collector listens yet: every send is still answered and delivered,
    // and the exporters count what they could not send.
    for i in 0..20 {
        alice.send(&direct, &format!("untraced-{i}")).await.unwrap();
    }
    for i in 0..20 {
        assert_eq!(next_from(&mut bob_events, "alice").await.body, format!("untraced-{i}"));
    }
    let gateway_admin = cluster.nodes.iter().find(|node| node.name == "gateway-1").unwrap().admin;
    let deadline = Instant::now() + Duration::from_secs(20);
    while spans_counted(gateway_admin, "failed").await == 0 {
        assert!(Instant::now() < deadline, "no failed export counted while the collector was down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The collector comes up; the app sends inside its own trace.
    let receiver = messenger::otlp::Receiver::start(collector, true).await.unwrap();
    let trace_id = format!("{:032x}", rand::random::<u128>() | 1);
    let app_span = format!("{:016x}", rand::random::<u64>() | 1);
    let context = [("traceparent".to_owned(), format!("00-{trace_id}-{app_span}-01"))].into();
    let body = "a body no span may carry";
    let client_msg_id = uuid::Uuid::now_v7().to_string();
    alice.send_traced(&direct, &client_msg_id, body, context).await.unwrap();
    assert_eq!(next_from(&mut bob_events, "alice").await.body, body);

    // Each hop's span, found by process, name, kind and parent.
    type Step = (&'static str, &'static str, i32);
    let chain: [(Step, Option<usize>); 15] = [
        /* 0 */ (("messenger-gateway", "messenger.v1.GatewayService/Connect Send", 2), None),
        /* 1 */ (("messenger-gateway", "messenger.v1.MessageService/SendStream", 3), Some(0)),
        /* 2 */ (("messenger-message", "messenger.v1.MessageService/SendStream Send", 2), Some(0)),
        /* 3 */ (("messenger-message", "store commit", 1), Some(2)),
        /* 4 */ (("messenger-message", "fan-out", 1), Some(2)),
        /* 5 */ (("messenger-message", "messenger.v1.PresenceService/Locate", 3), Some(4)),
        /* 6 */ (("messenger-presence", "messenger.v1.PresenceService/Locate", 2), Some(5)),
        /* 7 */ (("messenger-message", "messenger.v1.GatewayInternalService/Deliver", 3), Some(4)),
        /* 8 */ (("messenger-gateway", "messenger.v1.GatewayInternalService/Deliver", 2), Some(7)),
        /* 9 */ (("messenger-gateway", "deliver to sessions", 1), Some(4)),
        /* 10 */ (("messenger-gateway", "write message frame", 1), Some(9)),
        /* 11 */ (("messenger-message", "push handoff", 1), Some(4)),
        /* 12 */ (("messenger-message", "messenger.v1.NotifyService/Enqueue", 3), Some(11)),
        /* 13 */ (("messenger-notify", "messenger.v1.NotifyService/Enqueue", 2), Some(12)),
        /* 14 */ (("messenger-notify", "push", 1), Some(13)),
    ];
    // The send stream may have opened before this trace (then its client
    // span belongs to an earlier one): that hop is optional.
    let optional = [1];
    let find = |spans: &[messenger::otlp::Received], found: &[Option<String>]| -> Vec<Option<String>> {
        chain
            .iter()
            .map(|((service, name, kind), parent)| {
                let parent = match parent {
                    None => Some(app_span.clone()),
                    Some(index) => found[*index].clone(),
                };
                spans
                    .iter()
                    .find(|span| {
                        span.service == *service
                            && span.name == *name
                            && span.kind == *kind
                            && (parent.is_none() || parent.as_deref() == Some(span.parent.as_str()))
                    })
                    .map(|span| span.span_id.clone())
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans = receiver.trace(&trace_id);
        // Each pass resolves one more level of parents: as many passes as hops.
        let mut found = vec![None; chain.len()];
        for _ in 0..chain.len() {
            found = find(&spans, &found);
        }
        let missing: Vec<_> = (0..chain.len()).filter(|i| found[*i].is_none() && !optional.contains(i)).collect();
        if missing.is_empty() {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "spans missing from the trace: {:?}\nreceived: {spans:#?}",
            missing.iter().map(|i| chain[*i].0).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for span in &spans {
        assert!(
            span.attributes.iter().all(|(_, value)| !value.contains(body)),
            "a span carries the message body: {span:?}"
        );
        if span.kind == 2 && span.name.starts_with("messenger.v1.") && !span.name.contains(' ') {
            assert_eq!(span.attribute("rpc.system"), Some("grpc"), "{span:?}");
            assert_eq!(span.attribute("rpc.grpc.status_code"), Some("0"), "{span:?}");
        }
    }
    // Counted once the export call returns (just after the collector has the spans).
    let deadline = Instant::now() + Duration::from_secs(10);
    while spans_counted(gateway_admin, "exported").await == 0 {
        assert!(Instant::now() < deadline, "exports are not counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With no message instance to take it, a send is answered UNAVAILABLE on
/// the stream; the SDK tries it again on the same stream, alone, until an
/// instance is back: the stream is never torn down for it, the send lands
/// once.
#[tokio::test]
async fn a_send_no_message_instance_can_take_is_retried_on_the_same_stream() {
    let mut cluster = Cluster::start().await;
    let Pair { alice, _alice_events: mut alice_events, _bob, mut bob_events, direct } = cluster.pair().await;
    cluster.kill("message-1");
    cluster.kill("message-2");
    let pending = {
        let (alice, direct) = (alice.clone(), direct.clone());
        tokio::spawn(async move { alice.send(&direct, "sent while no message instance runs").await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!pending.is_finished(), "the send gave up: {:?}", pending.await);
    cluster.respawn("message-1");
    let ack = pending.await.unwrap().expect("the send failed instead of being retried");
    let got = next_from(&mut bob_events, "alice").await;
    assert_eq!((got.seq, got.body.as_str()), (ack.seq, "sent while no message instance runs"));
    // One stream all along: only the first Connected.
    let mut connected = 0;
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(200), alice_events.next()).await {
        if matches!(event, messenger_client::Event::Connected { .. }) {
            connected += 1;
        }
    }
    assert_eq!(connected, 1, "the stream was torn down for a send the server could not take");
}
