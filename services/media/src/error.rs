//! The media service's one error type and its mapping to gRPC codes.

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Unknown media, someone else's, or a conversation the caller cannot
    /// see: one answer, so nothing about other users' uploads leaks.
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The upload is in the wrong state, or its bytes are not what was declared.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// A quota, a rate or a decode limit.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// Object storage or a peer service failed; details go to the log only.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("storage failure: {0}")]
    Storage(String),
    /// A peer's own answer (the message service's NOT_FOUND, say), passed on.
    #[error("{}", .0.message())]
    Peer(Status),
}

impl From<Error> for Status {
    /// Storage and backend failures reach the client as an error id only; the
    /// details (SQL, S3 and driver text) go to this service's log under that id.
    fn from(error: Error) -> Self {
        if let Error::Storage(detail) | Error::Unavailable(detail) = &error {
            let error_id = messenger_platform::ids::new_id();
            tracing::error!(%error_id, %detail, "media request failed");
            return match error {
                Error::Storage(_) => Status::internal(format!("internal error (error id {error_id})")),
                _ => Status::unavailable(format!("service unavailable, retry (error id {error_id})")),
            };
        }
        let message = error.to_string();
        match error {
            Error::NotFound(_) => Status::not_found(message),
            Error::InvalidArgument(_) => Status::invalid_argument(message),
            Error::FailedPrecondition(_) => Status::failed_precondition(message),
            Error::ResourceExhausted(_) => Status::resource_exhausted(message),
            Error::Peer(status) => status,
            Error::Storage(_) | Error::Unavailable(_) => unreachable!("handled above"),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
