//! Discovery through etcd: every instance registers `{prefix}services/<role>/<instance id>`
//! with its address under a lease it keeps alive; every process watches the
//! prefix and routes by what it sees.
//!
//! - Registration ([`register`]): grant a lease of `lease_ttl`, put the record,
//!   keep the lease alive every third of the TTL. A keep-alive answered with
//!   TTL 0 means the lease is gone (the process was paused past its TTL, or
//!   etcd lost it): grant a new one and put the record again. Any etcd error:
//!   retry from the start every `retry_interval`. On shutdown the lease is
//!   revoked, which deletes the record at once.
//! - Resolution ([`EtcdDiscovery`]): list the prefix, then watch from the
//!   listing's revision; on any watch failure (etcd restarted, compaction)
//!   list again. While etcd is unreachable the last known membership keeps
//!   routing calls: an etcd outage costs no traffic, only membership changes.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
    time::Duration,
};

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Discovery, Role};
use crate::tls::BackendTls;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdOptions {
    /// etcd client URLs or `host:port`s: `https://` ones (or `host:port`)
    /// with `tls`, `http://` ones (or `host:port`) without.
    pub endpoints: Vec<String>,
    /// Key prefix; the version in it lets a new record format live beside the old.
    pub prefix: String,
    /// A registration disappears this long after its instance stops renewing it.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Wait between attempts while etcd is unreachable.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// TLS to etcd: on when `tls.ca_file` is set (etcd's `--trusted-ca-file`
    /// and `--client-cert-auth` want `tls.cert_file` too).
    pub tls: BackendTls,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            endpoints: vec!["127.0.0.1:2379".into()],
            prefix: "/messenger/v1/".into(),
            lease_ttl: Duration::from_secs(10),
            retry_interval: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            tls: BackendTls::default(),
        }
    }
}

impl EtcdOptions {
    pub fn validate(&self) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("discovery.etcd.endpoints needs at least one address".into());
        }
        self.tls.validate("discovery.etcd.tls")?;
        for endpoint in &self.endpoints {
            if self.tls.enabled() && endpoint.starts_with("http://") {
                return Err(format!(
                    "discovery.etcd.endpoints: {endpoint} is http:// but discovery.etcd.tls is set: use https://"
                ));
            }
            if !self.tls.enabled() && endpoint.starts_with("https://") {
                return Err(format!(
                    "discovery.etcd.endpoints: {endpoint} is https:// but discovery.etcd.tls.ca_file is unset: \
                     name the CA that signed etcd's certificate"
                ));
            }
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            return Err("discovery.etcd.prefix must start and end with '/'".into());
        }
        if self.lease_ttl < Duration::from_secs(2) {
            return Err("discovery.etcd.lease_ttl must be at least 2s (etcd's minimum lease)".into());
        }
        for (key, value) in [
            ("retry_interval", self.retry_interval),
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
        ] {
            if value.is_zero() {
                return Err(format!("discovery.etcd.{key} must be positive"));
            }
        }
        Ok(())
    }

    fn services(&self) -> String {
        format!("{}services/", self.prefix)
    }
}

/// Instances of each role this process knows from etcd now.
fn record_membership(members: &HashMap<Role, BTreeMap<String, String>>) {
    static INSTANCES: std::sync::OnceLock<crate::metrics::Gauge<u64>> = std::sync::OnceLock::new();
    let gauge = INSTANCES.get_or_init(|| {
        crate::metrics::meter()
            .u64_gauge("messenger.discovery.instances")
            .with_description("Instances of each role known from etcd")
            .build()
    });
    for role in Role::ALL {
        let count = members.get(&role).map_or(0, BTreeMap::len) as u64;
        gauge.record(count, &[crate::metrics::KeyValue::new("role", role.as_str())]);
    }
}
/// What an instance registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub instance_id: String,
    pub role: Role,
    pub addr: String,
}

async fn connect(options: &EtcdOptions) -> Result<Client, etcd_client::Error> {
    let mut connect = ConnectOptions::new()
        .with_connect_timeout(options.connect_timeout)
        .with_timeout(options.request_timeout)
        .with_keep_alive(Duration::from_secs(2), options.connect_timeout)
        .with_keep_alive_while_idle(true)
        // A member cut off from the leader refuses instead of serving a
        // watch that never fires.
        .with_require_leader(true);
    // Read at every connection attempt: a missing file fails each attempt
    // (logged and retried like an unreachable etcd) until it is there.
    let tls = options.tls.tonic().map_err(|error| etcd_client::Error::InvalidArgs(format!("tls: {error}")))?;
    if let Some(tls) = tls {
        connect = connect.with_tls(tls);
    }
    Client::connect(&options.endpoints, Some(connect)).await
}

/// Keeps `role` at `addr` registered under a fresh instance id until
/// `shutdown`, then deregisters and returns. Await it before the process
/// exits, so the deregistration is sent.
pub async fn register(options: EtcdOptions, role: Role, addr: String, shutdown: CancellationToken) {
    let record = Record { instance_id: crate::ids::new_id().to_string(), role, addr };
    let key = format!("{}{}/{}", options.services(), role, record.instance_id);
    let value = serde_json::to_string(&record).expect("a record serializes");
    // Failed attempts since the last registration: one warning per outage.
    let mut failures = 0u32;
    loop {
        match hold(&options, &key, &value, &shutdown, &mut failures).await {
            Ok(()) => return,
            Err(error) if failures == 0 => warn!(%error, %key, "etcd registration lost; registering again"),
            Err(error) => debug!(%error, %key, failures, "etcd registration still failing"),
        }
        failures += 1;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(options.retry_interval) => {}
        }
    }
}

/// One lease: registered until the lease is lost (Err) or shutdown (Ok, revoked).
async fn hold(
    options: &EtcdOptions,
    key: &str,
    value: &str,
    shutdown: &CancellationToken,
    failures: &mut u32,
) -> Result<(), String> {
    let etcd = |error: etcd_client::Error| error.to_string();
    let mut client = connect(options).await.map_err(etcd)?;
    let ttl = i64::try_from(options.lease_ttl.as_secs()).unwrap_or(i64::MAX);
    let lease = client.lease_grant(ttl, None).await.map_err(etcd)?.id();
    client.put(key, value, Some(PutOptions::new().with_lease(lease))).await.map_err(etcd)?;
    info!(%key, lease, after_failures = *failures, "registered in etcd");
    *failures = 0;
    let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.map_err(etcd)?;
    let mut ticks = tokio::time::interval(options.lease_ttl / 3);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                let revoked = tokio::time::timeout(options.request_timeout, client.lease_revoke(lease)).await;
                if !matches!(revoked, Ok(Ok(_))) {
                    warn!(%key, "could not deregister; the record expires with its lease");
                }
                return Ok(());
            }
            _ = ticks.tick() => {}
        }
        keeper.keep_alive().await.map_err(etcd)?;
        match tokio::time::timeout(options.request_timeout, answers.message()).await {
            Ok(Ok(Some(answer))) if answer.ttl() > 0 => debug!(%key, ttl = answer.ttl(), "lease renewed"),
            Ok(Ok(Some(_))) => return Err("the lease expired".into()),
            Ok(Ok(None)) => return Err("the keep-alive stream ended".into()),
            Ok(Err(error)) => return Err(error.to_string()),
            Err(_) => return Err("keep-alive timed out".into()),
        }
    }
}

/// Membership as last seen in etcd: role -> (key -> address).
#[derive(Default)]
pub struct EtcdDiscovery {
    members: RwLock<HashMap<Role, BTreeMap<String, String>>>,
}

impl Discovery for EtcdDiscovery {
    fn endpoints(&self, role: Role) -> Vec<String> {
        let members = self.members.read().unwrap_or_else(|e| e.into_inner());
        members.get(&role).map(|instances| instances.values().cloned().collect()).unwrap_or_default()
    }
}

impl EtcdDiscovery {
    /// Starts watching and waits (up to `connect_timeout`) for the first
    /// listing; an unreachable etcd is retried in the background.
    pub async fn start(options: EtcdOptions, shutdown: CancellationToken) -> Arc<Self> {
        let discovery = Arc::new(Self::default());
        let (listed, mut first) = watch::channel(false);
        let timeout = options.connect_timeout;
        tokio::spawn(discovery.clone().follow(options, shutdown, listed));
        if tokio::time::timeout(timeout, first.wait_for(|listed| *listed)).await.is_err() {
            warn!("etcd not reachable yet; instances will be known once it is");
        }
        discovery
    }

    async fn follow(self: Arc<Self>, options: EtcdOptions, shutdown: CancellationToken, listed: watch::Sender<bool>) {
        // Failed attempts since the last listing: one warning per outage.
        let mut failures = 0u32;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                result = self.list_and_watch(&options, &listed, &mut failures) => {
                    match result {
                        Err(error) if failures == 0 => {
                            warn!(%error, "etcd watch interrupted; keeping the last known instances and retrying")
                        }
                        Err(error) => debug!(%error, failures, "etcd watch still failing"),
                        Ok(()) => {}
                    }
                    failures += 1;
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(options.retry_interval) => {}
            }
        }
    }

    async fn list_and_watch(
        &self,
        options: &EtcdOptions,
        listed: &watch::Sender<bool>,
        failures: &mut u32,
    ) -> Result<(), String> {
        let etcd = |error: etcd_client::Error| error.to_string();
        let mut client = connect(options).await.map_err(etcd)?;
        let prefix = options.services();
        let listing = client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())).await.map_err(etcd)?;
        let revision = listing.header().map_or(0, |header| header.revision());
        let mut members: HashMap<Role, BTreeMap<String, String>> = HashMap::new();
        for kv in listing.kvs() {
            if let Some((key, record)) = parse(kv) {
                members.entry(record.role).or_default().insert(key, record.addr);
            }
        }
        record_membership(&members);
        *self.members.write().unwrap_or_else(|e| e.into_inner()) = members;
        listed.send_replace(true);
        if *failures > 0 {
            info!(failures = *failures, "etcd reachable again; instances listed afresh");
        }
        *failures = 0;
        let watch = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let mut stream = client.watch(prefix.as_str(), Some(watch)).await.map_err(etcd)?;
        while let Some(response) = stream.message().await.map_err(etcd)? {
            if response.canceled() {
                return Err(format!("watch canceled: {}", response.cancel_reason()));
            }
            let mut members = self.members.write().unwrap_or_else(|e| e.into_inner());
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => {
                        if let Some((key, record)) = parse(kv) {
                            info!(role = %record.role, addr = %record.addr, "instance joined");
                            members.entry(record.role).or_default().insert(key, record.addr);
                        }
                    }
                    EventType::Delete => {
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        for instances in members.values_mut() {
                            if let Some(addr) = instances.remove(&key) {
                                info!(%addr, "instance left");
                            }
                        }
                    }
                }
            }
            record_membership(&members);
        }
        Err("the watch stream ended".into())
    }
}

fn parse(kv: &KeyValue) -> Option<(String, Record)> {
    let key = String::from_utf8_lossy(kv.key()).into_owned();
    match serde_json::from_slice::<Record>(kv.value()) {
        Ok(record) => Some((key, record)),
        Err(error) => {
            warn!(%key, %error, "ignoring an unreadable registration");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Instant};

    use messenger_testkit::{EtcdServer, tls::TestCa};

    use super::*;

    fn options(etcd: &EtcdServer) -> EtcdOptions {
        EtcdOptions {
            endpoints: vec![etcd.endpoint()],
            lease_ttl: Duration::from_secs(2),
            retry_interval: Duration::from_millis(100),
            ..EtcdOptions::default()
        }
    }

    async fn eventually(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registrations_are_watched_and_removed_on_shutdown() {
        let etcd = EtcdServer::start();
        let watching = CancellationToken::new();
        let discovery = EtcdDiscovery::start(options(&etcd), watching.clone()).await;
        assert!(discovery.endpoints(Role::Message).is_empty());

        let (first, second) = (CancellationToken::new(), CancellationToken::new());
        let one = tokio::spawn(register(options(&etcd), Role::Message, "10.0.0.1:7710".into(), first.clone()));
        tokio::spawn(register(options(&etcd), Role::Message, "10.0.0.2:7710".into(), second.clone()));
        tokio::spawn(register(options(&etcd), Role::Gateway, "10.0.0.3:7701".into(), second.clone()));
        eventually("both message instances are known", || discovery.endpoints(Role::Message).len() == 2).await;
        assert_eq!(discovery.endpoints(Role::Gateway), vec!["10.0.0.3:7701".to_owned()]);

        // A graceful stop revokes the lease: gone at once, not after the TTL.
        first.cancel();
        one.await.unwrap();
        let stopped = Instant::now();
        eventually("the stopped instance is gone", || discovery.endpoints(Role::Message) == ["10.0.0.2:7710"]).await;
        assert!(stopped.elapsed() < Duration::from_secs(1), "deregistration waited for the lease");
        second.cancel();
        eventually("every instance is gone", || discovery.endpoints(Role::Gateway).is_empty()).await;
        watching.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_etcd_restart_keeps_routing_and_registrations_come_back() {
        let mut etcd = EtcdServer::start();
        let token = CancellationToken::new();
        let discovery = EtcdDiscovery::start(options(&etcd), token.clone()).await;
        tokio::spawn(register(options(&etcd), Role::Presence, "10.0.0.9:7720".into(), token.clone()));
        eventually("the instance is known", || discovery.endpoints(Role::Presence).len() == 1).await;

        etcd.stop();
        // Longer than the lease: an outage must not empty the routing table.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(discovery.endpoints(Role::Presence), vec!["10.0.0.9:7720".to_owned()]);

        etcd.restart();
        // The watch lists again and the registration is kept alive (or made
        // again if etcd let its lease expire): still exactly one instance, and
        // it survives well past one more TTL.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(discovery.endpoints(Role::Presence), vec!["10.0.0.9:7720".to_owned()]);
        let mut client = connect(&options(&etcd)).await.unwrap();
        let listing = client.get("/messenger/v1/services/", Some(GetOptions::new().with_prefix())).await.unwrap();
        assert_eq!(listing.kvs().len(), 1, "the registration is not back in etcd");
        token.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_lease_is_registered_again() {
        let etcd = EtcdServer::start();
        let token = CancellationToken::new();
        let discovery = EtcdDiscovery::start(options(&etcd), token.clone()).await;
        tokio::spawn(register(options(&etcd), Role::Message, "10.0.0.5:7710".into(), token.clone()));
        eventually("the instance is known", || discovery.endpoints(Role::Message).len() == 1).await;
        // Revoke its lease behind its back, as etcd does when a paused process misses its TTL.
        let mut client = connect(&options(&etcd)).await.unwrap();
        let listing = client.get("/messenger/v1/services/", Some(GetOptions::new().with_prefix())).await.unwrap();
        client.lease_revoke(listing.kvs()[0].lease()).await.unwrap();
        eventually("the revoked instance left", || discovery.endpoints(Role::Message).is_empty()).await;
        eventually("the instance registered again", || discovery.endpoints(Role::Message).len() == 1).await;
        token.cancel();
    }

    #[test]
    fn endpoint_schemes_agree_with_tls() {
        let on = BackendTls { ca_file: Some("ca.pem".into()), ..BackendTls::default() };
        let with = |endpoint: &str, tls: &BackendTls| EtcdOptions {
            endpoints: vec![endpoint.to_owned()],
            tls: tls.clone(),
            ..EtcdOptions::default()
        };
        with("https://etcd:2379", &on).validate().unwrap();
        with("etcd:2379", &on).validate().unwrap();
        with("http://etcd:2379", &BackendTls::default()).validate().unwrap();
        assert!(with("http://etcd:2379", &on).validate().unwrap_err().contains("use https://"));
        let error = with("https://etcd:2379", &BackendTls::default()).validate().unwrap_err();
        assert!(error.contains("discovery.etcd.tls.ca_file is unset"), "{error}");
    }

    /// An etcd that serves only TLS and requires client certificates: an
    /// instance registers and is watched with etcd's CA trusted; a client
    /// trusting another CA (same client certificate) reads nothing, so the
    /// server's certificate is verified.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registrations_go_over_mutual_tls_and_etcd_is_verified() {
        let etcd = EtcdServer::start_tls();
        let files = etcd.client_tls().expect("started with TLS").clone();
        assert!(etcd.endpoint().starts_with("https://"), "{}", etcd.endpoint());
        let trusting = |ca_file: &Path| EtcdOptions {
            tls: BackendTls {
                ca_file: Some(ca_file.to_owned()),
                cert_file: Some(files.cert.clone()),
                key_file: Some(files.key.clone()),
                server_name: None,
            },
            ..options(&etcd)
        };
        let trusted = trusting(&files.ca_file);
        trusted.validate().unwrap();
        let token = CancellationToken::new();
        let discovery = EtcdDiscovery::start(trusted.clone(), token.clone()).await;
        tokio::spawn(register(trusted, Role::Message, "10.0.0.7:7710".into(), token.clone()));
        eventually("the instance is known over TLS", || discovery.endpoints(Role::Message) == ["10.0.0.7:7710"]).await;

        let other_dir = tempfile::tempdir().unwrap();
        let other = TestCa::new(other_dir.path(), "other");
        let refused = trusting(other.ca_file());
        let read = async {
            match connect(&refused).await {
                Ok(mut client) => client.get("/messenger/v1/services/", None).await.map(drop),
                Err(error) => Err(error),
            }
        };
        let read = tokio::time::timeout(Duration::from_secs(10), read).await;
        assert!(!matches!(read, Ok(Ok(()))), "a client trusting another CA read etcd");
        if let Ok(Err(error)) = read {
            eprintln!("refused as it should be: {error}");
        }
        token.cancel();
    }
}
