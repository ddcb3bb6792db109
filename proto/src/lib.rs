//! The messenger wire protocol: package `messenger.v1`, one `.proto` file per
//! service under `messenger/v1/`, compiled with prost and tonic.
//!
//! Layout:
//! - `common.proto`: `Message`, `Conversation`, `SendAck`, shared by every service.
//! - `gateway.proto`: the client-facing `GatewayService` (the `Connect` stream and
//!   unary calls); `gateway_internal.proto`: `GatewayInternalService::Deliver`.
//! - `message.proto`, `presence.proto`, `media.proto`, `notify.proto`: the
//!   internal APIs of those services.
//!
//! [`FILE_DESCRIPTOR_SET`] feeds gRPC reflection on every server; [`codec`] is the
//! prost codec with small initial buffers that every generated stub uses.

#![forbid(unsafe_code)]

pub mod codec;

/// Generated code for `messenger.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("messenger.v1");
}

/// Encoded `FileDescriptorSet` of every messenger proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("messenger_descriptor");
