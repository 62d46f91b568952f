//! Invoice rules: line arithmetic, payment terms and due dates, status.
//! No I/O.

use chrono::{Days, NaiveDate};
use o2c_money::{Currency, Decimal, Money, MoneyError, Rounding};

/// Most lines on one invoice.
pub const MAX_LINES: usize = 500;
/// Longest net term in days.
pub const MAX_NET_DAYS: u32 = 365;
/// Largest quantity on one line.
pub const MAX_QUANTITY: i64 = 1_000_000_000;
/// Decimals allowed in a quantity and in a tax rate.
pub const MAX_QUANTITY_SCALE: u32 = 6;
pub const MAX_TAX_RATE_SCALE: u32 = 4;

/// Invoice refusals.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvoiceError {
    #[error(
        "quantity must be a positive decimal with at most {MAX_QUANTITY_SCALE} decimals, at most {MAX_QUANTITY}"
    )]
    Quantity,
    #[error(
        "tax rate must be a percentage from 0 to 100 with at most {MAX_TAX_RATE_SCALE} decimals"
    )]
    TaxRate,
    #[error("net days must be 1 to {MAX_NET_DAYS}")]
    NetDays,
    #[error("amount out of range: {0}")]
    Money(#[from] MoneyError),
    #[error("order {0} is already invoiced")]
    OrderAlreadyInvoiced(String),
    #[error("payment {0} is already applied to this invoice")]
    PaymentAlreadyApplied(String),
    #[error("payment of {amount} exceeds the open amount {open}")]
    PaymentExceedsOpen { amount: Money, open: Money },
}

/// When an invoice is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentTerms {
    DueOnReceipt,
    Net(u32),
}

impl PaymentTerms {
    pub fn net(days: i32) -> Result<Self, InvoiceError> {
        match u32::try_from(days) {
            Ok(d) if (1..=MAX_NET_DAYS).contains(&d) => Ok(Self::Net(d)),
            _ => Err(InvoiceError::NetDays),
        }
    }

    pub fn due_date(self, issue_date: NaiveDate) -> NaiveDate {
        match self {
            PaymentTerms::DueOnReceipt => issue_date,
            PaymentTerms::Net(days) => issue_date
                .checked_add_days(Days::new(u64::from(days)))
                .unwrap_or(NaiveDate::MAX),
        }
    }
}

/// Where an invoice stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Open,
    PartiallyPaid,
    Paid,
}

impl Status {
    pub fn of(total_minor: i64, paid_minor: i64) -> Self {
        if paid_minor <= 0 {
            Status::Open
        } else if paid_minor < total_minor {
            Status::PartiallyPaid
        } else {
            Status::Paid
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Status::Open => "OPEN",
            Status::PartiallyPaid => "PARTIALLY_PAID",
            Status::Paid => "PAID",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "OPEN" => Some(Status::Open),
            "PARTIALLY_PAID" => Some(Status::PartiallyPaid),
            "PAID" => Some(Status::Paid),
            _ => None,
        }
    }
}

/// A priced invoice line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub description: String,
    pub quantity: Decimal,
    pub unit_price: Money,
    pub tax_rate_percent: Decimal,
    /// quantity × unit price, rounded half-even, plus tax on that net
    /// amount, rounded half-even: each line rounds once per step so the
    /// invoice total equals the sum of what the lines show.
    pub total: Money,
}

pub fn parse_quantity(text: &str) -> Result<Decimal, InvoiceError> {
    let value: Decimal = text.trim().parse().map_err(|_| InvoiceError::Quantity)?;
    let value = value.normalize();
    if value <= Decimal::ZERO
        || value.scale() > MAX_QUANTITY_SCALE
        || value > Decimal::from(MAX_QUANTITY)
    {
        return Err(InvoiceError::Quantity);
    }
    Ok(value)
}

pub fn parse_tax_rate(text: &str) -> Result<Decimal, InvoiceError> {
    let text = if text.trim().is_empty() {
        "0"
    } else {
        text.trim()
    };
    let value: Decimal = text.parse().map_err(|_| InvoiceError::TaxRate)?;
    let value = value.normalize();
    if value < Decimal::ZERO || value > Decimal::ONE_HUNDRED || value.scale() > MAX_TAX_RATE_SCALE {
        return Err(InvoiceError::TaxRate);
    }
    Ok(value)
}

impl Line {
    pub fn price(
        description: String,
        quantity: Decimal,
        unit_price: Money,
        tax_rate_percent: Decimal,
    ) -> Result<Self, InvoiceError> {
        let net = unit_price.checked_mul(quantity, Rounding::HalfEven)?;
        let tax = net.checked_mul(tax_rate_percent / Decimal::ONE_HUNDRED, Rounding::HalfEven)?;
        let total = net.checked_add(&tax)?;
        Ok(Self {
            description,
            quantity,
            unit_price,
            tax_rate_percent,
            total,
        })
    }
}

/// Sum of the line totals.
pub fn total(currency: Currency, lines: &[Line]) -> Result<Money, InvoiceError> {
    lines
        .iter()
        .try_fold(Money::zero(currency), |sum, line| {
            sum.checked_add(&line.total)
        })
        .map_err(InvoiceError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur(s: &str) -> Money {
        Money::parse(s, "EUR").unwrap()
    }

    #[test]
    fn lines_round_half_even_per_step() {
        let line = Line::price(
            "x".into(),
            "1.5".parse().unwrap(),
            eur("0.33"),
            "19".parse().unwrap(),
        )
        .unwrap();
        // net 1.5 x 0.33 = 0.495 -> 0.50 (tie, 9 is odd); tax 0.095 -> 0.10.
        assert_eq!(line.total.amount_string(), "0.60");
    }

    #[test]
    fn invoice_total_is_the_sum_of_lines() {
        let a = Line::price(
            "a".into(),
            "2".parse().unwrap(),
            eur("10.00"),
            "19".parse().unwrap(),
        )
        .unwrap();
        let b = Line::price("b".into(), "1".parse().unwrap(), eur("5.00"), Decimal::ZERO).unwrap();
        let currency = Currency::from_code("EUR").unwrap();
        assert_eq!(total(currency, &[a, b]).unwrap().amount_string(), "28.80");
    }

    #[test]
    fn due_dates_follow_terms() {
        let issue = NaiveDate::from_ymd_opt(2026, 12, 4).unwrap();
        assert_eq!(PaymentTerms::DueOnReceipt.due_date(issue), issue);
        assert_eq!(
            PaymentTerms::net(30).unwrap().due_date(issue),
            NaiveDate::from_ymd_opt(2027, 1, 3).unwrap()
        );
        assert_eq!(PaymentTerms::net(0), Err(InvoiceError::NetDays));
        assert_eq!(PaymentTerms::net(366), Err(InvoiceError::NetDays));
    }

    #[test]
    fn status_follows_payments() {
        assert_eq!(Status::of(100, 0), Status::Open);
        assert_eq!(Status::of(100, 40), Status::PartiallyPaid);
        assert_eq!(Status::of(100, 100), Status::Paid);
    }

    #[test]
    fn quantities_and_rates_are_bounded() {
        assert!(parse_quantity("0").is_err());
        assert!(parse_quantity("-1").is_err());
        assert!(parse_quantity("1.0000001").is_err());
        assert!(parse_quantity("2.5").is_ok());
        assert!(parse_tax_rate("101").is_err());
        assert!(parse_tax_rate("-1").is_err());
        assert_eq!(parse_tax_rate("").unwrap(), Decimal::ZERO);
    }
}
