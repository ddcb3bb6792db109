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

impl messenger_platform::error::ServiceError for Error {
    fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::NotFound(_) => Code::NotFound,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Storage(_) => Code::Internal,
            Error::Peer(status) => status.code(),
        }
    }

    /// Storage and backend text (SQL, S3, driver) stays in this service's log.
    fn internal(&self) -> bool {
        matches!(self, Error::Storage(_) | Error::Unavailable(_))
    }
}

messenger_platform::status_from!(Error);

pub type Result<T, E = Error> = std::result::Result<T, E>;
