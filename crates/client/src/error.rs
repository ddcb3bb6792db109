use tonic::{Code, Status};

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The server refused the request; `code` says why (NOT_FOUND, INVALID_ARGUMENT, ...).
    #[error("{code:?}: {message}")]
    Rejected { code: Code, message: String },
    /// The token was missing, expired or badly signed. Not retried.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("no answer within the send timeout; retry with the same client_msg_id")]
    Timeout,
    #[error("could not reach the server: {0}")]
    Unavailable(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("client closed")]
    Closed,
}

impl Error {
    /// The gRPC code this error stands for.
    pub fn code(&self) -> Code {
        match self {
            Error::Rejected { code, .. } => *code,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::Timeout => Code::DeadlineExceeded,
            Error::Unavailable(_) => Code::Unavailable,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::Protocol(_) => Code::Internal,
            Error::Closed => Code::Cancelled,
        }
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        match status.code() {
            Code::Unauthenticated => Error::Unauthenticated(status.message().to_owned()),
            Code::Unavailable => Error::Unavailable(status.message().to_owned()),
            code => Error::Rejected { code, message: status.message().to_owned() },
        }
    }
}
