//! Conversions between the wire `Money` message and [`o2c_money::Money`],
//! with errors that name the request field.

use o2c_money::{Currency, Money};
use o2c_proto::common::v1 as pb;

use crate::ApiError;

/// Parses the required money field `field`.
pub fn parse(field: &str, value: Option<&pb::Money>) -> Result<Money, ApiError> {
    let value = value.ok_or_else(|| ApiError::invalid(field, "required"))?;
    if value.currency_code.is_empty() {
        return Err(ApiError::invalid(
            format!("{field}.currency_code"),
            "required",
        ));
    }
    if value.amount.is_empty() {
        return Err(ApiError::invalid(format!("{field}.amount"), "required"));
    }
    Money::parse(&value.amount, &value.currency_code).map_err(|e| ApiError::money(field, e))
}

/// Parses a required money field that must be strictly positive.
pub fn parse_positive(field: &str, value: Option<&pb::Money>) -> Result<Money, ApiError> {
    let money = parse(field, value)?;
    if !money.is_positive() {
        return Err(ApiError::invalid(
            format!("{field}.amount"),
            "must be greater than zero",
        ));
    }
    Ok(money)
}

/// Parses a required currency code field.
pub fn parse_currency(field: &str, code: &str) -> Result<Currency, ApiError> {
    if code.is_empty() {
        return Err(ApiError::invalid(field, "required"));
    }
    Currency::from_code(code).map_err(|e| ApiError::invalid(field, e.to_string()))
}

pub fn to_proto(money: &Money) -> pb::Money {
    pb::Money {
        amount: money.amount_string(),
        currency_code: money.currency().code().to_owned(),
    }
}
