//! The message service's one error type and its mapping to gRPC codes.

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Also returned to non-members, so a conversation's existence never leaks.
    #[error("conversation not found")]
    ConversationNotFound,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("message body is {size} bytes; the limit is {limit} bytes")]
    BodyTooLarge { size: usize, limit: usize },
    #[error("storage failure: {0}")]
    Storage(String),
    #[error("service unavailable: {0}")]
    Unavailable(String),
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::ConversationNotFound => Status::not_found(message),
            Error::InvalidArgument(_) | Error::BodyTooLarge { .. } => Status::invalid_argument(message),
            Error::Storage(_) => Status::internal(message),
            Error::Unavailable(_) => Status::unavailable(message),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
