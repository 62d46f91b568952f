//! Money and identifiers: values that cannot be invalid once they exist.
//!
//! # Layout
//! - [`Currency`]: an ISO 4217 currency that has a minor unit (so metals and
//!   test codes such as `XAU` or `XTS` are refused).
//! - [`Money`]: an exact decimal amount in one currency, never more decimals
//!   than the currency allows; arithmetic is checked and refuses to mix
//!   currencies.
//! - [`ids`]: typed identifiers (`CustomerId`, `InvoiceId`, …).

mod currency;
pub mod ids;
mod money;

pub use currency::Currency;
pub use money::{MAX_MAJOR_UNITS, Money, MoneyError, Rounding};
pub use rust_decimal::Decimal;
