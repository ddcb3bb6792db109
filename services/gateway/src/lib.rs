//! The gateway: the only service clients talk to.
//!
//! It authenticates every call (JWT bearer), holds one `Connect` stream per
//! device, forwards sends and unary calls to the message service with the
//! verified user id, and receives `Deliver` batches on a separate internal
//! port to push committed messages to the sessions it holds.
//!
//! Layout:
//! - `api.rs`: `GatewayService` (Connect + unary calls), behind the auth interceptor.
//! - `session.rs`: one Connect stream: Hello, presence, the serve loop,
//!   slow-consumer handling; `session/order.rs` the delivery order (backlog
//!   sync, live push with gap fill, never past what is readable; unit tested
//!   against a fake message service); `session/frames.rs` the client's frames.
//! - `registry.rs`: session id -> session inbox, used by `Deliver`.
//! - `acks.rs`: every session's delivered acks, sent in one call per interval.
//! - `sends.rs`: sends, over one `SendStream` per message-service instance.
//! - `internal.rs`: `GatewayInternalService::Deliver`.
//! - `limits.rs`: per-user and per-address rate limits (RESOURCE_EXHAUSTED
//!   with RetryInfo), and the cap on streams waiting for their Hello.
//! - `leases.rs`: renews every session's presence lease in one `Renew` per
//!   interval; re-registers the sessions presence no longer knows.
//! - `web.rs`: the browser port (the web app, gRPC-Web, origin checks);
//!   `websocket.rs`: a session over a WebSocket.
//!
//! Started as every service is: [`Server::build`] sets up the shared context
//! (clients of the other services, limits, the session registry), then
//! [`Server::serve`] runs the listeners until the shutdown token is cancelled.

#![forbid(unsafe_code)]

mod acks;
mod api;
mod internal;
mod leases;
mod limits;
mod options;
mod registry;
mod sends;
mod session;
mod web;
mod websocket;

use std::{sync::Arc, time::Duration};

use messenger_platform::discovery::RoleChannel;
use messenger_platform::{
    auth::{AuthOptions, Verifier},
    authorize,
    discovery::{self, Discovery, DiscoveryOptions, Role},
    server::{self, Port, ServerOptions},
    supervise::Supervisor,
    tls::ServerTls,
};
use messenger_proto::v1::{
    gateway_internal_service_server::{self, GatewayInternalServiceServer},
    gateway_service_server::{self, GatewayServiceServer},
    media_service_client::MediaServiceClient,
    message_service_client::MessageServiceClient,
    notify_service_client::NotifyServiceClient,
    presence_service_client::PresenceServiceClient,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use options::{Options, Rate, RateLimits, WebOptions};

/// Deadline of calls to the media service: completing an upload reads and
/// re-encodes a whole image, or assembles a multipart upload.
const MEDIA_CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// What every session and handler of one gateway instance shares.
pub(crate) struct Context {
    options: Options,
    gateway_id: String,
    advertise_internal: String,
    registry: registry::Registry,
    message: MessageServiceClient<RoleChannel>,
    /// Sends, over one stream per message-service instance.
    sends: sends::Sends,
    presence: PresenceServiceClient<RoleChannel>,
    media: MediaServiceClient<RoleChannel>,
    notify: NotifyServiceClient<RoleChannel>,
    /// Connect streams accepted and not yet finished (bounded by `max_sessions`).
    open_streams: std::sync::atomic::AtomicUsize,
    /// Delivered acks of all sessions, flushed together.
    acks: Arc<acks::AckBatcher>,
    /// Every public call's rate limits, per user (shared by all of a user's
    /// sessions on this instance) and per client address.
    limits: limits::Limits,
    /// Clock skew tolerated on a token's `exp` (`auth.leeway`): a stream ends
    /// when its token would no longer verify.
    token_leeway: Duration,
    shutdown: CancellationToken,
}

/// What the gateway needs from the outside.
pub struct Deps {
    pub server: ServerOptions,
    /// The internal port's bound address: what message instances deliver
    /// to, unless `advertise_internal` names another.
    pub internal_address: std::net::SocketAddr,
    pub verifier: Verifier,
    pub discovery: Arc<dyn Discovery>,
    pub discovery_options: DiscoveryOptions,
    /// TLS on the public port, when configured.
    pub public_tls: Option<ServerTls>,
    /// The same certificate for the browser port (HTTP/1.1 in ALPN).
    pub web_tls: Option<ServerTls>,
    /// The development key, when the process runs with it: the browser port
    /// then mints tokens by user id (`/v1/dev-token`).
    pub dev_auth: Option<AuthOptions>,
    /// Mutual TLS on the internal port, when the cluster has it.
    pub cluster_tls: Option<ServerTls>,
    /// Runs send pipes, lease renewal and ack flushes; a panic in any stops
    /// the process. Sessions are told to reconnect elsewhere when it stops:
    /// it must stop with the token `serve` is given.
    pub supervisor: Supervisor,
}

/// Who may call the internal port: message instances deliver.
fn callers() -> authorize::Rules {
    vec![("/messenger.v1.GatewayInternalService/Deliver", &[Role::Message])]
}

/// The gateway's listeners: public API, internal `Deliver`, and the
/// browser port unless it is turned off.
pub struct Listeners {
    pub public: TcpListener,
    pub internal: TcpListener,
    pub web: Option<TcpListener>,
}

/// The gateway with its context built, ready to serve.
pub struct Server {
    context: Arc<Context>,
    deps: Deps,
}

impl Server {
    /// Builds the context every session and handler shares.
    pub async fn build(options: Options, deps: Deps) -> Result<Self, server::Error> {
        let channel = |role| discovery::channel(deps.discovery.clone(), role, &deps.discovery_options);
        // One channel to the message role for unary calls and send streams alike:
        // one connection per instance, and an instance one of them could not
        // reach is passed over by both.
        let message = channel(Role::Message);
        let max_message_bytes = deps.server.internal_max_message_bytes;
        let context = Arc::new(Context {
            gateway_id: options.gateway_id.clone().unwrap_or_else(|| messenger_platform::ids::new_id().to_string()),
            advertise_internal: options.advertise_internal.clone().unwrap_or_else(|| deps.internal_address.to_string()),
            registry: registry::Registry::default(),
            message: MessageServiceClient::new(message.clone()).max_decoding_message_size(max_message_bytes),
            sends: sends::Sends::new(
                message,
                options.send_stream_max_inflight,
                deps.discovery_options.request_timeout,
                max_message_bytes,
                deps.supervisor.clone(),
            ),
            presence: PresenceServiceClient::new(channel(Role::Presence)),
            media: MediaServiceClient::new(discovery::channel(
                deps.discovery.clone(),
                Role::Media,
                &DiscoveryOptions {
                    request_timeout: deps.discovery_options.request_timeout.max(MEDIA_CALL_TIMEOUT),
                    ..deps.discovery_options.clone()
                },
            )),
            notify: NotifyServiceClient::new(channel(Role::Notify)),
            acks: Arc::default(),
            open_streams: std::sync::atomic::AtomicUsize::new(0),
            token_leeway: deps.verifier.options().leeway,
            limits: limits::Limits::new(
                limits::Rate::new(options.sends_per_second, options.send_burst),
                options.typing_per_second,
                &options.rate_limits,
            ),
            shutdown: deps.supervisor.stopping(),
            options,
        });
        Ok(Self { context, deps })
    }

    /// Serves the public API, `Deliver` on the internal port and the browser
    /// port (when given) until `shutdown` is cancelled; open sessions are
    /// told to reconnect elsewhere.
    pub async fn serve(self, listeners: Listeners, shutdown: CancellationToken) -> Result<(), server::Error> {
        let Self { context, deps } = self;
        let Listeners { public, internal, web } = listeners;
        let server_options = &deps.server;
        deps.supervisor.spawn("rate-limit sweep", forget_idle_rate_limits(context.clone()));
        deps.supervisor.spawn("lease renewal", leases::run(context.clone()));
        let ack_flush = context.acks.clone().run(
            context.message.clone(),
            context.options.ack_flush_interval,
            context.options.ack_flush_max_cursors,
            shutdown.clone(),
        );
        let web_server = {
            let state = web::Web::new(
                context.clone(),
                deps.verifier.clone(),
                deps.dev_auth.clone(),
                server_options,
                deps.web_tls.is_some(),
            );
            let (server_options, tls, shutdown) = (server_options.clone(), deps.web_tls.clone(), shutdown.clone());
            async move {
                let Some(listener) = web else { return Ok(()) };
                let router = web::router(Arc::new(state));
                messenger_platform::web::serve("gateway-web", &server_options, listener, tls, router, shutdown).await
            }
        };
        let public_api = GatewayServiceServer::new(api::Adapter { context: context.clone() })
            .max_decoding_message_size(server_options.max_message_bytes);
        let public_api = tonic::service::interceptor::InterceptedService::new(
            public_api,
            api::interceptor(&context, &deps.verifier),
        );
        let internal_api = GatewayInternalServiceServer::new(internal::Adapter { registry: context.registry.clone() })
            .max_decoding_message_size(server_options.internal_max_message_bytes);

        let public_server = server::serve(
            "gateway",
            server_options,
            Port::public(public, deps.public_tls.clone()),
            Routes::new(public_api),
            &[gateway_service_server::SERVICE_NAME],
            shutdown.clone(),
        );
        let internal_server = server::serve(
            "gateway-internal",
            server_options,
            Port::internal(internal, deps.cluster_tls.clone(), callers()),
            Routes::new(internal_api),
            &[gateway_internal_service_server::SERVICE_NAME],
            shutdown,
        );
        let (public_result, internal_result, web_result, ()) =
            tokio::join!(public_server, internal_server, web_server, ack_flush);
        public_result.and(internal_result).and(web_result)
    }
}

/// Keeps the rate limiter's memory proportional to recently active users.
async fn forget_idle_rate_limits(context: Arc<Context>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            () = context.shutdown.cancelled() => return,
            _ = tick.tick() => {
                context.limits.forget_idle();
            }
        }
    }
}
