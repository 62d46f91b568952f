//! The customer service's own database: entities, migrations, queries.
//! Converts between rows and domain types in one place.

pub mod entities;
pub mod migrations;

use o2c_kit::ApiError;
use o2c_money::ids::{CreditAccountId, CustomerId};
use sea_orm::ActiveValue::Set;
use sea_orm::entity::prelude::*;
use sea_orm::{ConnectionTrait, QueryOrder};

use crate::domain::{Contact, CreditLink, Customer, ExternalId, NewCustomer};
use entities::{customer, external_id};

/// Stores a new customer and its external ids. An external id already used
/// by another customer of the tenant is refused.
pub async fn insert(conn: &impl ConnectionTrait, new: &NewCustomer) -> Result<Customer, ApiError> {
    let now = chrono::Utc::now();
    let contacts = serde_json::to_string(&new.contacts)
        .map_err(|e| ApiError::Internal(format!("encoding contacts: {e}")))?;
    customer::Entity::insert(customer::ActiveModel {
        id: Set(new.id.to_string()),
        tenant_id: Set(new.tenant_id.clone()),
        legal_name: Set(new.legal_name.clone()),
        country_code: Set(new.country.as_str().to_owned()),
        currency_code: Set(new.currency.code().to_owned()),
        contacts_json: Set(contacts),
        credit_account_id: Set(None),
        agency: Set(None),
        reference_last4: Set(None),
        reference_sha256: Set(None),
        linked_at: Set(None),
        created_at: Set(now),
    })
    .exec(conn)
    .await?;
    for (index, external) in new.external_ids.iter().enumerate() {
        let result = external_id::Entity::insert(external_id::ActiveModel {
            tenant_id: Set(new.tenant_id.clone()),
            system: Set(external.system.clone()),
            value: Set(external.value.clone()),
            customer_id: Set(new.id.to_string()),
        })
        .exec(conn)
        .await;
        match result {
            Ok(_) => {}
            Err(error) if o2c_kit::db::is_unique_violation(&error) => {
                return Err(ApiError::AlreadyExists(format!(
                    "external_ids[{index}]: {}:{} already belongs to another customer",
                    external.system, external.value
                )));
            }
            Err(error) => return Err(error.into()),
        }
    }
    get(conn, &new.tenant_id, new.id).await
}

/// One customer of the tenant.
pub async fn get(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: CustomerId,
) -> Result<Customer, ApiError> {
    let row = customer::Entity::find_by_id(id.to_string())
        .filter(customer::Column::TenantId.eq(tenant_id))
        .one(conn)
        .await?
        .ok_or_else(|| ApiError::not_found("customer", id))?;
    let externals = external_id::Entity::find()
        .filter(external_id::Column::TenantId.eq(tenant_id))
        .filter(external_id::Column::CustomerId.eq(id.to_string()))
        .order_by_asc(external_id::Column::System)
        .all(conn)
        .await?;
    to_domain(row, externals)
}

/// The customer a system's external id belongs to.
pub async fn find_by_external_id(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    external: &ExternalId,
) -> Result<Customer, ApiError> {
    let row = external_id::Entity::find_by_id((
        tenant_id.to_owned(),
        external.system.clone(),
        external.value.clone(),
    ))
    .one(conn)
    .await?
    .ok_or_else(|| {
        ApiError::not_found(
            "customer with external id",
            format!("{}:{}", external.system, external.value),
        )
    })?;
    let id = row.customer_id.parse().map_err(|_| {
        ApiError::Internal(format!("stored customer id {:?} invalid", row.customer_id))
    })?;
    get(conn, tenant_id, id).await
}

/// Records the credit link on the customer.
pub async fn set_credit_link(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: CustomerId,
    link: &CreditLink,
) -> Result<(), ApiError> {
    let result = customer::Entity::update_many()
        .col_expr(
            customer::Column::CreditAccountId,
            Expr::value(Some(link.credit_account_id.to_string())),
        )
        .col_expr(
            customer::Column::Agency,
            Expr::value(Some(link.agency.clone())),
        )
        .col_expr(
            customer::Column::ReferenceLast4,
            Expr::value(Some(link.reference_last4.clone())),
        )
        .col_expr(
            customer::Column::ReferenceSha256,
            Expr::value(Some(link.reference_sha256.clone())),
        )
        .col_expr(
            customer::Column::LinkedAt,
            Expr::value(Some(link.linked_at)),
        )
        .filter(customer::Column::Id.eq(id.to_string()))
        .filter(customer::Column::TenantId.eq(tenant_id))
        .exec(conn)
        .await?;
    if result.rows_affected == 0 {
        return Err(ApiError::not_found("customer", id));
    }
    Ok(())
}

fn to_domain(
    row: customer::Model,
    externals: Vec<external_id::Model>,
) -> Result<Customer, ApiError> {
    let corrupt = |what: &str| {
        ApiError::Internal(format!("customer {} has an invalid stored {what}", row.id))
    };
    let id: CustomerId = row.id.parse().map_err(|_| corrupt("id"))?;
    let contacts: Vec<Contact> =
        serde_json::from_str(&row.contacts_json).map_err(|_| corrupt("contacts"))?;
    let credit_link = match (&row.credit_account_id, &row.linked_at) {
        (Some(account), Some(linked_at)) => Some(CreditLink {
            credit_account_id: account
                .parse::<CreditAccountId>()
                .map_err(|_| corrupt("credit account id"))?,
            agency: row.agency.clone().unwrap_or_default(),
            reference_last4: row.reference_last4.clone().unwrap_or_default(),
            reference_sha256: row.reference_sha256.clone().unwrap_or_default(),
            linked_at: *linked_at,
        }),
        _ => None,
    };
    Ok(Customer {
        id,
        tenant_id: row.tenant_id,
        legal_name: row.legal_name,
        country_code: row.country_code,
        currency_code: row.currency_code,
        external_ids: externals
            .into_iter()
            .map(|e| ExternalId {
                system: e.system,
                value: e.value,
            })
            .collect(),
        contacts,
        credit_link,
        created_at: row.created_at,
    })
}
