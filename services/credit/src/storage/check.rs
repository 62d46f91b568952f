//! The credit check as one unit of work inside a transaction: evaluate the
//! policy on fresh state, reserve atomically when it approves, put the order
//! on hold otherwise, document the decision, and collect the alerts to
//! publish after commit.

use chrono::{DateTime, Utc};
use o2c_kit::ApiError;
use o2c_money::Money;
use o2c_money::ids::CustomerId;
use sea_orm::ConnectionTrait;

use super::{Account, Alert, AlertKind, Decision, DecisionRecord, Hold, Reservation};
use crate::domain::{self, AccountState, Exposure, Outcome, Policy, Reason};

/// Evaluations of a check whose rows a concurrent change made stale (the
/// guarded reservation refused what the policy approved, or a refusal's
/// rows changed); the last one locks the rows before it evaluates.
const MAX_RESERVE_ATTEMPTS: usize = 3;

/// Time and policy a check runs under.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    pub policy: &'a Policy,
    pub now: DateTime<Utc>,
    /// How long an unresolved reservation lives.
    pub reservation_ttl: chrono::Duration,
}

/// What a check did.
#[derive(Debug)]
pub struct Checked {
    pub decision: Decision,
    pub outcome: Outcome,
    pub reasons: Vec<Reason>,
    pub reservation: Option<Reservation>,
    pub hold: Option<Hold>,
    /// The account after the check (None: no account).
    pub account: Option<Account>,
    pub alerts: Vec<Alert>,
}

#[derive(serde::Serialize)]
struct Inputs<'a> {
    today: chrono::NaiveDate,
    amount_minor: i64,
    limit_minor: i64,
    reserved_minor: i64,
    receivable_minor: i64,
    blocked: bool,
    max_order_minor: Option<i64>,
    limit_valid_until: Option<chrono::NaiveDate>,
    oldest_open_due: Option<chrono::NaiveDate>,
    group_limit_minor: Option<i64>,
    group_exposure_minor: Option<i64>,
    dunning_levels: &'a [domain::DunningLevel],
}

fn inputs_json(state: &AccountState, amount_minor: i64, ctx: &Context<'_>) -> String {
    let inputs = Inputs {
        today: ctx.now.date_naive(),
        amount_minor,
        limit_minor: state.exposure.limit_minor,
        reserved_minor: state.exposure.reserved_minor,
        receivable_minor: state.exposure.receivable_minor,
        blocked: state.blocked,
        max_order_minor: state.max_order_minor,
        limit_valid_until: state.limit_valid_until,
        oldest_open_due: state.oldest_open_due,
        group_limit_minor: state.group.map(|g| g.limit_minor),
        group_exposure_minor: state.group.map(|g| g.exposure_minor),
        dunning_levels: &ctx.policy.dunning_levels,
    };
    serde_json::to_string(&inputs).unwrap_or_else(|_| "{}".into())
}

/// Evaluates the policy on fresh state and, when it approves, reserves
/// atomically. Returns the verdict, the state it was taken on, and the
/// account as it now is (as the reservation left it, or as the verdict
/// read it).
///
/// A refusal changes no row, so nothing else would notice a change it
/// missed (a payment that a recheck of the holds already looked past): it
/// holds only on the rows as read, which it confirms and locks until the
/// commit ([`super::still_as_read`]), evaluating again when they changed.
/// The last evaluation locks the rows first, so that its verdict, a
/// refused reservation included, rests on them as they are.
async fn evaluate_and_reserve(
    conn: &impl ConnectionTrait,
    ctx: &Context<'_>,
    account: &Account,
    amount_minor: i64,
) -> Result<(Outcome, Vec<Reason>, AccountState, Account), ApiError> {
    let today = ctx.now.date_naive();
    for attempt in 1..=MAX_RESERVE_ATTEMPTS {
        // The caller read `account` in this transaction a moment ago; a
        // retry reads again, since a concurrent change made it stale.
        let fresh = if attempt == 1 {
            account.clone()
        } else {
            super::account_by_id(conn, &account.id.to_string()).await?
        };
        let state = super::policy_state(conn, &fresh).await?;
        let last = attempt == MAX_RESERVE_ATTEMPTS;
        if last && !super::still_as_read(conn, &fresh, &state).await? {
            return Err(ApiError::Aborted(
                "the credit account kept changing while the order was checked; retry".into(),
            ));
        }
        let (outcome, reasons) = domain::evaluate(ctx.policy, Some(&state), amount_minor, today);
        if outcome != Outcome::Approve {
            if last || super::still_as_read(conn, &fresh, &state).await? {
                return Ok((outcome, reasons, state, fresh));
            }
            continue;
        }
        match super::try_reserve(conn, &fresh, amount_minor, ctx.now).await? {
            Ok(after) => return Ok((Outcome::Approve, Vec::new(), state, after)),
            // The rows are locked as read: the refusal rests on them.
            Err(reason) if last => return Ok((Outcome::Hold, vec![reason], state, fresh)),
            // Something changed between our read and the guarded write:
            // evaluate again on the new state.
            Err(_) => continue,
        }
    }
    Err(ApiError::Internal(
        "credit check loop ended without a verdict".into(),
    ))
}

/// The alerts for exposure thresholds crossed from `before` to `account`.
fn threshold_alert_rows(ctx: &Context<'_>, account: &Account, before: &Exposure) -> Vec<Alert> {
    let after = &account.exposure;
    domain::thresholds_crossed(
        ctx.policy,
        after.limit_minor,
        before.total_minor(),
        after.total_minor(),
    )
    .into_iter()
    .map(|threshold| {
        super::alert_row(
            account,
            AlertKind::ExposureThreshold,
            i32::try_from(threshold).unwrap_or(i32::MAX),
            format!("exposure reached {threshold}% of the credit limit"),
            None,
            ctx.now,
        )
    })
    .collect()
}

/// The alert that an order was put on hold.
fn hold_alert_row(
    ctx: &Context<'_>,
    account: &Account,
    order_id: &str,
    reasons: &[Reason],
) -> Alert {
    let codes = Reason::join(reasons);
    super::alert_row(
        account,
        AlertKind::HoldCreated,
        0,
        format!("order {order_id} held: {codes}"),
        Some(order_id),
        ctx.now,
    )
}

/// Alerts for exposure thresholds crossed from `before` to `after`.
async fn threshold_alerts(
    conn: &impl ConnectionTrait,
    ctx: &Context<'_>,
    account: &Account,
    before: &Exposure,
) -> Result<Vec<Alert>, ApiError> {
    let alerts = threshold_alert_rows(ctx, account, before);
    for alert in &alerts {
        super::insert_alert_row(conn, alert).await?;
    }
    Ok(alerts)
}

/// Raises the threshold alerts of any change from `before` to `account`.
pub async fn alerts_after_change(
    conn: &impl ConnectionTrait,
    ctx: &Context<'_>,
    account: &Account,
    before: &Exposure,
) -> Result<Vec<Alert>, ApiError> {
    threshold_alerts(conn, ctx, account, before).await
}

/// Checks an order of `amount` for `customer` (whose account may be
/// missing) and reserves it on approval. A `first_check` (a re-check of a
/// hold is not) marks the order as checked unless it is blocked
/// ([`super::claim_order`]), and puts a non-approved order on hold.
#[allow(clippy::too_many_arguments)]
pub async fn check_order(
    conn: &impl ConnectionTrait,
    ctx: &Context<'_>,
    tenant_id: &str,
    customer_id: CustomerId,
    account: Option<&Account>,
    order_id: &str,
    client_reference: &str,
    amount: Money,
    first_check: bool,
) -> Result<Checked, ApiError> {
    let amount_minor = amount.minor_units();
    let Some(account) = account else {
        let reasons = vec![Reason::NoCreditAccount];
        let decision = super::insert_decision(
            conn,
            &DecisionRecord {
                tenant_id,
                customer_id,
                order_id,
                client_reference,
                amount_minor,
                currency: amount.currency(),
                outcome: Outcome::Block,
                reasons: &reasons,
                reservation_id: None,
                hold_id: None,
                inputs_json: "{}".into(),
                now: ctx.now,
            },
        )
        .await?;
        return Ok(Checked {
            decision,
            outcome: Outcome::Block,
            reasons,
            reservation: None,
            hold: None,
            account: None,
            alerts: Vec::new(),
        });
    };
    // As the reservation left it, or as the verdict read it.
    let (outcome, reasons, state, after) =
        evaluate_and_reserve(conn, ctx, account, amount_minor).await?;
    if first_check && outcome != Outcome::Block {
        super::claim_order(conn, tenant_id, order_id, ctx.now).await?;
    }
    let mut alerts = Vec::new();
    let reservation = if outcome == Outcome::Approve {
        let expires_at = ctx.now + ctx.reservation_ttl;
        let reservation =
            super::insert_reservation(conn, &after, order_id, amount_minor, ctx.now, expires_at)
                .await?;
        alerts.extend(threshold_alerts(conn, ctx, &after, &state.exposure).await?);
        Some(reservation)
    } else {
        None
    };
    let hold = if outcome == Outcome::Hold && first_check {
        let hold =
            super::insert_hold(conn, &after, order_id, amount_minor, &reasons, ctx.now).await?;
        let alert = hold_alert_row(ctx, &after, order_id, &reasons);
        super::insert_alert_row(conn, &alert).await?;
        alerts.push(alert);
        Some(hold)
    } else {
        None
    };
    let decision = super::insert_decision(
        conn,
        &DecisionRecord {
            tenant_id,
            customer_id,
            order_id,
            client_reference,
            amount_minor,
            currency: amount.currency(),
            outcome,
            reasons: &reasons,
            reservation_id: reservation.as_ref().map(|r| r.id),
            hold_id: hold.as_ref().map(|h| h.id.clone()),
            inputs_json: inputs_json(&state, amount_minor, ctx),
            now: ctx.now,
        },
    )
    .await?;
    Ok(Checked {
        decision,
        outcome,
        reasons,
        reservation,
        hold,
        account: Some(after),
        alerts,
    })
}

/// What [`plan_order`] decided, with the rows for the caller to write.
#[derive(Debug)]
pub struct Planned {
    pub checked: Checked,
    /// The row of the reservation it made.
    pub reservation: Option<super::reservation::Model>,
}

/// Checks an order as [`check_order`] does, in memory, for a caller that
/// writes what this returns, with `account` guarded by the version it was
/// read with (held or not, so that the decision rests on the account as it
/// still is when it commits): the decision,
/// the reservation or hold with their alerts, and `account` as the
/// reservation left it (its exposure, group exposure and version; the
/// caller writes these too). `account` must belong to no group as a member
/// (whose check needs its parent's row); None is a customer without an
/// account. A hold is always created.
#[allow(clippy::too_many_arguments)]
pub fn plan_order(
    ctx: &Context<'_>,
    tenant_id: &str,
    customer_id: CustomerId,
    account: Option<&mut Account>,
    oldest_open_due: Option<chrono::NaiveDate>,
    order_id: &str,
    client_reference: &str,
    amount: Money,
) -> Result<Planned, ApiError> {
    let amount_minor = amount.minor_units();
    let record = |outcome, reasons: &[Reason], reservation_id, hold_id, inputs_json| {
        super::decision_row(&DecisionRecord {
            tenant_id,
            customer_id,
            order_id,
            client_reference,
            amount_minor,
            currency: amount.currency(),
            outcome,
            reasons,
            reservation_id,
            hold_id,
            inputs_json,
            now: ctx.now,
        })
    };
    let Some(account) = account else {
        let reasons = vec![Reason::NoCreditAccount];
        return Ok(Planned {
            checked: Checked {
                decision: record(Outcome::Block, &reasons, None, None, "{}".into()),
                outcome: Outcome::Block,
                reasons,
                reservation: None,
                hold: None,
                account: None,
                alerts: Vec::new(),
            },
            reservation: None,
        });
    };
    if account.parent_account_id.is_some() {
        return Err(ApiError::Internal(format!(
            "account {} is a member of a group: its check needs its parent",
            account.id
        )));
    }
    let state = super::account_state(account, oldest_open_due, None);
    let (mut outcome, mut reasons) =
        domain::evaluate(ctx.policy, Some(&state), amount_minor, ctx.now.date_naive());
    // As the guarded write would refuse it after every retry.
    if outcome == Outcome::Approve && !super::fits(account, amount_minor) {
        outcome = Outcome::Hold;
        reasons = vec![Reason::OverLimit];
    }
    let mut alerts = Vec::new();
    let reservation = if outcome == Outcome::Approve {
        let before = account.exposure;
        account.exposure.reserved_minor += amount_minor;
        account.group_exposure_minor += amount_minor;
        account.exposure.version += 1;
        alerts.extend(threshold_alert_rows(ctx, account, &before));
        Some(super::reservation_row(
            account,
            order_id,
            amount_minor,
            ctx.now,
            ctx.now + ctx.reservation_ttl,
        ))
    } else {
        None
    };
    let hold = if outcome == Outcome::Hold {
        alerts.push(hold_alert_row(ctx, account, order_id, &reasons));
        Some(super::hold_row(
            account,
            order_id,
            amount_minor,
            &reasons,
            ctx.now,
        ))
    } else {
        None
    };
    let reserved = reservation.clone().map(super::to_reservation).transpose()?;
    let decision = record(
        outcome,
        &reasons,
        reserved.as_ref().map(|r| r.id),
        hold.as_ref().map(|h| h.id.clone()),
        inputs_json(&state, amount_minor, ctx),
    );
    Ok(Planned {
        checked: Checked {
            decision,
            outcome,
            reasons,
            reservation: reserved,
            hold,
            account: Some(account.clone()),
            alerts,
        },
        reservation,
    })
}

/// Changes an open reservation to `new_amount`: a decrease releases the
/// difference; an increase is checked like an order of the difference and
/// applied only when approved. The decision is documented either way.
pub async fn amend(
    conn: &impl ConnectionTrait,
    ctx: &Context<'_>,
    tenant_id: &str,
    reservation: &Reservation,
    new_amount: Money,
) -> Result<Checked, ApiError> {
    let account = super::account_by_id(conn, &reservation.account_id).await?;
    let new_minor = new_amount.minor_units();
    let difference = new_minor - reservation.amount_minor;
    let before = account.exposure;
    let (outcome, reasons, inputs) = if difference <= 0 {
        if difference < 0 {
            super::adjust(conn, &reservation.account_id, difference, 0, ctx.now).await?;
        }
        let state = super::policy_state(conn, &account).await?;
        (
            Outcome::Approve,
            Vec::new(),
            inputs_json(&state, difference, ctx),
        )
    } else {
        let (outcome, reasons, state, _) =
            evaluate_and_reserve(conn, ctx, &account, difference).await?;
        (outcome, reasons, inputs_json(&state, difference, ctx))
    };
    if outcome == Outcome::Approve && difference != 0 {
        super::set_reservation_amount(conn, reservation, new_minor).await?;
    }
    let after = super::account_by_id(conn, &reservation.account_id).await?;
    let alerts = threshold_alerts(conn, ctx, &after, &before).await?;
    let updated = super::get_reservation(conn, tenant_id, reservation.id).await?;
    let decision = super::insert_decision(
        conn,
        &DecisionRecord {
            tenant_id,
            customer_id: reservation.customer_id,
            order_id: &reservation.order_id,
            client_reference: "",
            amount_minor: new_minor,
            currency: new_amount.currency(),
            outcome,
            reasons: &reasons,
            reservation_id: (outcome == Outcome::Approve).then_some(reservation.id),
            hold_id: None,
            inputs_json: inputs,
            now: ctx.now,
        },
    )
    .await?;
    Ok(Checked {
        decision,
        outcome,
        reasons,
        reservation: Some(updated),
        hold: None,
        account: Some(after),
        alerts,
    })
}
