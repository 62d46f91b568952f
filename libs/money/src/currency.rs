use std::fmt;
use std::str::FromStr;

use crate::money::MoneyError;

/// An ISO 4217 currency with a minor unit (EUR: 2 decimals, JPY: 0, BHD: 3).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    // The ISO table entry; its exponent is known to be present.
    iso: iso_currency::Currency,
    // Decimals of the minor unit, cached from the ISO table.
    scale: u32,
}

impl Currency {
    /// Parses an upper-case ISO 4217 alphabetic code such as `"EUR"`.
    pub fn from_code(code: &str) -> Result<Self, MoneyError> {
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(MoneyError::UnknownCurrency(code.to_owned()));
        }
        let iso = iso_currency::Currency::from_code(code)
            .ok_or_else(|| MoneyError::UnknownCurrency(code.to_owned()))?;
        let scale = iso
            .exponent()
            .ok_or_else(|| MoneyError::UnknownCurrency(code.to_owned()))?;
        Ok(Self {
            iso,
            scale: u32::from(scale),
        })
    }

    /// The three-letter code.
    pub fn code(&self) -> &'static str {
        self.iso.code()
    }

    /// Number of decimals of the minor unit.
    pub fn scale(&self) -> u32 {
        self.scale
    }
}

impl FromStr for Currency {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_code(s)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_currencies_carry_their_minor_unit() {
        assert_eq!(Currency::from_code("EUR").map(|c| c.scale()), Ok(2));
        assert_eq!(Currency::from_code("JPY").map(|c| c.scale()), Ok(0));
        assert_eq!(Currency::from_code("BHD").map(|c| c.scale()), Ok(3));
    }

    #[test]
    fn unknown_lowercase_and_unitless_codes_are_refused() {
        for code in ["", "EU", "eur", "EURO", "ZZZ", "XAU", "XTS", "XXX"] {
            assert!(Currency::from_code(code).is_err(), "{code} accepted");
        }
    }
}
