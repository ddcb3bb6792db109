//! One mapping from every service's domain errors to gRPC, in the shape of
//! quickwit's `ServiceErrorCode`: each service's `Error` says what it means
//! at the edge ([`ServiceError`]), and [`into_status`] is the only place a
//! status is made from one.
//!
//! Internal errors (storage, drivers, peers' transport failures) never show
//! their text to the caller: it goes to the log under a fresh error id, and
//! the caller gets only that id, as UNAVAILABLE ("retry") when a retry may
//! succeed and INTERNAL when it may not.

use tonic::{Code, Status};

/// What a domain error means to the caller.
pub trait ServiceError: std::error::Error {
    /// The gRPC code the caller gets for a public error.
    fn code(&self) -> Code;

    /// Whether the text is internal detail (SQL, driver or backend text),
    /// to be logged under an error id rather than answered.
    fn internal(&self) -> bool {
        false
    }

    /// Whether the same call may succeed if retried as it is. For internal
    /// errors this picks UNAVAILABLE over INTERNAL.
    fn retryable(&self) -> bool {
        matches!(self.code(), Code::Unavailable | Code::Aborted)
    }
}

/// The status a caller gets for `error`; see the module docs.
pub fn into_status(error: &impl ServiceError) -> Status {
    if !error.internal() {
        return Status::new(error.code(), error.to_string());
    }
    let error_id = crate::ids::new_id();
    tracing::error!(%error_id, detail = %error, "request failed");
    if error.retryable() {
        Status::unavailable(format!("service unavailable, retry (error id {error_id})"))
    } else {
        Status::internal(format!("internal error (error id {error_id})"))
    }
}

/// `impl From<$error> for tonic::Status` through [`into_status`]: what each
/// service writes once for its `Error` (a blanket impl is not allowed: both
/// types are foreign to this crate).
#[macro_export]
macro_rules! status_from {
    ($error:ty) => {
        impl From<$error> for tonic::Status {
            fn from(error: $error) -> Self {
                $crate::error::into_status(&error)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Error {
        #[error("conversation not found")]
        NotFound,
        #[error("storage failure: {0}")]
        Storage(String),
        #[error("unavailable: {0}")]
        Unavailable(String),
    }

    impl ServiceError for Error {
        fn code(&self) -> Code {
            match self {
                Error::NotFound => Code::NotFound,
                Error::Storage(_) => Code::Internal,
                Error::Unavailable(_) => Code::Unavailable,
            }
        }

        fn internal(&self) -> bool {
            matches!(self, Error::Storage(_) | Error::Unavailable(_))
        }
    }

    #[test]
    fn internal_text_never_reaches_the_caller() {
        let status = into_status(&Error::Storage("disk I/O error in messages_idx".into()));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("disk"), "{}", status.message());
        assert!(status.message().contains("error id "), "{}", status.message());
        let status = into_status(&Error::Unavailable("redis: Timeout Error".into()));
        assert_eq!(status.code(), Code::Unavailable, "a retryable internal error says retry");
        assert!(!status.message().contains("redis"), "{}", status.message());
        assert!(status.message().contains("retry"), "{}", status.message());
    }

    #[test]
    fn public_errors_keep_their_code_and_words() {
        let status = into_status(&Error::NotFound);
        assert_eq!((status.code(), status.message()), (Code::NotFound, "conversation not found"));
    }
}
