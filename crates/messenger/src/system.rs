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
}

/// A running set of services.
pub struct Running {
    pub addresses: Addresses,
    shutdown: CancellationToken,
    tasks: JoinSet<Result<(), server::Error>>,
}

impl Running {
    /// The gateway URL clients connect to.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addresses.gateway.expect("gateway is running"))
    }

    /// A token that cancels every service (graceful drain).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until every service has stopped; returns the first failure.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        while let Some(result) = self.tasks.join_next().await {
            let failure = match result {
                Ok(Ok(())) => continue,
                Ok(Err(error)) => anyhow::anyhow!(error),
                Err(join) => anyhow::anyhow!("service task failed: {join}"),
            };
            error!(error = %failure, "service stopped with an error; stopping the others");
            self.shutdown.cancel();
            first_error.get_or_insert(failure);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Starts a graceful drain and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// Every listener `roles` needs, bound up front so port 0 resolves before
/// anyone needs another service's address.
struct Listeners {
    gateway: Option<(TcpListener, TcpListener)>,
    message: Option<TcpListener>,
    presence: Option<TcpListener>,
}

async fn bind_roles(config: &Config, roles: &[Role]) -> anyhow::Result<Listeners> {
    let gateway = if roles.contains(&Role::Gateway) {
        Some((bind(&config.gateway.listen).await?, bind(&config.gateway.internal_listen).await?))
    } else {
        None
    };
    let message = if roles.contains(&Role::Message) { Some(bind(&config.message.listen).await?) } else { None };
    let presence = if roles.contains(&Role::Presence) { Some(bind(&config.presence.listen).await?) } else { None };
    Ok(Listeners { gateway, message, presence })
}

/// Starts `roles` in this process. Roles started here are reached at their
/// bound addresses; the others through `config.discovery`.
pub async fn start(mut config: Config, roles: &[Role]) -> anyhow::Result<Running> {
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
    if let Some((public, internal)) = &listeners.gateway {
        addresses.gateway = Some(local_addr(public));
        addresses.gateway_internal = Some(local_addr(internal));
    }
    if roles.contains(&Role::Gateway)
        && config.auth.hs256_secret.as_deref() == Some(messenger_platform::auth::DEV_SECRET)
    {
        warn!("auth uses the built-in development secret; set auth.hs256_secret or a public key outside a laptop");
    }
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut registrations = Vec::new();
    let discovery: Arc<dyn Discovery> = match config.discovery.backend {
        DiscoveryBackend::Static => Arc::new(StaticDiscovery::new(config.discovery.clone())),
        DiscoveryBackend::Etcd => {
            let advertised = |address| config.discovery.advertised(address).map_err(anyhow::Error::msg);
            if let Some(address) = addresses.presence {
                registrations.push((Role::Presence, advertised(address)?));
            }
            if let Some(address) = addresses.message {
                registrations.push((Role::Message, advertised(address)?));
            }
            if let Some(address) = addresses.gateway_internal {
                let address = advertised(address)?;
                config.gateway.advertise_internal.get_or_insert_with(|| address.clone());
                registrations.push((Role::Gateway, address));
            }
            EtcdDiscovery::start(config.discovery.etcd.clone(), shutdown.clone()).await
        }
    };

    if let Some(listener) = listeners.presence {
        let store = messenger_presence::open_store(&config.presence).await?;
        let (options, server_options, token) = (config.presence.clone(), config.server.clone(), shutdown.clone());
        tasks.spawn(messenger_presence::serve(options, server_options, store, listener, token));
    }
    if let Some(listener) = listeners.message {
        let mut store = open_store(&config).await?;
        if config.message.cache.enabled {
            store = Arc::new(messenger_message::cache::CachedStore::from_options(store, &config.message.cache).await?);
        }
        let deps = messenger_message::Deps {
            store,
            discovery: discovery.clone(),
            discovery_options: config.discovery.clone(),
        };
        let (options, server_options, token) = (config.message.clone(), config.server.clone(), shutdown.clone());
        tasks.spawn(messenger_message::serve(options, server_options, deps, listener, token));
    }
    if let Some((public, internal)) = listeners.gateway {
        let deps = messenger_gateway::Deps {
            verifier: Verifier::from_options(&config.auth)?,
            discovery: discovery.clone(),
            discovery_options: config.discovery.clone(),
        };
        let (options, server_options, token) = (config.gateway.clone(), config.server.clone(), shutdown.clone());
        tasks.spawn(messenger_gateway::serve(options, server_options, deps, public, internal, token));
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
    Ok(Running { addresses, shutdown, tasks })
}

/// The configured message store (migrated first when it is Scylla and
/// `message.scylla.migrate_on_start` is set).
async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn messenger_message::store::MessageStore>> {
    Ok(match config.message.store {
        StoreBackend::Sqlite => Arc::new(SqliteStore::open(&config.database_path(), &config.message.sqlite)?),
        StoreBackend::Scylla => {
            Arc::new(messenger_message::scylla::ScyllaStore::connect(&config.message.scylla).await?)
        }
    })
}

/// Creates or upgrades the configured message store's schema (`messenger migrate`).
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    match config.message.store {
        // Opening a SQLite database runs its migrations.
        StoreBackend::Sqlite => drop(SqliteStore::open(&config.database_path(), &config.message.sqlite)?),
        StoreBackend::Scylla => messenger_message::scylla::migrate(&config.message.scylla).await?,
    }
    Ok(())
}

/// Every role: what `messenger up` runs.
pub const ALL_ROLES: [Role; 3] = [Role::Presence, Role::Message, Role::Gateway];
