//! The message service's one error type and its mapping to gRPC codes.

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Also returned to non-members, so a conversation's existence never leaks.
    #[error("conversation not found")]
    ConversationNotFound,
    /// A message the caller cannot see (or that does not exist).
    #[error("message {0} not found")]
    MessageNotFound(u64),
    /// The caller was a member and was removed or left.
    #[error("you are no longer a member of this conversation")]
    NoLongerMember,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("message body is {size} bytes; the limit is {limit} bytes")]
    BodyTooLarge { size: usize, limit: usize },
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("storage failure: {0}")]
    Storage(String),
    #[error("service unavailable: {0}")]
    Unavailable(String),
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::ConversationNotFound | Error::MessageNotFound(_) => Status::not_found(message),
            Error::NoLongerMember | Error::PermissionDenied(_) => Status::permission_denied(message),
            Error::InvalidArgument(_) | Error::BodyTooLarge { .. } => Status::invalid_argument(message),
            Error::FailedPrecondition(_) => Status::failed_precondition(message),
            Error::Storage(_) => Status::internal(message),
            Error::Unavailable(_) => Status::unavailable(message),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
