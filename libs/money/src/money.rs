use std::fmt;
use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};

use crate::Currency;

/// Largest absolute amount, in major units, that any money value may hold.
///
/// Ten trillion leaves room for every real invoice and keeps the amount in
/// minor units (up to four decimals) and sums of many of them inside `i64`.
pub const MAX_MAJOR_UNITS: i64 = 10_000_000_000_000;

/// Why a money value could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("unknown or unsupported ISO 4217 currency code {0:?}")]
    UnknownCurrency(String),
    #[error("malformed decimal amount {0:?}")]
    Malformed(String),
    #[error("amount has {scale} decimals but {currency} allows {allowed}")]
    TooManyDecimals {
        scale: u32,
        allowed: u32,
        currency: Currency,
    },
    #[error("amount is outside ±{MAX_MAJOR_UNITS}")]
    OutOfRange,
    #[error("cannot combine {left} with {right}")]
    CurrencyMismatch { left: Currency, right: Currency },
}

/// How a result with more decimals than the currency allows is rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// Banker's rounding: ties to the even neighbour.
    HalfEven,
    /// Ties away from zero (the commercial convention on many invoices).
    HalfUp,
    /// Toward zero.
    Down,
}

impl Rounding {
    fn strategy(self) -> RoundingStrategy {
        match self {
            Rounding::HalfEven => RoundingStrategy::MidpointNearestEven,
            Rounding::HalfUp => RoundingStrategy::MidpointAwayFromZero,
            Rounding::Down => RoundingStrategy::ToZero,
        }
    }
}

/// An exact amount in one currency, held at the currency's minor-unit scale.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    // Always rescaled to `currency.scale()` and within MAX_MAJOR_UNITS.
    amount: Decimal,
    currency: Currency,
}

impl Money {
    /// Parses a decimal string such as `"1234.50"` in `currency_code`.
    ///
    /// Refuses more decimals than the currency has (no silent rounding),
    /// exponents, and amounts beyond [`MAX_MAJOR_UNITS`].
    pub fn parse(amount: &str, currency_code: &str) -> Result<Self, MoneyError> {
        let currency = Currency::from_code(currency_code)?;
        Self::parse_in(amount, currency)
    }

    /// Parses a decimal string in a known currency.
    pub fn parse_in(amount: &str, currency: Currency) -> Result<Self, MoneyError> {
        let trimmed = amount.trim();
        let well_formed = !trimmed.is_empty()
            && trimmed.len() <= 40
            && trimmed
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'+');
        if !well_formed {
            return Err(MoneyError::Malformed(amount.to_owned()));
        }
        let value =
            Decimal::from_str(trimmed).map_err(|_| MoneyError::Malformed(amount.to_owned()))?;
        Self::new(value, currency)
    }

    /// Makes money from an exact decimal; refuses excess decimals.
    pub fn new(amount: Decimal, currency: Currency) -> Result<Self, MoneyError> {
        let normalized = amount.normalize();
        if normalized.scale() > currency.scale() {
            return Err(MoneyError::TooManyDecimals {
                scale: normalized.scale(),
                allowed: currency.scale(),
                currency,
            });
        }
        if normalized.abs() > Decimal::from(MAX_MAJOR_UNITS) {
            return Err(MoneyError::OutOfRange);
        }
        let mut amount = normalized;
        amount.rescale(currency.scale());
        Ok(Self { amount, currency })
    }

    /// Makes money from a decimal, rounding to the currency's scale.
    pub fn from_decimal_rounded(
        amount: Decimal,
        currency: Currency,
        rounding: Rounding,
    ) -> Result<Self, MoneyError> {
        let rounded = amount.round_dp_with_strategy(currency.scale(), rounding.strategy());
        Self::new(rounded, currency)
    }

    /// Zero in `currency`.
    pub fn zero(currency: Currency) -> Self {
        let mut amount = Decimal::ZERO;
        amount.rescale(currency.scale());
        Self { amount, currency }
    }

    /// Money from an integer count of minor units (cents for EUR).
    pub fn from_minor_units(units: i64, currency: Currency) -> Result<Self, MoneyError> {
        let amount = Decimal::from_i128_with_scale(i128::from(units), currency.scale());
        Self::new(amount, currency)
    }

    /// The amount as an integer count of minor units; exact by construction.
    pub fn minor_units(&self) -> i64 {
        // In range by construction: |amount| <= 1e13 and scale <= 4.
        let mantissa = self.amount.mantissa();
        i64::try_from(mantissa).unwrap_or(if mantissa < 0 { i64::MIN } else { i64::MAX })
    }

    pub fn amount(&self) -> Decimal {
        self.amount
    }

    pub fn currency(&self) -> Currency {
        self.currency
    }

    pub fn is_zero(&self) -> bool {
        self.amount.is_zero()
    }

    pub fn is_positive(&self) -> bool {
        self.amount > Decimal::ZERO
    }

    pub fn is_negative(&self) -> bool {
        self.amount < Decimal::ZERO
    }

    /// `self + other`; refuses mixed currencies and overflow.
    pub fn checked_add(&self, other: &Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        Self::new(self.amount + other.amount, self.currency)
    }

    /// `self - other`; refuses mixed currencies and overflow.
    pub fn checked_sub(&self, other: &Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        Self::new(self.amount - other.amount, self.currency)
    }

    /// `self × factor`, rounded to the currency scale with `rounding`.
    pub fn checked_mul(&self, factor: Decimal, rounding: Rounding) -> Result<Money, MoneyError> {
        let product = self
            .amount
            .checked_mul(factor)
            .ok_or(MoneyError::OutOfRange)?;
        Self::from_decimal_rounded(product, self.currency, rounding)
    }

    /// The amount as a plain decimal string at the currency scale ("10.00").
    pub fn amount_string(&self) -> String {
        self.amount.to_string()
    }

    fn same_currency(&self, other: &Money) -> Result<(), MoneyError> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(MoneyError::CurrencyMismatch {
                left: self.currency,
                right: other.currency,
            })
        }
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount, self.currency)
    }
}

impl fmt::Debug for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Money({} {})", self.amount, self.currency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn eur() -> Currency {
        Currency::from_code("EUR").unwrap()
    }

    #[test]
    fn parses_and_pads_to_the_currency_scale() {
        let m = Money::parse("10", "EUR").unwrap();
        assert_eq!(m.amount_string(), "10.00");
        assert_eq!(m.minor_units(), 1000);
        assert_eq!(Money::parse("7", "JPY").unwrap().amount_string(), "7");
        assert_eq!(
            Money::parse("1.250", "EUR").unwrap().amount_string(),
            "1.25"
        );
    }

    #[test]
    fn refuses_malformed_rounded_and_huge_amounts() {
        for bad in ["", " ", "abc", "1e5", "1,5", "--1", "NaN", "inf", "0x10"] {
            assert!(
                matches!(Money::parse(bad, "EUR"), Err(MoneyError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Money::parse("1.005", "EUR"),
            Err(MoneyError::TooManyDecimals { .. })
        ));
        assert!(matches!(
            Money::parse("1.5", "JPY"),
            Err(MoneyError::TooManyDecimals { .. })
        ));
        assert!(matches!(
            Money::parse("10000000000001", "EUR"),
            Err(MoneyError::OutOfRange)
        ));
        assert!(matches!(
            Money::parse("1", "XYZ"),
            Err(MoneyError::UnknownCurrency(_))
        ));
    }

    #[test]
    fn mixing_currencies_is_refused() {
        let a = Money::parse("1", "EUR").unwrap();
        let b = Money::parse("1", "USD").unwrap();
        assert!(matches!(
            a.checked_add(&b),
            Err(MoneyError::CurrencyMismatch { .. })
        ));
    }

    #[test]
    fn multiplication_rounds_with_the_named_mode() {
        let m = Money::parse("0.05", "EUR").unwrap();
        let half = Decimal::new(5, 1);
        assert_eq!(
            m.checked_mul(half, Rounding::HalfEven)
                .unwrap()
                .amount_string(),
            "0.02"
        );
        assert_eq!(
            m.checked_mul(half, Rounding::HalfUp)
                .unwrap()
                .amount_string(),
            "0.03"
        );
        assert_eq!(
            m.checked_mul(half, Rounding::Down).unwrap().amount_string(),
            "0.02"
        );
    }

    proptest! {
        #[test]
        fn minor_units_round_trip(units in -1_000_000_000_000_000i64..1_000_000_000_000_000i64) {
            let m = Money::from_minor_units(units, eur()).unwrap();
            prop_assert_eq!(m.minor_units(), units);
            let reparsed = Money::parse(&m.amount_string(), "EUR").unwrap();
            prop_assert_eq!(reparsed, m);
        }

        #[test]
        fn addition_is_exact_and_subtraction_inverts_it(
            a in -100_000_000_000i64..100_000_000_000i64,
            b in -100_000_000_000i64..100_000_000_000i64,
        ) {
            let x = Money::from_minor_units(a, eur()).unwrap();
            let y = Money::from_minor_units(b, eur()).unwrap();
            let sum = x.checked_add(&y).unwrap();
            prop_assert_eq!(sum.minor_units(), a + b);
            prop_assert_eq!(sum.checked_sub(&y).unwrap(), x);
        }

        #[test]
        fn parse_never_accepts_more_decimals_than_the_currency(
            units in 0i64..1_000_000_000, extra in 1u32..9
        ) {
            let text = format!("{units}.{}", "1".repeat(2 + extra as usize));
            prop_assert!(Money::parse(&text, "EUR").is_err());
        }

        #[test]
        fn parse_accepts_every_value_it_prints(units in any::<i64>()) {
            match Money::from_minor_units(units, eur()) {
                Ok(m) => prop_assert_eq!(Money::parse(&m.amount_string(), "EUR").unwrap(), m),
                Err(e) => prop_assert_eq!(e, MoneyError::OutOfRange),
            }
        }
    }
}
