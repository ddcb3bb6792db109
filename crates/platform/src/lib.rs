//! What every messenger service shares, so that each service crate holds only
//! its own domain logic.
//!
//! Layout:
//! - [`config`]: layered configuration (defaults -> TOML file -> `MESSENGER_*`
//!   environment -> command-line flags) into any typed, validated struct.
//! - [`telemetry`]: structured logging setup (pretty for laptops, JSON for
//!   clusters) and OTLP export; [`trace`]: W3C trace context on every hop.
//! - [`metrics`]: OpenTelemetry instruments and RED per RPC (a tower layer on
//!   every server); [`admin`]: the admin port (`/metrics`, `/livez`, `/readyz`).
//! - [`discovery`]: where each role's instances listen: static addresses, or
//!   etcd registrations and a watch, behind one trait; [`local`]: calls to a
//!   service in the same process, made without the network.
//! - [`auth`]: JWT bearer verification (HS256, RS256, ES256, JWKS, keys
//!   reloaded on change) and development tokens.
//! - [`role`]: the five roles a process can play.
//! - [`tls`]: TLS on the public port, mutual TLS between services, the roles
//!   a cluster certificate carries, TLS to Redis, CQL and etcd;
//!   [`authorize`]: which role may call which internal RPC; [`reload`]: key
//!   and certificate files read again on change.
//! - [`cql`]: what the CQL stores share: cluster session, driver error
//!   mapping, LWT answers, versioned schema migrations.
//! - [`error`]: the one mapping of every service's errors to gRPC statuses
//!   (codes, retryability, internal text logged under an error id).
//! - [`ids`]: UUIDv7 ids and wall-clock milliseconds.
//! - [`server`]: the bootstrap every gRPC server uses: HTTP/2 limits, health,
//!   reflection, graceful drain; [`connections`]: per-address connection caps
//!   and the first-byte timeout every accepted socket is held to; [`web`]:
//!   the same for the HTTP/1.1 port browsers use (WebSocket upgrades).
//! - [`shutdown`]: the one shutdown-signal future; [`supervise`]: background
//!   tasks whose panic stops the process (health NOT_SERVING, exit non-zero).

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod authorize;
pub mod config;
pub mod connections;
pub mod cql;
pub mod discovery;
pub mod error;
pub mod ids;
pub mod local;
pub mod metrics;
pub mod redis;
pub mod reload;
pub mod role;
pub mod server;
pub mod shutdown;
pub mod supervise;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod web;
