//! The message service's one error type and its mapping to gRPC codes.

/// Clone: a batch of sends answers each waiter with its own copy.
#[derive(Clone, Debug, thiserror::Error)]
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
    /// The media service refused a send's media (not found, not complete):
    /// its answer, passed on.
    #[error("{1}")]
    Media(MediaRefusal, String),
}

/// Why the media service refused media for a send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaRefusal {
    NotFound,
    FailedPrecondition,
    InvalidArgument,
}

impl From<messenger_platform::cql::Error> for Error {
    fn from(error: messenger_platform::cql::Error) -> Self {
        match error {
            messenger_platform::cql::Error::Unavailable(text) => Error::Unavailable(text),
            messenger_platform::cql::Error::Storage(text) => Error::Storage(text),
        }
    }
}

impl messenger_platform::error::ServiceError for Error {
    fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::ConversationNotFound | Error::UserNotFound | Error::MessageNotFound(_) => Code::NotFound,
            Error::NoLongerMember | Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::InvalidArgument(_) | Error::BodyTooLarge { .. } => Code::InvalidArgument,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Storage(_) => Code::Internal,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Media(MediaRefusal::NotFound, _) => Code::NotFound,
            Error::Media(MediaRefusal::FailedPrecondition, _) => Code::FailedPrecondition,
            Error::Media(MediaRefusal::InvalidArgument, _) => Code::InvalidArgument,
        }
    }

    /// Storage and backend text (SQL, driver, Redis) stays in this service's log.
    fn internal(&self) -> bool {
        matches!(self, Error::Storage(_) | Error::Unavailable(_))
    }
}

messenger_platform::status_from!(Error);

pub type Result<T, E = Error> = std::result::Result<T, E>;
