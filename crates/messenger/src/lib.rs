//! The one messenger binary, as a library so tests can start the system
//! in-process on port 0 and drive it through the client SDK.
//!
//! Layout:
//! - [`config`]: the whole system's configuration (every service's `Options`).
//! - [`system`]: `up` (all services in one process) and `serve` (one role),
//!   both returning a [`system::Running`] handle.
//! - [`bench`]: `messenger bench`, the benchmark (clients made with the SDK).
//! - `chat.rs`: the interactive terminal client, built on the SDK.
//! - [`otlp`]: an OTLP/gRPC trace receiver (what the bench and the trace tests export to).
//! - `main.rs`: command-line parsing only.

#![forbid(unsafe_code)]

pub mod bench;
pub mod certs;
pub mod chat;
pub mod config;
pub mod otlp;
pub mod system;

pub use config::Config;
