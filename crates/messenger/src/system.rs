//! Starting services: all of them in one process (`messenger up`) or one role
//! (`messenger serve --service NAME`). Either way each service listens on its
//! own port and the services talk gRPC to each other, exactly as when they run
//! in separate processes.

use std::{net::SocketAddr, sync::Arc};

use messenger_message::{StoreBackend, sqlite::SqliteStore};
use messenger_platform::{
    auth::Verifier,
    discovery::{Discovery, DiscoveryBackend, EtcdDiscovery, Role, StaticDiscovery, etcd},
    server::{self, bind, local_addr},
    supervise::Supervisor,
    tls::{ClientTls, ServerTls},
};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::Config;

/// Addresses of what is running, as bound (port 0 resolved).
#[derive(Debug, Clone, Default)]
pub struct Addresses {
    pub gateway: Option<SocketAddr>,
    pub gateway_internal: Option<SocketAddr>,
    pub message: Option<SocketAddr>,
    pub presence: Option<SocketAddr>,
    pub media: Option<SocketAddr>,
    pub notify: Option<SocketAddr>,
    /// The admin port (`/metrics`, `/livez`, `/readyz`), unless turned off.
    pub admin: Option<SocketAddr>,
    /// The embedded object store's endpoint, when this process runs one.
    pub objects: Option<String>,
    /// The gateway's browser port (web app, WebSocket, gRPC-Web), unless turned off.
    pub web: Option<SocketAddr>,
    /// Whether the gateway's public port speaks TLS.
    pub public_tls: bool,
}

/// A running set of services.
pub struct Running {
    pub addresses: Addresses,
    /// Holds the process's shutdown token: a failed task cancels it too.
    supervisor: Supervisor,
    tasks: JoinSet<Result<(), server::Error>>,
    /// The admin port, stopped only once every server has: readiness turns
    /// false when the drain starts, and metrics stay scrapable through it.
    admin: Option<(tokio::task::JoinHandle<Result<(), server::Error>>, CancellationToken)>,
    /// Serves until dropped.
    _objects: Option<messenger_media::embedded::EmbeddedS3>,
}

impl Running {
    /// The gateway URL clients connect to.
    pub fn endpoint(&self) -> String {
        let scheme = if self.addresses.public_tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addresses.gateway.expect("gateway is running"))
    }

    /// The web app's URL, when the gateway's browser port is on.
    pub fn web_url(&self) -> Option<String> {
        let scheme = if self.addresses.public_tls { "https" } else { "http" };
        self.addresses.web.map(|address| format!("{scheme}://{address}/"))
    }

    /// A token that cancels every service (graceful drain).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.supervisor.stopping()
    }

    /// Starts and watches this process's background tasks.
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// Waits until every service has stopped; returns the first failure
    /// (a background task's panic counts: the process must exit non-zero).
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        while let Some(result) = self.tasks.join_next().await {
            let failure = match result {
                Ok(Ok(())) => continue,
                Ok(Err(error)) => anyhow::anyhow!(error),
                Err(join) => anyhow::anyhow!("service task failed: {join}"),
            };
            error!(error = %failure, "service stopped with an error; stopping the others");
            self.supervisor.stopping().cancel();
            first_error.get_or_insert(failure);
        }
        if let Some((admin, stop)) = self.admin.take() {
            stop.cancel();
            match admin.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => warn!(%error, "the admin port stopped with an error"),
                Err(join) => warn!(error = %join, "the admin port's task failed"),
            }
        }
        if let Some(failure) = self.supervisor.failure() {
            first_error.get_or_insert(anyhow::anyhow!("{failure}"));
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Starts a graceful drain and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.supervisor.stopping().cancel();
        self.wait().await
    }
}

/// Every listener `roles` needs, bound up front so port 0 resolves before
/// anyone needs another service's address.
struct Listeners {
    admin: Option<TcpListener>,
    /// Public, internal and (unless turned off) browser port.
    gateway: Option<(TcpListener, TcpListener, Option<TcpListener>)>,
    message: Option<TcpListener>,
    presence: Option<TcpListener>,
    media: Option<TcpListener>,
    notify: Option<TcpListener>,
}

async fn bind_roles(config: &Config, roles: &[Role]) -> anyhow::Result<Listeners> {
    let gateway = if roles.contains(&Role::Gateway) {
        let web = &config.gateway.web.listen;
        let web = if web.is_empty() { None } else { Some(bind(web).await?) };
        Some((bind(&config.gateway.listen).await?, bind(&config.gateway.internal_listen).await?, web))
    } else {
        None
    };
    let message = if roles.contains(&Role::Message) { Some(bind(&config.message.listen).await?) } else { None };
    let presence = if roles.contains(&Role::Presence) { Some(bind(&config.presence.listen).await?) } else { None };
    let media = if roles.contains(&Role::Media) { Some(bind(&config.media.listen).await?) } else { None };
    let notify = if roles.contains(&Role::Notify) { Some(bind(&config.notify.listen).await?) } else { None };
    let admin = if config.admin.listen.is_empty() { None } else { Some(bind(&config.admin.listen).await?) };
    Ok(Listeners { admin, gateway, message, presence, media, notify })
}

/// Starts `roles` in this process. Roles started here are reached at their
/// bound addresses; the others through `config.discovery`.
pub async fn start(mut config: Config, roles: &[Role]) -> anyhow::Result<Running> {
    messenger_platform::tls::install_default_provider();
    let listeners = bind_roles(&config, roles).await?;
    let mut addresses = Addresses::default();
    if let Some(listener) = &listeners.message {
        let address = local_addr(listener);
        addresses.message = Some(address);
        config.discovery.message = vec![address.to_string()];
    }
    if let Some(listener) = &listeners.presence {
        let address = local_addr(listener);
        addresses.presence = Some(address);
        config.discovery.presence = vec![address.to_string()];
    }
    if let Some(listener) = &listeners.media {
        let address = local_addr(listener);
        addresses.media = Some(address);
        config.discovery.media = vec![address.to_string()];
    }
    if let Some(listener) = &listeners.notify {
        let address = local_addr(listener);
        addresses.notify = Some(address);
        config.discovery.notify = vec![address.to_string()];
    }
    if let Some((public, internal, web)) = &listeners.gateway {
        addresses.gateway = Some(local_addr(public));
        addresses.gateway_internal = Some(local_addr(internal));
        addresses.web = web.as_ref().map(local_addr);
    }
    let shutdown = CancellationToken::new();
    let supervisor = Supervisor::new(shutdown.clone());
    let admin_listener = listeners.admin;
    addresses.admin = admin_listener.as_ref().map(local_addr);
    let security = Security::open(&mut config, &addresses, roles, &shutdown)?;
    addresses.public_tls = security.public.is_some();
    let mut tasks = JoinSet::new();
    let mut registrations = Vec::new();
    let discovery: Arc<dyn Discovery> = match config.discovery.backend {
        DiscoveryBackend::Static => Arc::new(StaticDiscovery::new(config.discovery.clone())),
        DiscoveryBackend::Etcd => {
            // Read again at every connection; a file missing now fails the start
            // instead of every attempt in the background.
            config.discovery.etcd.tls.tonic().map_err(|error| anyhow::anyhow!("discovery.etcd.tls: {error}"))?;
            let advertised = |address| config.discovery.advertised(address).map_err(anyhow::Error::msg);
            if let Some(address) = addresses.presence {
                registrations.push((Role::Presence, advertised(address)?));
            }
            if let Some(address) = addresses.message {
                registrations.push((Role::Message, advertised(address)?));
            }
            if let Some(address) = addresses.media {
                registrations.push((Role::Media, advertised(address)?));
            }
            if let Some(address) = addresses.notify {
                registrations.push((Role::Notify, advertised(address)?));
            }
            if let Some(address) = addresses.gateway_internal {
                let address = advertised(address)?;
                config.gateway.advertise_internal.get_or_insert_with(|| address.clone());
                registrations.push((Role::Gateway, address));
            }
            EtcdDiscovery::start(config.discovery.etcd.clone(), shutdown.clone()).await
        }
    };

    // Every service is built (stores opened, keys read: what can fail)
    // before any of them serves.
    let (server, tls) = (config.server.clone(), security.cluster.clone());
    let presence = match listeners.presence {
        Some(listener) => {
            let deps = messenger_presence::Deps { server: server.clone(), tls: tls.clone() };
            Some((messenger_presence::Server::build(config.presence.clone(), deps).await?, listener))
        }
        None => None,
    };
    let notify = match listeners.notify {
        Some(listener) => {
            let deps = messenger_notify::Deps {
                server: server.clone(),
                tls: tls.clone(),
                supervisor: supervisor.clone(),
                data_dir: config.data_dir.clone(),
                scylla: config.scylla.clone(),
            };
            Some((messenger_notify::Server::build(config.notify.clone(), deps).await?, listener))
        }
        None => None,
    };
    let message = match listeners.message {
        Some(listener) => {
            let deps = messenger_message::Deps {
                server: server.clone(),
                discovery: discovery.clone(),
                discovery_options: config.discovery.clone(),
                tls: tls.clone(),
                supervisor: supervisor.clone(),
                data_dir: config.data_dir.clone(),
                scylla: config.scylla.clone(),
            };
            Some((messenger_message::Server::build(config.message.clone(), deps).await?, listener))
        }
        None => None,
    };
    let mut objects = None;
    let media = match listeners.media {
        Some(listener) => {
            let (endpoint, embedded) = media_objects(&mut config).await?;
            addresses.objects = embedded.as_ref().map(|embedded| embedded.endpoint());
            objects = embedded;
            let deps = messenger_media::Deps {
                server: server.clone(),
                discovery: discovery.clone(),
                discovery_options: config.discovery.clone(),
                tls: tls.clone(),
                supervisor: supervisor.clone(),
                data_dir: config.data_dir.clone(),
                scylla: config.scylla.clone(),
                objects_endpoint: endpoint,
            };
            Some((messenger_media::Server::build(config.media.clone(), deps).await?, listener))
        }
        None => None,
    };
    let gateway = match listeners.gateway {
        Some((public, internal, web)) => {
            let deps = messenger_gateway::Deps {
                server: server.clone(),
                internal_address: local_addr(&internal),
                verifier: security.verifier.clone().expect("opened for the gateway role"),
                discovery: discovery.clone(),
                discovery_options: config.discovery.clone(),
                public_tls: security.public.clone(),
                web_tls: security.web.clone(),
                dev_auth: config.auth.uses_development_secret().then(|| config.auth.clone()),
                cluster_tls: tls.clone(),
                supervisor: supervisor.clone(),
            };
            let listeners = messenger_gateway::Listeners { public, internal, web };
            Some((messenger_gateway::Server::build(config.gateway.clone(), deps).await?, listeners))
        }
        None => None,
    };
    if let Some((presence, listener)) = presence {
        tasks.spawn(presence.serve(listener, shutdown.clone()));
    }
    if let Some((notify, listener)) = notify {
        tasks.spawn(notify.serve(listener, shutdown.clone()));
    }
    if let Some((message, listener)) = message {
        tasks.spawn(message.serve(listener, shutdown.clone()));
    }
    if let Some((media, listener)) = media {
        tasks.spawn(media.serve(listener, shutdown.clone()));
    }
    if let Some((gateway, listeners)) = gateway {
        tasks.spawn(gateway.serve(listeners, shutdown.clone()));
    }
    // Registered last, once every store is open and every server is serving:
    // nobody is routed to an instance that cannot answer yet.
    for (role, address) in registrations {
        let registration = etcd::register(config.discovery.etcd.clone(), role, address, shutdown.clone());
        tasks.spawn(async move {
            registration.await;
            Ok(())
        });
    }
    // Last: a start that failed on the way leaves no admin port behind.
    let admin = admin_listener.map(|listener| {
        let stop = CancellationToken::new();
        (tokio::spawn(messenger_platform::admin::serve(listener, shutdown.clone(), stop.clone())), stop)
    });
    Ok(Running { addresses, supervisor, tasks, admin, _objects: objects })
}

/// The embedded object store's access key id (its secret is made per run).
const EMBEDDED_ACCESS_KEY_ID: &str = "messenger-embedded";

/// The object store's endpoint: the configured one, or an S3-compatible
/// server started here (`media.s3.embedded`, what `messenger up` uses), with
/// data under `<data_dir>/objects` and a secret made for this run.
async fn media_objects(config: &mut Config) -> anyhow::Result<(String, Option<messenger_media::embedded::EmbeddedS3>)> {
    let s3 = &mut config.media.s3;
    if !s3.embedded {
        return Ok((s3.endpoint.clone(), None));
    }
    if s3.access_key_id.is_empty() {
        // One key id across runs: the store ties a multipart upload to the
        // key id that began it, and an upload begun before a restart must
        // go on after it. URLs signed with an earlier run's secret fail.
        s3.access_key_id = EMBEDDED_ACCESS_KEY_ID.to_owned();
        s3.secret_access_key = messenger_platform::ids::new_id().simple().to_string();
    }
    s3.create_bucket = true;
    let options = messenger_media::embedded::EmbeddedOptions {
        root: config.data_dir.join("objects"),
        listen: s3.embedded_listen.clone(),
        access_key_id: s3.access_key_id.clone(),
        secret_access_key: s3.secret_access_key.clone(),
        origin_secret: (!s3.embedded_origin_secret.is_empty()).then(|| s3.embedded_origin_secret.clone()),
        max_body_bytes: config.media.multipart_threshold_bytes.max(config.media.max_part_bytes),
    };
    let embedded = messenger_media::embedded::EmbeddedS3::start(options).await?;
    Ok((embedded.endpoint(), Some(embedded)))
}

/// Keys and certificates of this process, loaded before anything serves
/// and reloaded when their files change.
struct Security {
    /// The gateway's token verifier (only where the gateway runs).
    verifier: Option<Verifier>,
    public: Option<ServerTls>,
    /// The public certificate for the gateway's browser port (HTTP/1.1).
    web: Option<ServerTls>,
    cluster: Option<ServerTls>,
}

impl Security {
    /// Refuses what must not run: a gateway without keys (outside
    /// development mode), a non-loopback internal port without mutual TLS
    /// (unless `tls.insecure_cluster_plaintext`). Puts the cluster client
    /// TLS into `config.discovery` so every internal channel uses it.
    fn open(
        config: &mut Config,
        addresses: &Addresses,
        roles: &[Role],
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Security> {
        let tls = &config.tls;
        let cluster = ServerTls::cluster(tls)?;
        let client = ClientTls::cluster(tls)?;
        let internal =
            [addresses.message, addresses.presence, addresses.media, addresses.notify, addresses.gateway_internal];
        if cluster.is_none()
            && !tls.insecure_cluster_plaintext
            && let Some(exposed) = internal.into_iter().flatten().find(|address| !address.ip().is_loopback())
        {
            anyhow::bail!(
                "internal port {exposed} is not on loopback and mutual TLS is off: anyone who reaches it could \
                 act as any user. Set tls.cluster_ca_file, tls.cluster_cert_file and tls.cluster_key_file \
                 (`messenger certs` makes a development set), or tls.insecure_cluster_plaintext = true if \
                 something else authenticates every hop"
            );
        }
        if let Some(server) = &cluster {
            server.watch("cluster server certificate", tls.reload_interval, shutdown.clone());
        }
        if let Some(client) = &client {
            client.watch(shutdown.clone());
        }
        let (mut verifier, mut public, mut web) = (None, None, None);
        if roles.contains(&Role::Gateway) {
            let keys = Verifier::from_options(&config.auth)?;
            if config.auth.uses_development_secret() {
                // Anyone can sign a token with the published secret: fine on
                // this machine only.
                let public_ports = [addresses.gateway, addresses.web];
                if let Some(address) = public_ports.into_iter().flatten().find(|address| !address.ip().is_loopback()) {
                    anyhow::bail!(
                        "the public port {address} is not on loopback and auth uses the published development \
                         secret: anyone could sign in as anyone. Configure auth.jwks_file or auth.hs256_secret, \
                         or listen on 127.0.0.1"
                    );
                }
                warn!("auth uses the published development secret (development mode): any token it signs is accepted");
            }
            let reloading = keys.clone();
            messenger_platform::reload::watch(
                "auth keys",
                config.auth.key_files(),
                config.auth.reload_interval,
                shutdown.clone(),
                move || reloading.reload().map(|count| format!("{count} keys")).map_err(|e| e.to_string()),
            );
            verifier = Some(keys);
            public = ServerTls::public(tls)?;
            if let Some(server) = &public {
                server.watch("public certificate", tls.reload_interval, shutdown.clone());
                let browsers = server.http1()?;
                browsers.watch("public certificate (browser port)", tls.reload_interval, shutdown.clone());
                web = Some(browsers);
            } else if let Some(address) = addresses.gateway.filter(|address| !address.ip().is_loopback()) {
                warn!(%address, "public port without TLS: terminate TLS in front of it, or set tls.public_cert_file");
            }
        }
        config.discovery.tls = client;
        Ok(Security { verifier, public, web, cluster })
    }
}

/// Creates or upgrades the schema of the configured message store, and of
/// the media and notify stores when they are on Scylla too (`messenger migrate`); returns
/// what it did, for the operator.
pub async fn migrate(config: &Config) -> anyhow::Result<String> {
    let mut report = match config.message.store {
        // Opening a SQLite database runs its migrations.
        StoreBackend::Sqlite => {
            drop(SqliteStore::open(&config.database_path(), &config.message.sqlite)?);
            format!("sqlite {}: schema up to date", config.database_path().display())
        }
        StoreBackend::Scylla => messenger_message::scylla::migrate(&config.scylla).await?.to_string(),
    };
    if config.media.store == messenger_media::StoreBackend::Scylla {
        let media = messenger_media::scylla::migrate(&config.scylla).await?;
        report.push_str(&format!("\n{media}"));
    }
    if config.notify.store == messenger_notify::StoreBackend::Scylla {
        let push = messenger_notify::scylla::migrate(&config.scylla).await?;
        report.push_str(&format!("\n{push}"));
    }
    Ok(report)
}

/// Every role: what `messenger up` runs.
pub const ALL_ROLES: [Role; 5] = Role::ALL;
