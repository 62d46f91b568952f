//! Domain and storage values → wire messages.

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use o2c_kit::{ApiError, proto_money};
use o2c_proto::common::v1::Money;
use o2c_proto::credit::v1 as pb;

use crate::domain::risk::{self, RiskClass};
use crate::domain::{CreditError, Exposure, Outcome, Reason};
use crate::storage::{self, Account, Alert, AlertKind, Decision, Hold, LimitChange, Reservation};

pub fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn date(d: Option<NaiveDate>) -> String {
    d.map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

pub fn money(exposure: &Exposure, minor: i64) -> Result<Money, ApiError> {
    let value = exposure.money(minor).map_err(CreditError::from)?;
    Ok(proto_money::to_proto(&value))
}

pub fn exposure(e: &Exposure) -> Result<pb::Exposure, ApiError> {
    Ok(pb::Exposure {
        customer_id: e.customer_id.to_string(),
        credit_limit: Some(money(e, e.limit_minor)?),
        reserved: Some(money(e, e.reserved_minor)?),
        receivables: Some(money(e, e.receivable_minor)?),
        total: Some(money(e, e.total_minor())?),
        available: Some(money(e, e.available_minor())?),
        version: e.version,
    })
}

fn source(code: &str) -> pb::LimitSource {
    match code {
        storage::SOURCE_MANUAL => pb::LimitSource::Manual,
        storage::SOURCE_CALCULATED => pb::LimitSource::Calculated,
        _ => pb::LimitSource::Unspecified,
    }
}

pub fn risk_class(class: Option<&str>) -> pb::RiskClass {
    match class.and_then(RiskClass::from_code) {
        Some(RiskClass::A) => pb::RiskClass::A,
        Some(RiskClass::B) => pb::RiskClass::B,
        Some(RiskClass::C) => pb::RiskClass::C,
        Some(RiskClass::D) => pb::RiskClass::D,
        Some(RiskClass::E) => pb::RiskClass::E,
        None => pb::RiskClass::Unspecified,
    }
}

/// The account; `parent_customer_id` is the parent's customer, if any.
pub fn account(
    a: &Account,
    parent_customer_id: Option<String>,
) -> Result<pb::CreditAccount, ApiError> {
    let e = &a.exposure;
    Ok(pb::CreditAccount {
        credit_account_id: a.id.to_string(),
        tenant_id: a.tenant_id.clone(),
        customer_id: e.customer_id.to_string(),
        currency_code: e.currency.code().to_owned(),
        exposure: Some(exposure(e)?),
        credit_limit: Some(pb::CreditLimit {
            amount: Some(money(e, e.limit_minor)?),
            source: source(&a.limit_source) as i32,
            valid_until: date(a.limit_valid_until),
            next_review_date: date(a.next_review_date),
        }),
        parent_customer_id: parent_customer_id.unwrap_or_default(),
        blocked: a.blocked,
        max_order_value: a.max_order_minor.map(|m| money(e, m)).transpose()?,
        risk_class: risk_class(a.risk_class.as_deref()) as i32,
        group_exposure: Some(money(e, a.group_exposure_minor)?),
    })
}

pub fn reservation(r: &Reservation, e: &Exposure) -> Result<pb::Reservation, ApiError> {
    let state = match r.state.as_str() {
        storage::STATE_OPEN => pb::ReservationState::Open,
        storage::STATE_CONVERTED => pb::ReservationState::Converted,
        storage::STATE_RELEASED => pb::ReservationState::Released,
        storage::STATE_EXPIRED => pb::ReservationState::Expired,
        _ => pb::ReservationState::Unspecified,
    };
    Ok(pb::Reservation {
        reservation_id: r.id.to_string(),
        customer_id: r.customer_id.to_string(),
        order_id: r.order_id.clone(),
        amount: Some(money(e, r.amount_minor)?),
        state: state as i32,
        invoice_id: r.invoice_id.clone().unwrap_or_default(),
    })
}

pub fn reason(r: Reason) -> pb::ReasonCode {
    match r {
        Reason::OverLimit => pb::ReasonCode::OverLimit,
        Reason::NoCreditAccount => pb::ReasonCode::NoCreditAccount,
        Reason::OverdueItems => pb::ReasonCode::OverdueItems,
        Reason::LimitExpired => pb::ReasonCode::LimitExpired,
        Reason::AccountBlocked => pb::ReasonCode::AccountBlocked,
        Reason::MaxOrderValue => pb::ReasonCode::MaxOrderValue,
        Reason::GroupLimitExceeded => pb::ReasonCode::GroupLimitExceeded,
        Reason::DunningBlock => pb::ReasonCode::DunningBlock,
    }
}

pub fn reason_from_proto(code: pb::ReasonCode) -> Option<Reason> {
    Reason::ALL.into_iter().find(|r| reason(*r) == code)
}

fn reasons(text: &str) -> Vec<i32> {
    Reason::split(text)
        .into_iter()
        .map(|r| reason(r) as i32)
        .collect()
}

fn outcome(o: Option<Outcome>) -> pb::Decision {
    match o {
        Some(Outcome::Approve) => pb::Decision::Approve,
        Some(Outcome::Hold) => pb::Decision::Hold,
        Some(Outcome::Block) => pb::Decision::Block,
        None => pb::Decision::Unspecified,
    }
}

/// A stored decision, with the exposure after it when known.
pub fn decision(d: &Decision, after: Option<&Exposure>) -> Result<pb::CreditDecision, ApiError> {
    let currency = o2c_money::Currency::from_code(&d.currency_code)
        .map_err(|_| storage::corrupt("currency", &d.currency_code))?;
    let amount = o2c_money::Money::from_minor_units(d.amount_minor, currency)
        .map_err(|_| storage::corrupt("amount", &d.amount_minor.to_string()))?;
    Ok(pb::CreditDecision {
        decision_id: d.id.clone(),
        decision: outcome(Outcome::from_code(&d.outcome)) as i32,
        reasons: reasons(&d.reasons),
        reservation_id: d.reservation_id.clone().unwrap_or_default(),
        exposure: after.map(exposure).transpose()?,
        policy_version: d.policy_version.clone(),
        order_id: d.order_id.clone(),
        decided_at: time(d.created_at),
        amount: Some(proto_money::to_proto(&amount)),
        hold_id: d.hold_id.clone().unwrap_or_default(),
        inputs: d.inputs_json.clone(),
        client_reference: d.client_reference.clone(),
        customer_id: d.customer_id.clone(),
    })
}

pub fn hold(h: &Hold, e: &Exposure, now: DateTime<Utc>) -> Result<pb::Hold, ApiError> {
    let state = match h.state.as_str() {
        storage::HOLD_OPEN => pb::HoldState::Open,
        storage::HOLD_RELEASED => pb::HoldState::Released,
        storage::HOLD_REJECTED => pb::HoldState::Rejected,
        _ => pb::HoldState::Unspecified,
    };
    Ok(pb::Hold {
        hold_id: h.id.clone(),
        customer_id: h.customer_id.clone(),
        order_id: h.order_id.clone(),
        amount: Some(money(e, h.amount_minor)?),
        reasons: reasons(&h.reasons),
        state: state as i32,
        created_at: time(h.created_at),
        age_seconds: (now - h.created_at).num_seconds().max(0),
        resolved_by: h.resolved_by.clone().unwrap_or_default(),
        resolution_reason: h.resolution_reason.clone().unwrap_or_default(),
        reservation_id: h.reservation_id.clone().unwrap_or_default(),
    })
}

pub fn limit_change(c: &LimitChange, e: &Exposure) -> Result<pb::LimitChange, ApiError> {
    let status = match c.status.as_str() {
        storage::CHANGE_APPLIED => pb::LimitChangeStatus::Applied,
        storage::CHANGE_PENDING => pb::LimitChangeStatus::PendingApproval,
        storage::CHANGE_REJECTED => pb::LimitChangeStatus::Rejected,
        _ => pb::LimitChangeStatus::Unspecified,
    };
    Ok(pb::LimitChange {
        limit_change_id: c.id.clone(),
        customer_id: c.customer_id.clone(),
        status: status as i32,
        before: Some(money(e, c.before_minor)?),
        after: Some(money(e, c.after_minor)?),
        source: source(&c.source) as i32,
        valid_until: date(c.valid_until),
        next_review_date: date(c.next_review_date),
        reason: c.reason.clone(),
        requested_by: c.requested_by.clone(),
        requested_at: time(c.requested_at),
        decided_by: c.decided_by.clone().unwrap_or_default(),
        decided_at: c.decided_at.map(time).unwrap_or_default(),
        decision_reason: c.decision_reason.clone().unwrap_or_default(),
    })
}

pub fn alert(a: &Alert) -> pb::Alert {
    let kind = match AlertKind::from_code(&a.kind) {
        Some(AlertKind::ExposureThreshold) => pb::AlertKind::ExposureThreshold,
        Some(AlertKind::HoldCreated) => pb::AlertKind::HoldCreated,
        Some(AlertKind::LimitExpired) => pb::AlertKind::LimitExpired,
        Some(AlertKind::ReviewDue) => pb::AlertKind::ReviewDue,
        Some(AlertKind::LimitChangePending) => pb::AlertKind::LimitChangePending,
        Some(AlertKind::Dunning) => pb::AlertKind::Dunning,
        Some(AlertKind::CollectionFailed) => pb::AlertKind::CollectionFailed,
        None => pb::AlertKind::Unspecified,
    };
    pb::Alert {
        alert_id: a.id.clone(),
        customer_id: a.customer_id.clone(),
        kind: kind as i32,
        threshold_percent: a.threshold_percent,
        message: a.message.clone(),
        raised_at: time(a.raised_at),
        acknowledged: a.acknowledged_by.is_some(),
        acknowledged_by: a.acknowledged_by.clone().unwrap_or_default(),
        order_id: a.order_id.clone().unwrap_or_default(),
    }
}

pub fn score(
    stored: &storage::risk::StoredScore,
    factors: &[risk::Factor],
    e: &Exposure,
) -> Result<pb::RiskScore, ApiError> {
    Ok(pb::RiskScore {
        score_id: stored.id.clone(),
        customer_id: e.customer_id.to_string(),
        score: stored.score,
        risk_class: risk_class(Some(&stored.risk_class)) as i32,
        calculated_limit: Some(money(e, stored.calculated_limit_minor)?),
        factors: factors
            .iter()
            .map(|f| pb::RiskFactor {
                name: f.name.clone(),
                value: f.value.clone(),
                points: f.points,
                explanation: f.explanation.clone(),
            })
            .collect(),
        policy_version: stored.policy_version.clone(),
        scored_at: time(stored.scored_at),
    })
}
