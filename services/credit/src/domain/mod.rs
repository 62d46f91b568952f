//! Credit rules: exposure arithmetic and the order-entry policy. No I/O.
//!
//! Amounts are integer minor units of the account currency (`i64`), the
//! same representation the database holds, so the atomic SQL check and
//! these rules compute the very same numbers.

use o2c_money::ids::CustomerId;
use o2c_money::{Currency, Money, MoneyError};

/// Version of the credit policy; stored with every decision so a decision
/// can be explained and replayed.
pub const POLICY_VERSION: &str = "credit-policy/2026-12-04.1";

/// Refusals of the credit service.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CreditError {
    #[error("customer {0} already has a credit account in another currency")]
    AccountExists(CustomerId),
    #[error("customer {0} has no credit account")]
    NoAccount(CustomerId),
    #[error("amount is in {given} but the credit account is in {account}")]
    CurrencyMismatch { given: Currency, account: Currency },
    #[error("order {0} already has a credit decision with a reservation")]
    OrderAlreadyReserved(String),
    #[error("reservation is {0}, not open")]
    ReservationNotOpen(&'static str),
    #[error("invoice amount {invoice} exceeds the reserved {reserved}")]
    InvoiceExceedsReservation { invoice: Money, reserved: Money },
    #[error("invoice {0} already has a receivable")]
    ReceivableExists(String),
    #[error("payment of {amount} exceeds the open receivable {open}")]
    SettlementExceedsOpen { amount: Money, open: Money },
    #[error("amount out of range: {0}")]
    Money(#[from] MoneyError),
}

/// The outcome of a credit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Approve,
    Hold,
    Block,
}

/// Why an order was not approved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    OverLimit,
    NoCreditAccount,
}

impl Reason {
    pub fn code(self) -> &'static str {
        match self {
            Reason::OverLimit => "OVER_LIMIT",
            Reason::NoCreditAccount => "NO_CREDIT_ACCOUNT",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "OVER_LIMIT" => Some(Reason::OverLimit),
            "NO_CREDIT_ACCOUNT" => Some(Reason::NoCreditAccount),
            _ => None,
        }
    }
}

impl Outcome {
    pub fn code(self) -> &'static str {
        match self {
            Outcome::Approve => "APPROVE",
            Outcome::Hold => "HOLD",
            Outcome::Block => "BLOCK",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "APPROVE" => Some(Outcome::Approve),
            "HOLD" => Some(Outcome::Hold),
            "BLOCK" => Some(Outcome::Block),
            _ => None,
        }
    }
}

/// The exposure of one account at one version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exposure {
    pub customer_id: CustomerId,
    pub currency: Currency,
    pub limit_minor: i64,
    /// Open order reservations.
    pub reserved_minor: i64,
    /// Issued, unpaid invoices.
    pub receivable_minor: i64,
    /// Bumped by every change; orders cache writes.
    pub version: i64,
}

impl Exposure {
    pub fn total_minor(&self) -> i64 {
        self.reserved_minor.saturating_add(self.receivable_minor)
    }

    pub fn available_minor(&self) -> i64 {
        self.limit_minor.saturating_sub(self.total_minor())
    }

    /// Whether an order of `amount_minor` fits under the limit. The storage
    /// layer evaluates the same inequality atomically in SQL.
    pub fn fits(&self, amount_minor: i64) -> bool {
        self.available_minor() >= amount_minor
    }

    pub fn money(&self, minor: i64) -> Result<Money, MoneyError> {
        Money::from_minor_units(minor, self.currency)
    }

    /// A compact, versioned text form for the cache.
    pub fn to_cache_value(&self) -> String {
        format!(
            "v1|{}|{}|{}|{}|{}|{}",
            self.customer_id,
            self.currency,
            self.limit_minor,
            self.reserved_minor,
            self.receivable_minor,
            self.version
        )
    }

    /// Parses [`Exposure::to_cache_value`]; None for anything else.
    pub fn from_cache_value(value: &str) -> Option<Self> {
        let mut parts = value.split('|');
        if parts.next()? != "v1" {
            return None;
        }
        let exposure = Self {
            customer_id: parts.next()?.parse().ok()?,
            currency: Currency::from_code(parts.next()?).ok()?,
            limit_minor: parts.next()?.parse().ok()?,
            reserved_minor: parts.next()?.parse().ok()?,
            receivable_minor: parts.next()?.parse().ok()?,
            version: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(exposure)
    }
}

/// The policy's verdict for an order of `amount_minor` against `exposure`
/// (None: no credit account). Approval is only provisional here: storage
/// confirms it atomically against the latest exposure.
pub fn decide(exposure: Option<&Exposure>, amount_minor: i64) -> (Outcome, Vec<Reason>) {
    match exposure {
        None => (Outcome::Block, vec![Reason::NoCreditAccount]),
        Some(e) if !e.fits(amount_minor) => (Outcome::Hold, vec![Reason::OverLimit]),
        Some(_) => (Outcome::Approve, Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposure(limit: i64, reserved: i64, receivable: i64) -> Exposure {
        Exposure {
            customer_id: CustomerId::new(),
            currency: Currency::from_code("EUR").unwrap(),
            limit_minor: limit,
            reserved_minor: reserved,
            receivable_minor: receivable,
            version: 7,
        }
    }

    #[test]
    fn an_order_that_exactly_fills_the_limit_is_approved() {
        let e = exposure(10_000, 3_000, 2_000);
        assert_eq!(decide(Some(&e), 5_000), (Outcome::Approve, vec![]));
        assert_eq!(
            decide(Some(&e), 5_001),
            (Outcome::Hold, vec![Reason::OverLimit])
        );
    }

    #[test]
    fn no_account_blocks() {
        assert_eq!(
            decide(None, 1),
            (Outcome::Block, vec![Reason::NoCreditAccount])
        );
    }

    #[test]
    fn cache_value_round_trips_and_rejects_garbage() {
        let e = exposure(10_000, 3_000, 2_000);
        assert_eq!(Exposure::from_cache_value(&e.to_cache_value()), Some(e));
        assert_eq!(Exposure::from_cache_value("v1|x"), None);
        assert_eq!(
            Exposure::from_cache_value(&format!("{}|extra", e.to_cache_value())),
            None
        );
    }

    #[test]
    fn codes_round_trip() {
        for o in [Outcome::Approve, Outcome::Hold, Outcome::Block] {
            assert_eq!(Outcome::from_code(o.code()), Some(o));
        }
        for r in [Reason::OverLimit, Reason::NoCreditAccount] {
            assert_eq!(Reason::from_code(r.code()), Some(r));
        }
    }
}
