//! End-to-end: the whole system started in-process on loopback ports (each
//! service on its own port, talking gRPC), driven through the client SDK as
//! an app would. One test binary; one module per area.

mod cache;
mod cluster;
mod conversations;
mod core;
mod limits;
mod media;
mod model;
mod notify;
mod operability;
mod security;
mod support;
mod visibility;
mod web;
