//! The message service's one error type and its mapping to gRPC codes.

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Also returned to non-members, so a conversation's existence never leaks.
    #[error("conversation not found")]
    ConversationNotFound,
    /// A user who blocked the caller, as the caller sees it.
    #[error("user not found")]
    UserNotFound,
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
    /// The media service refused a send's media (not found, not complete): its answer, passed on.
    #[error("{}", .0.message())]
    Media(Status),
}

impl From<messenger_platform::cql::Error> for Error {
    fn from(error: messenger_platform::cql::Error) -> Self {
        match error {
            messenger_platform::cql::Error::Unavailable(text) => Error::Unavailable(text),
            messenger_platform::cql::Error::Storage(text) => Error::Storage(text),
        }
    }
}

impl From<Error> for Status {
    /// Storage and backend failures reach the client as an error id only: the
    /// details (SQL, driver and Redis text) go to this service's log under
    /// that id, where an operator can find them.
    fn from(error: Error) -> Self {
        if let Error::Storage(detail) | Error::Unavailable(detail) = &error {
            let error_id = messenger_platform::ids::new_id();
            tracing::error!(%error_id, %detail, "request failed");
            return match error {
                Error::Storage(_) => Status::internal(format!("internal error (error id {error_id})")),
                _ => Status::unavailable(format!("service unavailable, retry (error id {error_id})")),
            };
        }
        let message = error.to_string();
        match error {
            Error::ConversationNotFound | Error::UserNotFound | Error::MessageNotFound(_) => Status::not_found(message),
            Error::NoLongerMember | Error::PermissionDenied(_) => Status::permission_denied(message),
            Error::InvalidArgument(_) | Error::BodyTooLarge { .. } => Status::invalid_argument(message),
            Error::FailedPrecondition(_) => Status::failed_precondition(message),
            Error::Storage(_) => Status::internal(message),
            Error::Unavailable(_) => Status::unavailable(message),
            Error::Media(status) => status,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_and_backend_text_never_reaches_the_client() {
        let status = Status::from(Error::Storage("disk I/O error in messages_idx".into()));
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(!status.message().contains("disk"), "{}", status.message());
        assert!(status.message().contains("error id "), "{}", status.message());
        let status = Status::from(Error::Unavailable("redis: Timeout Error".into()));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(!status.message().contains("redis"), "{}", status.message());
        let status = Status::from(Error::ConversationNotFound);
        assert_eq!(status.message(), "conversation not found", "domain errors keep their words");
    }
}
