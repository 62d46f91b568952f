//! Invoice rules: line arithmetic, payment terms and due dates, status.
//! No I/O.

use chrono::{Datelike, Days, NaiveDate};
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
    #[error("discount: a percentage above 0 and below 100 within 1 to {MAX_NET_DAYS} days")]
    Discount,
    #[error("invoice is {0}")]
    WrongState(&'static str),
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
pub enum Due {
    OnReceipt,
    /// N days after the issue date.
    Net(u32),
    /// N days after the end of the issue month.
    EndOfMonthPlus(u32),
}

/// An early-payment discount: `percent` off when paid within `days` of
/// issue (2/10 net 30: 2 % within 10 days).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discount {
    pub percent: Decimal,
    pub days: u32,
}

/// Agreed payment terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaymentTerms {
    pub due: Due,
    pub discount: Option<Discount>,
}

fn add_days(date: NaiveDate, days: u32) -> NaiveDate {
    date.checked_add_days(Days::new(u64::from(days)))
        .unwrap_or(NaiveDate::MAX)
}

impl PaymentTerms {
    pub const DUE_ON_RECEIPT: PaymentTerms = PaymentTerms {
        due: Due::OnReceipt,
        discount: None,
    };

    /// Net `days` (1 to 365) without discount.
    pub fn net(days: i32) -> Result<Self, InvoiceError> {
        Ok(Self {
            due: Due::Net(net_days(days)?),
            discount: None,
        })
    }

    pub fn due_date(self, issue_date: NaiveDate) -> NaiveDate {
        match self.due {
            Due::OnReceipt => issue_date,
            Due::Net(days) => add_days(issue_date, days),
            Due::EndOfMonthPlus(days) => add_days(end_of_month(issue_date), days),
        }
    }

    /// The last day the discount applies, if any.
    pub fn discount_date(self, issue_date: NaiveDate) -> Option<NaiveDate> {
        self.discount.map(|d| add_days(issue_date, d.days))
    }
}

/// Checks net days (1 to 365).
pub fn net_days(days: i32) -> Result<u32, InvoiceError> {
    match u32::try_from(days) {
        Ok(d) if (1..=MAX_NET_DAYS).contains(&d) => Ok(d),
        _ => Err(InvoiceError::NetDays),
    }
}

/// A discount of `percent` (above 0, below 100, up to 4 decimals) within
/// `days` (1 to 365).
pub fn discount(percent: &str, days: i32) -> Result<Discount, InvoiceError> {
    let value: Decimal = percent.trim().parse().map_err(|_| InvoiceError::Discount)?;
    let value = value.normalize();
    let days = u32::try_from(days).map_err(|_| InvoiceError::Discount)?;
    if value <= Decimal::ZERO
        || value >= Decimal::ONE_HUNDRED
        || value.scale() > MAX_TAX_RATE_SCALE
        || !(1..=MAX_NET_DAYS).contains(&days)
    {
        return Err(InvoiceError::Discount);
    }
    Ok(Discount {
        percent: value,
        days,
    })
}

fn end_of_month(date: NaiveDate) -> NaiveDate {
    let (year, month) = if date.month() == 12 {
        (date.year() + 1, 1)
    } else {
        (date.year(), date.month() + 1)
    };
    NaiveDate::from_ymd_opt(year, month, 1)
        .and_then(|first| first.pred_opt())
        .unwrap_or(date)
}

/// The discount on an open amount, rounded half-even.
pub fn discount_amount(open: Money, discount: Discount) -> Result<Money, InvoiceError> {
    Ok(open.checked_mul(discount.percent / Decimal::ONE_HUNDRED, Rounding::HalfEven)?)
}

/// Aging buckets by days past due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Current,
    Days1To30,
    Days31To60,
    Days61To90,
    Over90,
}

impl Bucket {
    pub const ALL: [Bucket; 5] = [
        Bucket::Current,
        Bucket::Days1To30,
        Bucket::Days31To60,
        Bucket::Days61To90,
        Bucket::Over90,
    ];

    pub fn of(days_past_due: i64) -> Self {
        match days_past_due {
            ..=0 => Bucket::Current,
            1..=30 => Bucket::Days1To30,
            31..=60 => Bucket::Days31To60,
            61..=90 => Bucket::Days61To90,
            _ => Bucket::Over90,
        }
    }
}

/// Days `today` is past `due` (zero or negative: not overdue).
pub fn days_past_due(due: NaiveDate, today: NaiveDate) -> i64 {
    (today - due).num_days()
}

/// Where an invoice stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Draft,
    Open,
    PartiallyPaid,
    Paid,
    Cancelled,
    WrittenOff,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Draft,
        Status::Open,
        Status::PartiallyPaid,
        Status::Paid,
        Status::Cancelled,
        Status::WrittenOff,
    ];

    /// The status of an issued invoice from what is settled of its total
    /// (paid, credited, discounted).
    pub fn of(total_minor: i64, settled_minor: i64, paid_minor: i64) -> Self {
        if settled_minor >= total_minor {
            Status::Paid
        } else if paid_minor > 0 || settled_minor > 0 {
            Status::PartiallyPaid
        } else {
            Status::Open
        }
    }

    /// Whether the invoice still expects money.
    pub fn is_open(self) -> bool {
        matches!(self, Status::Open | Status::PartiallyPaid)
    }

    pub fn code(self) -> &'static str {
        match self {
            Status::Draft => "DRAFT",
            Status::Open => "OPEN",
            Status::PartiallyPaid => "PARTIALLY_PAID",
            Status::Paid => "PAID",
            Status::Cancelled => "CANCELLED",
            Status::WrittenOff => "WRITTEN_OFF",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.code() == code)
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

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    #[test]
    fn due_dates_follow_terms() {
        let issue = date(2026, 12, 4);
        assert_eq!(PaymentTerms::DUE_ON_RECEIPT.due_date(issue), issue);
        assert_eq!(
            PaymentTerms::net(30).unwrap().due_date(issue),
            date(2027, 1, 3)
        );
        let eom = PaymentTerms {
            due: Due::EndOfMonthPlus(15),
            discount: None,
        };
        assert_eq!(eom.due_date(issue), date(2027, 1, 15));
        assert_eq!(
            eom.due_date(date(2028, 2, 10)),
            date(2028, 3, 15),
            "leap February"
        );
        assert_eq!(PaymentTerms::net(0), Err(InvoiceError::NetDays));
        assert_eq!(PaymentTerms::net(366), Err(InvoiceError::NetDays));
    }

    #[test]
    fn two_ten_net_thirty() {
        let terms = PaymentTerms {
            due: Due::Net(30),
            discount: Some(discount("2", 10).unwrap()),
        };
        let issue = date(2026, 12, 4);
        assert_eq!(terms.discount_date(issue), Some(date(2026, 12, 14)));
        assert_eq!(terms.due_date(issue), date(2027, 1, 3));
        let off = discount_amount(eur("1000.00"), terms.discount.unwrap()).unwrap();
        assert_eq!(off.amount_string(), "20.00");
        assert!(discount("0", 10).is_err());
        assert!(discount("100", 10).is_err());
        assert!(discount("2", 0).is_err());
    }

    #[test]
    fn aging_buckets() {
        assert_eq!(Bucket::of(-3), Bucket::Current);
        assert_eq!(Bucket::of(0), Bucket::Current);
        assert_eq!(Bucket::of(1), Bucket::Days1To30);
        assert_eq!(Bucket::of(30), Bucket::Days1To30);
        assert_eq!(Bucket::of(31), Bucket::Days31To60);
        assert_eq!(Bucket::of(90), Bucket::Days61To90);
        assert_eq!(Bucket::of(91), Bucket::Over90);
    }

    #[test]
    fn status_follows_settlement() {
        assert_eq!(Status::of(100, 0, 0), Status::Open);
        assert_eq!(Status::of(100, 40, 40), Status::PartiallyPaid);
        assert_eq!(
            Status::of(100, 30, 0),
            Status::PartiallyPaid,
            "a credit note"
        );
        assert_eq!(Status::of(100, 100, 98), Status::Paid, "with a discount");
        for s in Status::ALL {
            assert_eq!(Status::from_code(s.code()), Some(s));
        }
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
