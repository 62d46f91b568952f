//! The one mapping from failures to `tonic::Status`.
//!
//! Each service maps its own domain errors onto [`ApiError`] with an
//! exhaustive `match`; this module turns an [`ApiError`] into the status code
//! clients can act on. Internal causes are logged, never sent.

use o2c_money::MoneyError;
use sea_orm::DbErr;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// One bad field: its path in the request (`amount.currency_code`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// A failure, classified by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is wrong; retrying it unchanged cannot succeed.
    #[error("invalid request: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// A named resource does not exist (for this tenant).
    #[error("{0}")]
    NotFound(String),
    /// The resource being created already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// A business rule refuses the request in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A concurrent change won; retrying may succeed.
    #[error("{0}")]
    Aborted(String),
    /// A dependency (database, another service) is down; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// No valid credential came with the call.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but may not do this (role, or another tenant).
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller's quota is spent; retry after the given delay.
    #[error("{message}")]
    ResourceExhausted {
        message: String,
        retry_after: std::time::Duration,
    },
    /// A bug or an unexpected failure; the cause is logged, not sent.
    #[error("internal error: {0}")]
    Internal(String),
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ApiError {
    /// One invalid field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    pub fn not_found(resource: &'static str, id: impl ToString) -> Self {
        Self::NotFound(format!("{resource} {} not found", id.to_string()))
    }

    /// A money field that failed to parse, reported on the right sub-field.
    pub fn money(field: &str, error: MoneyError) -> Self {
        let sub = match &error {
            MoneyError::UnknownCurrency(_) | MoneyError::CurrencyMismatch { .. } => "currency_code",
            MoneyError::Malformed(_)
            | MoneyError::TooManyDecimals { .. }
            | MoneyError::OutOfRange => "amount",
        };
        Self::invalid(format!("{field}.{sub}"), error.to_string())
    }
}

/// How a database failure looks to a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DbFailure {
    /// The database is unreachable, restarting or shutting down: the same
    /// call succeeds once it is back.
    Unavailable,
    /// Lost a race with another transaction (serialization failure,
    /// deadlock): the same call succeeds when retried.
    Conflict,
    Other,
}

fn classify(error: &DbErr) -> DbFailure {
    use sea_orm::RuntimeErr;
    use sea_orm::sqlx::Error as Sqlx;
    match error {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => DbFailure::Unavailable,
        DbErr::Exec(RuntimeErr::SqlxError(cause)) | DbErr::Query(RuntimeErr::SqlxError(cause)) => {
            match cause.as_ref() {
                Sqlx::Io(_)
                | Sqlx::Tls(_)
                | Sqlx::Protocol(_)
                | Sqlx::PoolTimedOut
                | Sqlx::PoolClosed
                | Sqlx::WorkerCrashed => DbFailure::Unavailable,
                Sqlx::Database(db) => match db.code().as_deref() {
                    // PostgreSQL: connection exceptions (08…), operator
                    // intervention (57…: admin or crash shutdown, cannot
                    // connect now), out of resources (53…).
                    Some(code)
                        if code.starts_with("08")
                            || code.starts_with("57")
                            || code.starts_with("53") =>
                    {
                        DbFailure::Unavailable
                    }
                    // serialization_failure, deadlock_detected.
                    Some("40001" | "40P01") => DbFailure::Conflict,
                    _ => DbFailure::Other,
                },
                _ => DbFailure::Other,
            }
        }
        _ => DbFailure::Other,
    }
}

impl From<DbErr> for ApiError {
    fn from(error: DbErr) -> Self {
        match (classify(&error), &error) {
            // The cause is logged here; the caller learns only what to do.
            (DbFailure::Unavailable, _) => {
                tracing::warn!(%error, "database unavailable");
                ApiError::Unavailable("database unavailable; retry".into())
            }
            (DbFailure::Conflict, _) => {
                tracing::info!(%error, "transaction conflict");
                ApiError::Aborted("concurrent change; retry".into())
            }
            (DbFailure::Other, DbErr::RecordNotFound(what)) => {
                ApiError::Internal(format!("record not found: {what}"))
            }
            (DbFailure::Other, _) => ApiError::Internal(format!("database: {error}")),
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        match error {
            ApiError::InvalidArgument(violations) => {
                let message = describe(&violations);
                let details = ErrorDetails::with_bad_request(
                    violations
                        .into_iter()
                        .map(|v| tonic_types::FieldViolation::new(v.field, v.description))
                        .collect::<Vec<_>>(),
                );
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            ApiError::NotFound(message) => Status::not_found(message),
            ApiError::AlreadyExists(message) => Status::already_exists(message),
            ApiError::FailedPrecondition(message) => Status::failed_precondition(message),
            ApiError::Aborted(message) => Status::aborted(message),
            ApiError::Unavailable(message) => {
                tracing::warn!(%message, "dependency unavailable");
                Status::unavailable(message)
            }
            ApiError::Unauthenticated(message) => Status::unauthenticated(message),
            ApiError::PermissionDenied(message) => Status::permission_denied(message),
            ApiError::ResourceExhausted {
                message,
                retry_after,
            } => Status::with_error_details(
                Code::ResourceExhausted,
                message,
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            ApiError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

/// Classifies a status from another service so it can be passed on:
/// the caller's own mistakes stay theirs, a dependency's outage stays
/// retryable, anything else is our bug.
pub fn from_upstream(service: &str, status: Status) -> ApiError {
    let message = format!("{service}: {}", status.message());
    match status.code() {
        Code::InvalidArgument => {
            let details = status.get_error_details();
            let violations: Vec<FieldViolation> = details
                .bad_request()
                .map(|b| {
                    b.field_violations
                        .iter()
                        .map(|v| FieldViolation::new(v.field.clone(), v.description.clone()))
                        .collect()
                })
                .unwrap_or_default();
            if violations.is_empty() {
                ApiError::invalid("request", message)
            } else {
                ApiError::InvalidArgument(violations)
            }
        }
        Code::NotFound => ApiError::NotFound(status.message().to_owned()),
        Code::AlreadyExists => ApiError::AlreadyExists(message),
        Code::FailedPrecondition => ApiError::FailedPrecondition(message),
        Code::Aborted => ApiError::Aborted(message),
        // Another tenant's resource, as the owning service judged it.
        Code::PermissionDenied => ApiError::PermissionDenied(message),
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => {
            ApiError::Unavailable(message)
        }
        // No answer: the connection broke mid-call (the service stopped
        // while it answered) or the call was cancelled, which tonic reports
        // as UNKNOWN or CANCELLED with the transport's error as the
        // status's source. Its outcome is unknown, and every call is a read
        // or idempotent, so the caller retries it. The same codes sent by
        // the service itself (no source) stay a bug.
        Code::Unknown | Code::Cancelled if std::error::Error::source(&status).is_some() => {
            ApiError::Unavailable(message)
        }
        _ => ApiError::Internal(message),
    }
}

/// Reads the field violations back out of a status (for tests and clients).
pub fn field_violations(status: &Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sea_orm::RuntimeErr;
    use sea_orm::sqlx::Error as Sqlx;

    use super::*;

    fn exec(cause: Sqlx) -> DbErr {
        DbErr::Exec(RuntimeErr::SqlxError(Arc::new(cause)))
    }

    #[test]
    fn a_lost_database_connection_is_unavailable_not_internal() {
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        for error in [
            exec(Sqlx::Io(reset)),
            exec(Sqlx::PoolTimedOut),
            exec(Sqlx::PoolClosed),
            DbErr::Query(RuntimeErr::SqlxError(Arc::new(Sqlx::WorkerCrashed))),
        ] {
            let status = Status::from(ApiError::from(error));
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        }
    }

    #[test]
    fn an_upstream_call_without_an_answer_is_unavailable_and_a_bug_stays_internal() {
        // What tonic makes of a connection that broke mid-call.
        let broken = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset",
        )));
        assert_eq!(broken.code(), Code::Unknown);
        let error = from_upstream("credit", broken);
        assert_eq!(Status::from(error).code(), Code::Unavailable);
        for code in [Code::Unavailable, Code::DeadlineExceeded] {
            let error = from_upstream("credit", Status::new(code, "down"));
            assert_eq!(Status::from(error).code(), Code::Unavailable, "{code:?}");
        }
        // Sent as such by the service: its bug, not an outage.
        for code in [
            Code::Unknown,
            Code::Cancelled,
            Code::Internal,
            Code::DataLoss,
            Code::Unimplemented,
        ] {
            let error = from_upstream("credit", Status::new(code, "bug"));
            assert_eq!(Status::from(error).code(), Code::Internal, "{code:?}");
        }
    }

    #[test]
    fn other_database_failures_stay_internal() {
        let status = Status::from(ApiError::from(exec(Sqlx::RowNotFound)));
        assert_eq!(status.code(), Code::Internal);
        let status = Status::from(ApiError::from(DbErr::Custom("bad".into())));
        assert_eq!(status.code(), Code::Internal);
    }
}
