//! The notify service's one error type and its mapping to gRPC codes.

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A count limit (devices per user, entries per call).
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    #[error("storage failure: {0}")]
    Storage(String),
    /// Settings or credential files that cannot be used (at start).
    #[error("configuration: {0}")]
    Config(String),
}

impl From<Error> for Status {
    /// Storage failures reach the caller as an error id only; the details
    /// (SQL text) go to this service's log under that id.
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::NotFound(_) => Status::not_found(message),
            Error::InvalidArgument(_) => Status::invalid_argument(message),
            Error::ResourceExhausted(_) => Status::resource_exhausted(message),
            Error::Storage(detail) | Error::Config(detail) => {
                let error_id = messenger_platform::ids::new_id();
                tracing::error!(%error_id, %detail, "notify request failed");
                Status::internal(format!("internal error (error id {error_id})"))
            }
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
