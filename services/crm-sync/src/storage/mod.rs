//! The connector's own database: CRM links and interactions.

pub mod entities;
pub mod migrations;

use o2c_kit::ApiError;
use o2c_money::ids::{CustomerId, InteractionId};
use sea_orm::ActiveValue::Set;
use sea_orm::entity::prelude::*;
use sea_orm::{ConnectionTrait, QueryOrder, QuerySelect};

use crate::domain::InteractionKind;
use entities::{credit_status, interaction, link};
use sea_orm::sea_query::OnConflict;

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

/// Records the link; a concurrent identical link is fine.
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
    .exec(conn)
    .await;
    match result {
        Ok(_) => Ok(()),
        Err(error) if o2c_kit::db::is_unique_violation(&error) => Ok(()),
        Err(error) => Err(error.into()),
    }
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

/// Stores `status` unless a status of a higher or equal version is there.
pub async fn upsert_credit_status(
    conn: &impl ConnectionTrait,
    status: CreditStatus,
) -> Result<(), ApiError> {
    let current =
        credit_status::Entity::find_by_id((status.tenant_id.clone(), status.customer_id.clone()))
            .one(conn)
            .await?;
    if current
        .as_ref()
        .is_some_and(|c| c.version >= status.version)
    {
        return Ok(());
    }
    let model = credit_status::ActiveModel {
        tenant_id: Set(status.tenant_id),
        customer_id: Set(status.customer_id),
        currency_code: Set(status.currency_code),
        credit_limit: Set(status.credit_limit),
        reserved: Set(status.reserved),
        receivables: Set(status.receivables),
        available: Set(status.available),
        version: Set(status.version),
        updated_at: Set(status.updated_at),
    };
    credit_status::Entity::insert(model)
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
            .to_owned(),
        )
        .exec(conn)
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
