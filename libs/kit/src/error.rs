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

impl From<DbErr> for ApiError {
    fn from(error: DbErr) -> Self {
        match &error {
            DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => {
                ApiError::Unavailable(format!("database unavailable: {error}"))
            }
            DbErr::RecordNotFound(what) => ApiError::Internal(format!("record not found: {what}")),
            _ => ApiError::Internal(format!("database: {error}")),
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
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => {
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
