//! The gateway's own database: the order workflow and idempotency claims.

pub mod entities;
pub mod journal;
pub mod migrations;

use o2c_kit::ApiError;
use o2c_money::ids::{CustomerId, OrderId};
use o2c_money::{Currency, Money};
use sea_orm::ConnectionTrait;
use sea_orm::entity::prelude::*;

use crate::domain::OrderStatus;
use entities::order;

/// A stored order.
#[derive(Debug, Clone)]
pub struct Order {
    pub id: OrderId,
    pub customer_id: CustomerId,
    pub client_reference: String,
    pub amount: Money,
    pub status: OrderStatus,
    pub reasons: Vec<String>,
    pub reservation_id: Option<String>,
    pub hold_id: Option<String>,
    pub invoice_id: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

fn corrupt(what: &str, value: &str) -> ApiError {
    ApiError::Internal(format!("stored {what} {value:?} is invalid"))
}

fn to_domain(row: order::Model) -> Result<Order, ApiError> {
    let currency = Currency::from_code(&row.currency_code)
        .map_err(|_| corrupt("currency", &row.currency_code))?;
    Ok(Order {
        id: row.id.parse().map_err(|_| corrupt("order id", &row.id))?,
        customer_id: row
            .customer_id
            .parse()
            .map_err(|_| corrupt("customer id", &row.customer_id))?,
        client_reference: row.client_reference,
        amount: Money::from_minor_units(row.amount_minor, currency)
            .map_err(|_| corrupt("amount", &row.amount_minor.to_string()))?,
        status: OrderStatus::from_code(&row.status)
            .ok_or_else(|| corrupt("status", &row.status))?,
        reasons: row
            .reasons
            .split(',')
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .collect(),
        reservation_id: row.reservation_id,
        hold_id: row.hold_id,
        invoice_id: row.invoice_id,
        created_at: row.created_at,
    })
}

/// The row of an order that was just decided: `place_key` is the key of
/// the PlaceOrder call that placed it (empty when the order was rebuilt
/// from its credit decision).
pub fn row(tenant_id: &str, place_key: &str, order: &Order) -> order::Model {
    order::Model {
        id: order.id.to_string(),
        tenant_id: tenant_id.to_owned(),
        place_key: place_key.to_owned(),
        customer_id: order.customer_id.to_string(),
        client_reference: order.client_reference.clone(),
        currency_code: order.amount.currency().code().to_owned(),
        amount_minor: order.amount.minor_units(),
        status: order.status.code().to_owned(),
        reasons: order.reasons.join(","),
        reservation_id: order.reservation_id.clone(),
        hold_id: order.hold_id.clone(),
        invoice_id: order.invoice_id.clone(),
        created_at: order.created_at,
        updated_at: order.created_at,
    }
}

/// Inserts `rows` in one statement, keeping any order that is there
/// already as it is.
pub async fn insert_if_absent(
    conn: &impl ConnectionTrait,
    rows: Vec<order::Model>,
) -> Result<(), DbErr> {
    order::Entity::insert_many(rows.into_iter().map(order::ActiveModel::from))
        .on_conflict(
            sea_orm::sea_query::OnConflict::column(order::Column::Id)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(conn)
        .await?;
    Ok(())
}

pub async fn get(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: OrderId,
) -> Result<Order, ApiError> {
    order::Entity::find_by_id(id.to_string())
        .filter(order::Column::TenantId.eq(tenant_id))
        .one(conn)
        .await?
        .ok_or_else(|| ApiError::not_found("order", id))
        .and_then(to_domain)
}

/// Records the credit decision on the order.
pub async fn record_decision(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: OrderId,
    status: OrderStatus,
    reasons: &[String],
    reservation_id: Option<&str>,
    hold_id: Option<&str>,
) -> Result<Order, ApiError> {
    order::Entity::update_many()
        .col_expr(order::Column::Status, Expr::value(status.code()))
        .col_expr(order::Column::Reasons, Expr::value(reasons.join(",")))
        .col_expr(
            order::Column::HoldId,
            Expr::value(hold_id.map(str::to_owned)),
        )
        .col_expr(
            order::Column::ReservationId,
            Expr::value(reservation_id.map(str::to_owned)),
        )
        .col_expr(order::Column::UpdatedAt, Expr::value(chrono::Utc::now()))
        .filter(order::Column::Id.eq(id.to_string()))
        .filter(order::Column::TenantId.eq(tenant_id))
        .exec_with_returning(conn)
        .await?
        .into_iter()
        .next()
        .map_or_else(|| Err(ApiError::not_found("order", id)), to_domain)
}

/// Marks the order invoiced.
pub async fn record_invoice(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: OrderId,
    invoice_id: &str,
) -> Result<Order, ApiError> {
    order::Entity::update_many()
        .col_expr(
            order::Column::Status,
            Expr::value(OrderStatus::Invoiced.code()),
        )
        .col_expr(
            order::Column::InvoiceId,
            Expr::value(Some(invoice_id.to_owned())),
        )
        .col_expr(order::Column::UpdatedAt, Expr::value(chrono::Utc::now()))
        .filter(order::Column::Id.eq(id.to_string()))
        .filter(order::Column::TenantId.eq(tenant_id))
        .exec(conn)
        .await?;
    get(conn, tenant_id, id).await
}

/// Sets the order's status (cancelled, rejected).
pub async fn set_status(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: OrderId,
    status: OrderStatus,
) -> Result<Order, ApiError> {
    order::Entity::update_many()
        .col_expr(order::Column::Status, Expr::value(status.code()))
        .col_expr(order::Column::UpdatedAt, Expr::value(chrono::Utc::now()))
        .filter(order::Column::Id.eq(id.to_string()))
        .filter(order::Column::TenantId.eq(tenant_id))
        .exec(conn)
        .await?;
    get(conn, tenant_id, id).await
}

/// Sets the order's amount after an approved amendment.
pub async fn set_amount(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    id: OrderId,
    amount: Money,
) -> Result<Order, ApiError> {
    order::Entity::update_many()
        .col_expr(
            order::Column::AmountMinor,
            Expr::value(amount.minor_units()),
        )
        .col_expr(order::Column::UpdatedAt, Expr::value(chrono::Utc::now()))
        .filter(order::Column::Id.eq(id.to_string()))
        .filter(order::Column::TenantId.eq(tenant_id))
        .exec(conn)
        .await?;
    get(conn, tenant_id, id).await
}

/// A customer's orders in `status`.
pub async fn orders_in_status(
    conn: &impl ConnectionTrait,
    tenant_id: &str,
    customer_id: CustomerId,
    status: OrderStatus,
) -> Result<Vec<Order>, ApiError> {
    order::Entity::find()
        .filter(order::Column::TenantId.eq(tenant_id))
        .filter(order::Column::CustomerId.eq(customer_id.to_string()))
        .filter(order::Column::Status.eq(status.code()))
        .all(conn)
        .await?
        .into_iter()
        .map(to_domain)
        .collect()
}

/// Tenants that placed orders (for the periodic reconciliation).
pub async fn tenants(conn: &impl ConnectionTrait) -> Result<Vec<String>, ApiError> {
    use sea_orm::QuerySelect;
    let rows: Vec<String> = order::Entity::find()
        .select_only()
        .column(order::Column::TenantId)
        .distinct()
        .into_tuple()
        .all(conn)
        .await?;
    Ok(rows)
}
