//! The notify service's one error type and its mapping to gRPC codes.

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
    /// The store cannot answer now (a CQL node down, say): a retry may succeed.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// Settings or credential files that cannot be used (at start).
    #[error("configuration: {0}")]
    Config(String),
}

impl messenger_platform::error::ServiceError for Error {
    fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::NotFound(_) => Code::NotFound,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Storage(_) | Error::Config(_) => Code::Internal,
        }
    }

    /// Storage text (SQL, driver) and file paths stay in this service's log.
    fn internal(&self) -> bool {
        matches!(self, Error::Storage(_) | Error::Unavailable(_) | Error::Config(_))
    }
}

messenger_platform::status_from!(Error);

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use messenger_platform::cql;
    use tonic::{Code, Status};

    use super::Error;

    #[test]
    fn a_store_that_cannot_answer_now_is_retryable_and_storage_text_stays_inside() {
        // As the message and media services answer it: a node down is worth a retry.
        let status = Status::from(Error::from(cql::Error::Unavailable("Cannot achieve consistency level".into())));
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(!status.message().contains("consistency"), "{}", status.message());
        let status = Status::from(Error::from(cql::Error::Storage("Invalid column name".into())));
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert!(!status.message().contains("column") && status.message().contains("error id"), "{status:?}");
    }
}
