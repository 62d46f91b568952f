//! The connector's own database: CRM links and interactions.

pub mod entities;
pub mod migrations;

use o2c_kit::ApiError;
use o2c_money::ids::{CustomerId, InteractionId};
use sea_orm::ActiveValue::Set;
use sea_orm::entity::prelude::*;
use sea_orm::{ConnectionTrait, QueryOrder, QuerySelect};

use crate::domain::InteractionKind;
use entities::{credit_status, interaction, invoice_record, link, payment_record};
use sea_orm::sea_query::{Alias, ExprTrait, OnConflict};

/// A stored interaction.
#[derive(Debug, Clone)]
pub struct Interaction {
    pub id: InteractionId,
    pub customer_id: CustomerId,
    pub crm_system: String,
    pub kind: InteractionKind,
    pub summary: String,
    pub occurred_at: chrono::DateTime<chrono::Utc>,
}

fn corrupt(what: &str, value: &str) -> ApiError {
    ApiError::Internal(format!("stored {what} {value:?} is invalid"))
}

pub async fn find_link(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    crm_system: &str,
    external_id: &str,
) -> Result<Option<CustomerId>, ApiError> {
    link::Entity::find_by_id((
        tenant_id.to_owned(),
        crm_system.to_owned(),
        external_id.to_owned(),
    ))
    .one(conn)
    .await?
    .map(|row| {
        row.customer_id
            .parse()
            .map_err(|_| corrupt("customer id", &row.customer_id))
    })
    .transpose()
}

/// Records the link; an existing link stays as it is. `ON CONFLICT DO
/// NOTHING` rather than catching the violation, so this is safe inside a
/// PostgreSQL transaction (a failed statement would abort it).
pub async fn save_link(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    crm_system: &str,
    external_id: &str,
    customer_id: CustomerId,
) -> Result<(), ApiError> {
    let result = link::Entity::insert(link::ActiveModel {
        tenant_id: Set(tenant_id.to_owned()),
        crm_system: Set(crm_system.to_owned()),
        external_id: Set(external_id.to_owned()),
        customer_id: Set(customer_id.to_string()),
        linked_at: Set(chrono::Utc::now()),
    })
    .on_conflict(
        OnConflict::columns([
            link::Column::TenantId,
            link::Column::CrmSystem,
            link::Column::ExternalId,
        ])
        .do_nothing()
        .to_owned(),
    )
    .exec_without_returning(conn)
    .await;
    result.map(|_| ()).map_err(ApiError::from)
}

pub async fn insert_interaction(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    interaction: &Interaction,
) -> Result<(), ApiError> {
    interaction::Entity::insert(interaction::ActiveModel {
        id: Set(interaction.id.to_string()),
        tenant_id: Set(tenant_id.to_owned()),
        customer_id: Set(interaction.customer_id.to_string()),
        crm_system: Set(interaction.crm_system.clone()),
        kind: Set(interaction.kind.code().to_owned()),
        summary: Set(interaction.summary.clone()),
        occurred_at: Set(interaction.occurred_at),
    })
    .exec(conn)
    .await?;
    Ok(())
}

/// Newest first, `limit` at most, strictly before `before` when given.
pub async fn list_interactions(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    customer_id: CustomerId,
    before: Option<InteractionId>,
    limit: u64,
) -> Result<Vec<Interaction>, ApiError> {
    let mut query = interaction::Entity::find()
        .filter(interaction::Column::TenantId.eq(tenant_id))
        .filter(interaction::Column::CustomerId.eq(customer_id.to_string()));
    if let Some(before) = before {
        query = query.filter(interaction::Column::Id.lt(before.to_string()));
    }
    let rows = query
        .order_by_desc(interaction::Column::Id)
        .limit(limit)
        .all(conn)
        .await?;
    rows.into_iter()
        .map(|row| {
            Ok(Interaction {
                id: row
                    .id
                    .parse()
                    .map_err(|_| corrupt("interaction id", &row.id))?,
                customer_id: row
                    .customer_id
                    .parse()
                    .map_err(|_| corrupt("customer id", &row.customer_id))?,
                crm_system: row.crm_system,
                kind: InteractionKind::from_code(&row.kind)
                    .ok_or_else(|| corrupt("kind", &row.kind))?,
                summary: row.summary,
                occurred_at: row.occurred_at,
            })
        })
        .collect()
}

/// A credit status as received.
pub type CreditStatus = credit_status::Model;

/// Stores each of `statuses` (at most one per customer) unless a status of
/// a higher or equal version is there: one statement, whose update applies
/// only over an older version.
pub async fn upsert_credit_statuses(
    conn: &impl ConnectionTrait,
    statuses: Vec<CreditStatus>,
) -> Result<(), ApiError> {
    credit_status::Entity::insert_many(statuses.into_iter().map(credit_status::ActiveModel::from))
        .on_conflict(
            OnConflict::columns([
                credit_status::Column::TenantId,
                credit_status::Column::CustomerId,
            ])
            .update_columns([
                credit_status::Column::CurrencyCode,
                credit_status::Column::CreditLimit,
                credit_status::Column::Reserved,
                credit_status::Column::Receivables,
                credit_status::Column::Available,
                credit_status::Column::Version,
                credit_status::Column::UpdatedAt,
            ])
            .action_and_where(
                Expr::col((credit_status::Entity, credit_status::Column::Version)).lt(Expr::col((
                    Alias::new("excluded"),
                    credit_status::Column::Version,
                ))),
            )
            .to_owned(),
        )
        .exec_without_returning(conn)
        .await?;
    Ok(())
}

pub async fn credit_status(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    customer_id: CustomerId,
) -> Result<Option<CreditStatus>, ApiError> {
    Ok(
        credit_status::Entity::find_by_id((tenant_id.to_owned(), customer_id.to_string()))
            .one(conn)
            .await?,
    )
}

/// Which activity list a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    Invoice,
    Payment,
}

/// Stores the latest `record` (encoded) of an invoice or payment; events
/// arrive in order per producer, so the last one delivered is the latest.
pub async fn upsert_activity(
    conn: &impl ConnectionTrait,
    kind: Activity,
    tenant_id: &str,
    id: &str,
    customer_id: &str,
    record: Vec<u8>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), ApiError> {
    match kind {
        Activity::Invoice => {
            invoice_record::Entity::insert(invoice_record::ActiveModel {
                tenant_id: Set(tenant_id.to_owned()),
                invoice_id: Set(id.to_owned()),
                customer_id: Set(customer_id.to_owned()),
                record: Set(record),
                updated_at: Set(now),
            })
            .on_conflict(
                OnConflict::columns([
                    invoice_record::Column::TenantId,
                    invoice_record::Column::InvoiceId,
                ])
                .update_columns([
                    invoice_record::Column::Record,
                    invoice_record::Column::UpdatedAt,
                ])
                .to_owned(),
            )
            .exec(conn)
            .await?;
        }
        Activity::Payment => {
            payment_record::Entity::insert(payment_record::ActiveModel {
                tenant_id: Set(tenant_id.to_owned()),
                payment_id: Set(id.to_owned()),
                customer_id: Set(customer_id.to_owned()),
                record: Set(record),
                updated_at: Set(now),
            })
            .on_conflict(
                OnConflict::columns([
                    payment_record::Column::TenantId,
                    payment_record::Column::PaymentId,
                ])
                .update_columns([
                    payment_record::Column::Record,
                    payment_record::Column::UpdatedAt,
                ])
                .to_owned(),
            )
            .exec(conn)
            .await?;
        }
    }
    Ok(())
}

/// A customer's records of `kind`, newest first, strictly before `before`:
/// (id, encoded record).
pub async fn list_activity(
    conn: &impl ConnectionTrait,
    kind: Activity,
    tenant_id: &str,
    customer_id: CustomerId,
    before: Option<&str>,
    limit: u64,
) -> Result<Vec<(String, Vec<u8>)>, ApiError> {
    Ok(match kind {
        Activity::Invoice => {
            let mut query = invoice_record::Entity::find()
                .filter(invoice_record::Column::TenantId.eq(tenant_id))
                .filter(invoice_record::Column::CustomerId.eq(customer_id.to_string()));
            if let Some(before) = before {
                query = query.filter(invoice_record::Column::InvoiceId.lt(before));
            }
            query
                .order_by_desc(invoice_record::Column::InvoiceId)
                .limit(limit)
                .all(conn)
                .await?
                .into_iter()
                .map(|row| (row.invoice_id, row.record))
                .collect()
        }
        Activity::Payment => {
            let mut query = payment_record::Entity::find()
                .filter(payment_record::Column::TenantId.eq(tenant_id))
                .filter(payment_record::Column::CustomerId.eq(customer_id.to_string()));
            if let Some(before) = before {
                query = query.filter(payment_record::Column::PaymentId.lt(before));
            }
            query
                .order_by_desc(payment_record::Column::PaymentId)
                .limit(limit)
                .all(conn)
                .await?
                .into_iter()
                .map(|row| (row.payment_id, row.record))
                .collect()
        }
    })
}
