//! Request field checks shared by every service; errors name the field.

use std::str::FromStr;

use crate::ApiError;

/// Longest tenant id.
pub const MAX_TENANT_ID_LENGTH: usize = 64;

/// A tenant id: 1 to 64 of `A-Z a-z 0-9 _ -`; and, when the call was
/// made for a tenant (its internal token says which), that tenant:
/// another tenant's request is PERMISSION_DENIED however it got here.
pub fn tenant_id(field: &str, value: &str) -> Result<String, ApiError> {
    let tenant = tenant_id_format(field, value)?;
    if let Some(caller) = crate::auth::current().and_then(|c| c.tenant)
        && caller != tenant
    {
        return Err(ApiError::PermissionDenied(format!(
            "{field}: this call may act only for its own tenant"
        )));
    }
    Ok(tenant)
}

/// A tenant id checked for its form only: for platform administration,
/// which names other tenants on purpose.
pub fn tenant_id_format(field: &str, value: &str) -> Result<String, ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "required"));
    }
    if value.len() > MAX_TENANT_ID_LENGTH
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(ApiError::invalid(
            field,
            format!("1 to {MAX_TENANT_ID_LENGTH} letters, digits, '_' or '-'"),
        ));
    }
    Ok(value.to_owned())
}

/// A required id of type `T` (a UUID newtype).
pub fn id<T: FromStr>(field: &str, value: &str) -> Result<T, ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "required"));
    }
    value
        .parse()
        .map_err(|_| ApiError::invalid(field, "not a valid id (UUID)"))
}

/// Required free text, trimmed, 1 to `max` characters.
pub fn text(field: &str, value: &str, max: usize) -> Result<String, ApiError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(ApiError::invalid(field, "required"));
    }
    if trimmed.chars().count() > max {
        return Err(ApiError::invalid(
            field,
            format!("at most {max} characters"),
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(trimmed.to_owned())
}

/// Optional free text: empty stays empty, otherwise as [`text`].
pub fn optional_text(field: &str, value: &str, max: usize) -> Result<String, ApiError> {
    if value.trim().is_empty() {
        Ok(String::new())
    } else {
        text(field, value, max)
    }
}

/// A short machine name such as a CRM system or agency: 1 to 50 of
/// `a-z 0-9 _ -`.
pub fn slug(field: &str, value: &str) -> Result<String, ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "required"));
    }
    if value.len() > 50
        || !value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err(ApiError::invalid(
            field,
            "1 to 50 lowercase letters, digits, '_' or '-'",
        ));
    }
    Ok(value.to_owned())
}

/// Collects every violation of a request instead of stopping at the first.
#[derive(Debug, Default)]
pub struct Violations(Vec<crate::FieldViolation>, Option<ApiError>);

impl Violations {
    /// Keeps the value, or records why it is invalid.
    pub fn check<T>(&mut self, result: Result<T, ApiError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(ApiError::InvalidArgument(mut found)) => {
                self.0.append(&mut found);
                None
            }
            // Refused whoever asks: that answer wins over bad fields.
            Err(denied @ (ApiError::PermissionDenied(_) | ApiError::Unauthenticated(_))) => {
                self.1.get_or_insert(denied);
                None
            }
            Err(other) => {
                self.0
                    .push(crate::FieldViolation::new("request", other.to_string()));
                None
            }
        }
    }

    /// Ok when nothing was recorded.
    pub fn finish(self) -> Result<(), ApiError> {
        if let Some(denied) = self.1 {
            return Err(denied);
        }
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::InvalidArgument(self.0))
        }
    }
}

/// Default and largest page of any list call.
pub const DEFAULT_PAGE_SIZE: u64 = 50;
pub const MAX_PAGE_SIZE: u64 = 100;

/// The page size for a requested one (0: the default).
pub fn page_size(field: &str, requested: i32) -> Result<u64, ApiError> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n > 0 && (n as u64) <= MAX_PAGE_SIZE => Ok(n as u64),
        _ => Err(ApiError::invalid(
            field,
            format!("0 to {MAX_PAGE_SIZE} (0: {DEFAULT_PAGE_SIZE})"),
        )),
    }
}

/// An optional ISO 8601 date field (empty: None).
pub fn optional_date(field: &str, value: &str) -> Result<Option<chrono::NaiveDate>, ApiError> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    chrono::NaiveDate::parse_from_str(value.trim(), "%Y-%m-%d")
        .map(Some)
        .map_err(|_| ApiError::invalid(field, "an ISO 8601 date such as 2026-12-04"))
}
