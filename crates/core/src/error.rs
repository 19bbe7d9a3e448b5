//! The fleet's error taxonomy.
//!
//! Every failure a caller can see is one of these kinds, so each maps to exactly
//! one gRPC code, one HTTP status and one metric label. Library crates keep their
//! own precise error enums and convert into this at the service boundary.

use std::fmt::Display;

/// Result with the fleet's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failure as the caller sees it. The message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request is malformed or asks for something unsupported.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A bounded queue, slot pool or rate limit is full; retry later.
    #[error("resource exhausted: {0}")]
    Overloaded(String),
    /// The service cannot take work now (starting, draining, dependency down); retryable.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A named thing (model, job, session) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// No valid credentials.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Credentials are valid but do not allow this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The work did not finish before its deadline.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The caller or the server abandoned the work.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A state the request cannot be applied in (e.g. cancelling a finished job).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// A bug or an unexpected failure of a dependency.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Stable label for metrics (`outcome="…"`); never changes once released.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidArgument(_) => "invalid_argument",
            Error::Overloaded(_) => "overloaded",
            Error::Unavailable(_) => "unavailable",
            Error::NotFound(_) => "not_found",
            Error::Unauthenticated(_) => "unauthenticated",
            Error::PermissionDenied(_) => "permission_denied",
            Error::DeadlineExceeded(_) => "deadline_exceeded",
            Error::Cancelled(_) => "cancelled",
            Error::FailedPrecondition(_) => "failed_precondition",
            Error::Internal(_) => "internal",
        }
    }

    /// The gRPC status code of this kind.
    #[cfg(feature = "fleet")]
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            Error::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Error::Overloaded(_) => tonic::Code::ResourceExhausted,
            Error::Unavailable(_) => tonic::Code::Unavailable,
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Error::PermissionDenied(_) => tonic::Code::PermissionDenied,
            Error::DeadlineExceeded(_) => tonic::Code::DeadlineExceeded,
            Error::Cancelled(_) => tonic::Code::Cancelled,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::Internal(_) => tonic::Code::Internal,
        }
    }

    /// The HTTP status code of this kind.
    pub fn http_status(&self) -> u16 {
        match self {
            Error::InvalidArgument(_) => 400,
            Error::Unauthenticated(_) => 401,
            Error::PermissionDenied(_) => 403,
            Error::NotFound(_) => 404,
            Error::FailedPrecondition(_) => 409,
            Error::Cancelled(_) => 499,
            Error::Overloaded(_) => 429,
            Error::Internal(_) => 500,
            Error::Unavailable(_) => 503,
            Error::DeadlineExceeded(_) => 504,
        }
    }

    /// Whether retrying the same request later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Overloaded(_) | Error::Unavailable(_) | Error::DeadlineExceeded(_)
        )
    }

    /// The message without the kind prefix.
    pub fn message(&self) -> &str {
        match self {
            Error::InvalidArgument(m)
            | Error::Overloaded(m)
            | Error::Unavailable(m)
            | Error::NotFound(m)
            | Error::Unauthenticated(m)
            | Error::PermissionDenied(m)
            | Error::DeadlineExceeded(m)
            | Error::Cancelled(m)
            | Error::FailedPrecondition(m)
            | Error::Internal(m) => m,
        }
    }
}

#[cfg(feature = "fleet")]
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.grpc_code(), e.message().to_owned())
    }
}

/// Turns a foreign error into a fleet [`Error`] of a chosen kind, keeping its
/// message behind a short context (TEI's `.s()` / `.e()` idea, with the kind explicit).
pub trait ResultExt<T> {
    /// The failure is the caller's fault.
    fn invalid(self, context: &str) -> Result<T>;
    /// The failure is ours.
    fn internal(self, context: &str) -> Result<T>;
    /// A dependency is down; the caller may retry.
    fn unavailable(self, context: &str) -> Result<T>;
}

impl<T, E: Display> ResultExt<T> for std::result::Result<T, E> {
    fn invalid(self, context: &str) -> Result<T> {
        self.map_err(|e| Error::InvalidArgument(format!("{context}: {e}")))
    }
    fn internal(self, context: &str) -> Result<T> {
        self.map_err(|e| Error::Internal(format!("{context}: {e}")))
    }
    fn unavailable(self, context: &str) -> Result<T> {
        self.map_err(|e| Error::Unavailable(format!("{context}: {e}")))
    }
}

#[cfg(all(test, feature = "fleet"))]
mod tests {
    use super::*;

    #[test]
    fn overload_is_resource_exhausted_and_429() {
        let e = Error::Overloaded("decoder pool has no free slot".into());
        assert_eq!(e.grpc_code(), tonic::Code::ResourceExhausted);
        assert_eq!(e.http_status(), 429);
        assert_eq!(e.metric_label(), "overloaded");
        assert!(e.is_retryable());
        let status: tonic::Status = e.into();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(status.message(), "decoder pool has no free slot");
    }

    #[test]
    fn bad_input_is_invalid_argument_with_context() {
        let parsed: std::result::Result<u32, _> = "x1".parse::<u32>();
        let e = parsed.invalid("sample_rate_hz").unwrap_err();
        assert_eq!(e.grpc_code(), tonic::Code::InvalidArgument);
        assert_eq!(e.http_status(), 400);
        assert!(e.message().starts_with("sample_rate_hz: "), "{e}");
        assert!(!e.is_retryable());
    }

    #[test]
    fn labels_are_distinct() {
        let all = [
            Error::InvalidArgument(String::new()),
            Error::Overloaded(String::new()),
            Error::Unavailable(String::new()),
            Error::NotFound(String::new()),
            Error::Unauthenticated(String::new()),
            Error::PermissionDenied(String::new()),
            Error::DeadlineExceeded(String::new()),
            Error::Cancelled(String::new()),
            Error::FailedPrecondition(String::new()),
            Error::Internal(String::new()),
        ];
        let labels: std::collections::HashSet<_> = all.iter().map(Error::metric_label).collect();
        let codes: std::collections::HashSet<_> =
            all.iter().map(|e| e.grpc_code() as i32).collect();
        assert_eq!(labels.len(), all.len());
        assert_eq!(codes.len(), all.len());
    }
}
