//! Risk facts, payment behaviour and stored scores.

use chrono::{DateTime, NaiveDate, Utc};
use o2c_kit::ApiError;
use sea_orm::ActiveValue::Set;
use sea_orm::entity::prelude::*;
use sea_orm::sea_query::OnConflict;
use sea_orm::{ConnectionTrait, QueryOrder};

use super::Account;
use super::entities::{payment_behaviour, receivable, risk_facts, risk_score};
use crate::domain::risk::{self, Facts, Score};

/// The facts an analyst or CRM maintains.
#[derive(Debug, Clone)]
pub struct MaintainedFacts {
    pub relationship_since: Option<NaiveDate>,
    pub annual_volume_minor: i64,
    pub disputes: i32,
    pub write_offs: i32,
    pub broken_promises: i32,
}

pub async fn upsert_facts(
    conn: &impl ConnectionTrait,
    account: &Account,
    facts: &MaintainedFacts,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    risk_facts::Entity::insert(risk_facts::ActiveModel {
        account_id: Set(account.id.to_string()),
        relationship_since: Set(facts.relationship_since),
        annual_volume_minor: Set(facts.annual_volume_minor),
        disputes: Set(facts.disputes),
        write_offs: Set(facts.write_offs),
        broken_promises: Set(facts.broken_promises),
        updated_at: Set(now),
    })
    .on_conflict(
        OnConflict::column(risk_facts::Column::AccountId)
            .update_columns([
                risk_facts::Column::RelationshipSince,
                risk_facts::Column::AnnualVolumeMinor,
                risk_facts::Column::Disputes,
                risk_facts::Column::WriteOffs,
                risk_facts::Column::BrokenPromises,
                risk_facts::Column::UpdatedAt,
            ])
            .to_owned(),
    )
    .exec(conn)
    .await?;
    Ok(())
}

/// Records how an invoice was paid; a second record for the same invoice
/// replaces the first (a correction), never counts twice.
pub async fn record_behaviour(
    conn: &impl ConnectionTrait,
    account: &Account,
    invoice_id: &str,
    days_to_pay: i32,
    days_beyond_terms: i32,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    payment_behaviour::Entity::insert(payment_behaviour::ActiveModel {
        account_id: Set(account.id.to_string()),
        invoice_id: Set(invoice_id.to_owned()),
        days_to_pay: Set(days_to_pay),
        days_beyond_terms: Set(days_beyond_terms),
        recorded_at: Set(now),
    })
    .on_conflict(
        OnConflict::columns([
            payment_behaviour::Column::AccountId,
            payment_behaviour::Column::InvoiceId,
        ])
        .update_columns([
            payment_behaviour::Column::DaysToPay,
            payment_behaviour::Column::DaysBeyondTerms,
            payment_behaviour::Column::RecordedAt,
        ])
        .to_owned(),
    )
    .exec(conn)
    .await?;
    Ok(())
}

/// Everything the scorecard looks at for `account`.
pub async fn facts(conn: &impl ConnectionTrait, account: &Account) -> Result<Facts, ApiError> {
    let maintained = risk_facts::Entity::find_by_id(account.id.to_string())
        .one(conn)
        .await?;
    let payments = payment_behaviour::Entity::find()
        .filter(payment_behaviour::Column::AccountId.eq(account.id.to_string()))
        .order_by_asc(payment_behaviour::Column::RecordedAt)
        .order_by_asc(payment_behaviour::Column::InvoiceId)
        .all(conn)
        .await?;
    let open = receivable::Entity::find()
        .filter(receivable::Column::AccountId.eq(account.id.to_string()))
        .all(conn)
        .await?;
    Ok(Facts {
        relationship_since: maintained.as_ref().and_then(|m| m.relationship_since),
        annual_volume_minor: maintained.as_ref().map_or(0, |m| m.annual_volume_minor),
        disputes: maintained.as_ref().map_or(0, |m| m.disputes),
        write_offs: maintained.as_ref().map_or(0, |m| m.write_offs),
        broken_promises: maintained.as_ref().map_or(0, |m| m.broken_promises),
        past_holds: super::count_holds(conn, &account.id.to_string()).await?,
        open_receivables_minor: open.iter().map(|r| r.open_minor).sum(),
        payments: payments
            .iter()
            .map(|p| (p.days_to_pay, p.days_beyond_terms))
            .collect(),
    })
}

/// A stored score.
pub type StoredScore = risk_score::Model;

/// Scores `account` now and stores the score with its inputs.
pub async fn score_and_store(
    conn: &impl ConnectionTrait,
    account: &Account,
    now: DateTime<Utc>,
) -> Result<(StoredScore, Score), ApiError> {
    let inputs = facts(conn, account).await?;
    let score = risk::score(&inputs, now.date_naive());
    let encode = |value: &dyn erased::Json| value.json();
    let model = risk_score::ActiveModel {
        id: Set(uuid::Uuid::now_v7().to_string()),
        account_id: Set(account.id.to_string()),
        score: Set(score.points),
        risk_class: Set(score.class.code().to_owned()),
        calculated_limit_minor: Set(score.calculated_limit_minor),
        inputs_json: Set(encode(&inputs)?),
        factors_json: Set(encode(&score.factors)?),
        policy_version: Set(risk::SCORECARD_VERSION.to_owned()),
        scored_at: Set(now),
    };
    let stored = risk_score::Entity::insert(model)
        .exec_with_returning(conn)
        .await?;
    super::set_risk_class(conn, account, score.class.code()).await?;
    Ok((stored, score))
}

/// The latest stored score.
pub async fn latest_score(
    conn: &impl ConnectionTrait,
    account: &Account,
) -> Result<Option<StoredScore>, ApiError> {
    Ok(risk_score::Entity::find()
        .filter(risk_score::Column::AccountId.eq(account.id.to_string()))
        .order_by_desc(risk_score::Column::Id)
        .one(conn)
        .await?)
}

/// The factors of a stored score.
pub fn stored_factors(score: &StoredScore) -> Result<Vec<risk::Factor>, ApiError> {
    serde_json::from_str(&score.factors_json)
        .map_err(|_| super::corrupt("score factors", &score.id))
}

mod erased {
    use o2c_kit::ApiError;

    /// Serialises what the score stores.
    pub trait Json {
        fn json(&self) -> Result<String, ApiError>;
    }

    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> Result<String, ApiError> {
            serde_json::to_string(self)
                .map_err(|e| ApiError::Internal(format!("encoding score: {e}")))
        }
    }
}
