//! Credit rules: exposure arithmetic, the order-entry policy, alert
//! thresholds, limit authority and the risk scorecard. No I/O.
//!
//! Amounts are integer minor units of the account currency (`i64`), the
//! same representation the database holds, so the atomic SQL check and
//! these rules compute the very same numbers.

use o2c_money::ids::CustomerId;
use o2c_money::{Currency, Money, MoneyError};

pub mod risk;

/// Version of the credit policy; stored with every decision so a decision
/// can be explained and replayed.
pub const POLICY_VERSION: &str = "credit-policy/2026-12-04.1";

/// Refusals of the credit service.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
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
    #[error("amount out of range: {0}")]
    Money(#[from] MoneyError),
    #[error("parent account: {0}")]
    Parent(&'static str),
    #[error("the approver must differ from the requester {0}")]
    SameApprover(String),
    #[error("limit change is {0}, not pending")]
    LimitChangeNotPending(&'static str),
    #[error("hold is {0}, not open")]
    HoldNotOpen(&'static str),
    #[error("order {0} is already on hold")]
    OrderHeld(String),
    #[error("raising the limit to {0} is above your authority; request a limit change")]
    AboveAuthority(Money),
}

/// Whether a limit change from `current` to `new` (minor units) needs a
/// second user: raises above `authority` do (no authority configured for
/// the currency: every raise does); lowering never does.
pub fn needs_approval(current_minor: i64, new_minor: i64, authority_minor: Option<i64>) -> bool {
    new_minor > current_minor && authority_minor.is_none_or(|authority| new_minor > authority)
}

/// The outcome of a credit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Approve,
    Hold,
    Block,
}

/// Why an order was not approved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    OverLimit,
    NoCreditAccount,
    OverdueItems,
    LimitExpired,
    AccountBlocked,
    MaxOrderValue,
    GroupLimitExceeded,
    DunningBlock,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::OverLimit,
        Reason::NoCreditAccount,
        Reason::OverdueItems,
        Reason::LimitExpired,
        Reason::AccountBlocked,
        Reason::MaxOrderValue,
        Reason::GroupLimitExceeded,
        Reason::DunningBlock,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Reason::OverLimit => "OVER_LIMIT",
            Reason::NoCreditAccount => "NO_CREDIT_ACCOUNT",
            Reason::OverdueItems => "OVERDUE_ITEMS",
            Reason::LimitExpired => "LIMIT_EXPIRED",
            Reason::AccountBlocked => "ACCOUNT_BLOCKED",
            Reason::MaxOrderValue => "MAX_ORDER_VALUE",
            Reason::GroupLimitExceeded => "GROUP_LIMIT_EXCEEDED",
            Reason::DunningBlock => "DUNNING_BLOCK",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    /// Whether the reason refuses the order outright (BLOCK) rather than
    /// putting it in the analysts' queue (HOLD).
    pub fn blocks(self) -> bool {
        matches!(
            self,
            Reason::NoCreditAccount | Reason::AccountBlocked | Reason::DunningBlock
        )
    }

    /// Comma-separated codes, the stored form.
    pub fn join(reasons: &[Reason]) -> String {
        reasons
            .iter()
            .map(|r| r.code())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Parses [`Reason::join`]; unknown codes are skipped.
    pub fn split(text: &str) -> Vec<Reason> {
        text.split(',').filter_map(Reason::from_code).collect()
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

    /// Exposure as a percentage of the limit (None without a limit).
    pub fn utilisation_percent(&self) -> Option<f64> {
        if self.limit_minor <= 0 {
            return None;
        }
        let used = self.reserved_minor.saturating_add(self.receivable_minor);
        // Minor units of one account fit an f64 exactly enough for a ratio.
        #[allow(clippy::cast_precision_loss)]
        Some(used as f64 * 100.0 / self.limit_minor as f64)
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

/// What reaching a dunning level does.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DunningAction {
    /// Remind the customer (an alert operators and the CRM act on).
    Reminder,
    /// Hold new orders (OVERDUE_ITEMS).
    Hold,
    /// Block the account (DUNNING_BLOCK).
    Block,
}

impl DunningAction {
    pub fn code(self) -> &'static str {
        match self {
            DunningAction::Reminder => "reminder",
            DunningAction::Hold => "hold",
            DunningAction::Block => "block",
        }
    }
}

/// One rung of the dunning ladder: invoices this many days past due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DunningLevel {
    pub days_past_due: i64,
    pub action: DunningAction,
}

/// The dunning level (1-based) an invoice `days_past_due` has reached.
pub fn dunning_level(levels: &[DunningLevel], days_past_due: i64) -> Option<(usize, DunningLevel)> {
    levels
        .iter()
        .enumerate()
        .rev()
        .find(|(_, level)| days_past_due >= level.days_past_due)
        .map(|(index, level)| (index + 1, *level))
}

/// The credit policy's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The dunning ladder, ascending by days past due; the oldest open
    /// item's level decides whether orders are held or blocked.
    pub dunning_levels: Vec<DunningLevel>,
    /// Shares of the limit (percent, ascending) whose upward crossing
    /// raises an alert.
    pub alert_thresholds_percent: Vec<u32>,
    /// Days before the next review date that raise a REVIEW_DUE alert.
    pub review_notice_days: i64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            dunning_levels: default_dunning_levels(),
            alert_thresholds_percent: vec![80, 100],
            review_notice_days: 14,
        }
    }
}

/// Reminders at 1 and 15 days past due, hold from 31, block from 61.
pub fn default_dunning_levels() -> Vec<DunningLevel> {
    [
        (1, DunningAction::Reminder),
        (15, DunningAction::Reminder),
        (31, DunningAction::Hold),
        (61, DunningAction::Block),
    ]
    .into_iter()
    .map(|(days_past_due, action)| DunningLevel {
        days_past_due,
        action,
    })
    .collect()
}

/// The group (parent) account an account belongs to, as the check sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    pub limit_minor: i64,
    /// The parent's own and all its children's exposure.
    pub exposure_minor: i64,
}

/// Everything the policy looks at for one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountState {
    pub exposure: Exposure,
    pub blocked: bool,
    pub max_order_minor: Option<i64>,
    pub limit_valid_until: Option<chrono::NaiveDate>,
    /// Due date of the oldest open receivable.
    pub oldest_open_due: Option<chrono::NaiveDate>,
    pub group: Option<Group>,
}

/// The policy's verdict for an order of `amount_minor` on `today`, with
/// every reason that applies (None: no credit account). Approval is only
/// provisional here: storage confirms it atomically against the latest
/// exposure.
pub fn evaluate(
    policy: &Policy,
    state: Option<&AccountState>,
    amount_minor: i64,
    today: chrono::NaiveDate,
) -> (Outcome, Vec<Reason>) {
    let Some(state) = state else {
        return (Outcome::Block, vec![Reason::NoCreditAccount]);
    };
    let mut reasons = Vec::new();
    if state.blocked {
        reasons.push(Reason::AccountBlocked);
    }
    if state.limit_valid_until.is_some_and(|until| until < today) {
        reasons.push(Reason::LimitExpired);
    }
    let dunning = state
        .oldest_open_due
        .and_then(|due| dunning_level(&policy.dunning_levels, (today - due).num_days()))
        .map(|(_, level)| level.action);
    if dunning.is_some_and(|action| action >= DunningAction::Hold) {
        reasons.push(Reason::OverdueItems);
    }
    if state.max_order_minor.is_some_and(|max| amount_minor > max) {
        reasons.push(Reason::MaxOrderValue);
    }
    if !state.exposure.fits(amount_minor) {
        reasons.push(Reason::OverLimit);
    }
    if let Some(group) = state.group
        && group.limit_minor.saturating_sub(group.exposure_minor) < amount_minor
    {
        reasons.push(Reason::GroupLimitExceeded);
    }
    if dunning == Some(DunningAction::Block) {
        reasons.push(Reason::DunningBlock);
    }
    let outcome = if reasons.iter().any(|r| r.blocks()) {
        Outcome::Block
    } else if reasons.is_empty() {
        Outcome::Approve
    } else {
        Outcome::Hold
    };
    (outcome, reasons)
}

/// The alert thresholds (percent of the limit) crossed upwards going from
/// `before` to `after` exposure. A zero limit counts as 100 % used as soon as
/// anything is owed.
pub fn thresholds_crossed(policy: &Policy, limit_minor: i64, before: i64, after: i64) -> Vec<u32> {
    let used = |exposure: i64| -> i128 {
        if limit_minor <= 0 {
            if exposure > 0 { i128::MAX } else { 0 }
        } else {
            i128::from(exposure) * 10_000 / i128::from(limit_minor)
        }
    };
    let (from, to) = (used(before), used(after));
    policy
        .alert_thresholds_percent
        .iter()
        .copied()
        .filter(|t| {
            let at = i128::from(*t) * 100;
            from < at && to >= at
        })
        .collect()
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

    fn state(limit: i64, reserved: i64, receivable: i64) -> AccountState {
        AccountState {
            exposure: exposure(limit, reserved, receivable),
            blocked: false,
            max_order_minor: None,
            limit_valid_until: None,
            oldest_open_due: None,
            group: None,
        }
    }

    fn day(d: u32) -> chrono::NaiveDate {
        chrono::NaiveDate::from_ymd_opt(2026, 12, d).unwrap()
    }

    #[test]
    fn an_order_that_exactly_fills_the_limit_is_approved() {
        let p = Policy::default();
        let s = state(10_000, 3_000, 2_000);
        assert_eq!(
            evaluate(&p, Some(&s), 5_000, day(4)),
            (Outcome::Approve, vec![])
        );
        assert_eq!(
            evaluate(&p, Some(&s), 5_001, day(4)),
            (Outcome::Hold, vec![Reason::OverLimit])
        );
    }

    #[test]
    fn no_account_blocks() {
        assert_eq!(
            evaluate(&Policy::default(), None, 1, day(4)),
            (Outcome::Block, vec![Reason::NoCreditAccount])
        );
    }

    #[test]
    fn every_reason_that_applies_is_reported() {
        let p = Policy::default();
        let mut s = state(1_000, 900, 0);
        s.blocked = true;
        s.limit_valid_until = Some(day(3));
        s.oldest_open_due = Some(chrono::NaiveDate::from_ymd_opt(2026, 9, 20).unwrap());
        s.max_order_minor = Some(100);
        s.group = Some(Group {
            limit_minor: 5_000,
            exposure_minor: 4_950,
        });
        let (outcome, reasons) = evaluate(&p, Some(&s), 200, day(4));
        assert_eq!(outcome, Outcome::Block, "a blocked account blocks");
        assert_eq!(
            reasons,
            vec![
                Reason::AccountBlocked,
                Reason::LimitExpired,
                Reason::OverdueItems,
                Reason::MaxOrderValue,
                Reason::OverLimit,
                Reason::GroupLimitExceeded,
                Reason::DunningBlock
            ]
        );
        // 30 days past due is a reminder only; a limit valid through today
        // still passes.
        let mut s = state(1_000, 0, 0);
        s.oldest_open_due = Some(chrono::NaiveDate::from_ymd_opt(2026, 11, 4).unwrap());
        s.limit_valid_until = Some(day(4));
        assert_eq!(evaluate(&p, Some(&s), 10, day(4)).0, Outcome::Approve);
    }

    #[test]
    fn dunning_levels_climb_with_days_past_due() {
        let levels = default_dunning_levels();
        assert_eq!(dunning_level(&levels, 0), None);
        assert_eq!(dunning_level(&levels, 1).map(|l| l.0), Some(1));
        assert_eq!(dunning_level(&levels, 20).map(|l| l.0), Some(2));
        assert_eq!(
            dunning_level(&levels, 31).map(|l| l.1.action),
            Some(DunningAction::Hold)
        );
        assert_eq!(
            dunning_level(&levels, 400).map(|l| (l.0, l.1.action)),
            Some((4, DunningAction::Block))
        );
    }

    #[test]
    fn raises_above_authority_need_a_second_user() {
        assert!(
            !needs_approval(100, 90, Some(50)),
            "lowering never needs approval"
        );
        assert!(!needs_approval(100, 150, Some(200)));
        assert!(needs_approval(100, 250, Some(200)));
        assert!(needs_approval(0, 1, None));
    }

    #[test]
    fn thresholds_fire_once_on_the_way_up() {
        let p = Policy::default();
        assert_eq!(thresholds_crossed(&p, 1_000, 700, 850), vec![80]);
        assert_eq!(thresholds_crossed(&p, 1_000, 700, 1_000), vec![80, 100]);
        assert!(thresholds_crossed(&p, 1_000, 850, 900).is_empty());
        assert!(thresholds_crossed(&p, 1_000, 900, 500).is_empty());
        assert_eq!(thresholds_crossed(&p, 0, 0, 1), vec![80, 100]);
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
        for r in Reason::ALL {
            assert_eq!(Reason::from_code(r.code()), Some(r));
        }
        assert_eq!(
            Reason::split(&Reason::join(&Reason::ALL)),
            Reason::ALL.to_vec()
        );
    }
}
