//! Schema migrations, applied at start on SQLite and PostgreSQL alike.

use sea_orm_migration::prelude::*;

use super::entities::{
    account, alert, checked_order, decision, hold, limit_change, payment_behaviour, receivable,
    reservation, risk_facts, risk_score,
};

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(o2c_kit::idempotency::Migration),
            Box::new(o2c_kit::outbox::Migration),
            Box::new(CreateLedger),
            Box::new(o2c_kit::outbox::InboxIndex),
            Box::new(DecisionReference),
            Box::new(CheckedOrders),
            Box::new(o2c_kit::idempotency::KeyFirst),
            Box::new(SelectiveFirst),
            Box::new(SweepIndex),
        ]
    }
}

struct CreateLedger;

impl MigrationName for CreateLedger {
    fn name(&self) -> &str {
        "m20261204_000001_create_credit_ledger"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateLedger {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::create_table_for(manager, account::Entity).await?;
        o2c_kit::db::create_table_for(manager, reservation::Entity).await?;
        o2c_kit::db::create_table_for(manager, receivable::Entity).await?;
        o2c_kit::db::create_table_for(manager, decision::Entity).await?;
        o2c_kit::db::create_table_for(manager, limit_change::Entity).await?;
        o2c_kit::db::create_table_for(manager, hold::Entity).await?;
        o2c_kit::db::create_table_for(manager, alert::Entity).await?;
        o2c_kit::db::create_table_for(manager, risk_facts::Entity).await?;
        o2c_kit::db::create_table_for(manager, payment_behaviour::Entity).await?;
        o2c_kit::db::create_table_for(manager, risk_score::Entity).await?;
        // One credit account per customer per tenant.
        manager
            .create_index(
                Index::create()
                    .name("ux_credit_accounts_tenant_customer")
                    .table(account::Entity)
                    .col(account::Column::TenantId)
                    .col(account::Column::CustomerId)
                    .unique()
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        // One reservation per order: a second check of the same order
        // cannot reserve twice.
        manager
            .create_index(
                Index::create()
                    .name("ux_credit_reservations_tenant_order")
                    .table(reservation::Entity)
                    .col(reservation::Column::TenantId)
                    .col(reservation::Column::OrderId)
                    .unique()
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        // One hold per order.
        manager
            .create_index(
                Index::create()
                    .name("ux_credit_holds_tenant_order")
                    .table(hold::Entity)
                    .col(hold::Column::TenantId)
                    .col(hold::Column::OrderId)
                    .unique()
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::drop_table_for(manager, risk_score::Entity).await?;
        o2c_kit::db::drop_table_for(manager, payment_behaviour::Entity).await?;
        o2c_kit::db::drop_table_for(manager, risk_facts::Entity).await?;
        o2c_kit::db::drop_table_for(manager, alert::Entity).await?;
        o2c_kit::db::drop_table_for(manager, hold::Entity).await?;
        o2c_kit::db::drop_table_for(manager, limit_change::Entity).await?;
        o2c_kit::db::drop_table_for(manager, decision::Entity).await?;
        o2c_kit::db::drop_table_for(manager, receivable::Entity).await?;
        o2c_kit::db::drop_table_for(manager, reservation::Entity).await?;
        o2c_kit::db::drop_table_for(manager, account::Entity).await
    }
}

/// Decisions keep the client's reference of the order, so the gateway can
/// rebuild an order from its decision alone.
struct DecisionReference;

impl MigrationName for DecisionReference {
    fn name(&self) -> &str {
        "m20261205_000001_credit_decision_client_reference"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for DecisionReference {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::add_column_if_missing(
            manager,
            decision::Entity,
            decision::Column::ClientReference,
            ColumnDef::new(decision::Column::ClientReference)
                .string()
                .not_null()
                .default("")
                .to_owned(),
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::drop_column_for(manager, decision::Entity, decision::Column::ClientReference)
            .await
    }
}

/// One row per checked order (`entities::checked_order`), filled from the
/// reservations and holds already there.
struct CheckedOrders;

impl MigrationName for CheckedOrders {
    fn name(&self) -> &str {
        "m20261205_000002_credit_checked_orders"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CheckedOrders {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::create_table_for(manager, checked_order::Entity).await?;
        // An order released from its hold into a reservation has both: one
        // row, from the earlier.
        let checked = |table: &str| format!("SELECT tenant_id, order_id, created_at FROM {table}");
        manager
            .get_connection()
            .execute_unprepared(&format!(
                "INSERT INTO credit_checked_orders (tenant_id, order_id, created_at) \
                 SELECT tenant_id, order_id, MIN(created_at) FROM ({} UNION ALL {}) AS checked \
                 WHERE NOT EXISTS (SELECT 1 FROM credit_checked_orders c \
                   WHERE c.tenant_id = checked.tenant_id AND c.order_id = checked.order_id) \
                 GROUP BY tenant_id, order_id",
                checked("credit_reservations"),
                checked("credit_holds"),
            ))
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::drop_table_for(manager, checked_order::Entity).await
    }
}

/// The unique indexes that lookups search by a few ids of one tenant
/// ((customer, tenant) of accounts, (order, tenant) of reservations and of
/// holds) put the id first. With the tenant first, statistics taken while a
/// tenant was new had the planner search by tenant alone and filter every
/// row of it, a cost that grew with the tenant until the table was next
/// analyzed; with the id first the index is searched by the ids, whatever
/// the statistics say. Uniqueness is the same.
struct SelectiveFirst;

impl MigrationName for SelectiveFirst {
    fn name(&self) -> &str {
        "m20261205_000011_credit_selective_first"
    }
}

impl SelectiveFirst {
    /// Each index with the given column order (its id first when `up`).
    async fn recreate(manager: &SchemaManager<'_>, up: bool) -> Result<(), DbErr> {
        let indexes: [(&str, sea_orm::DynIden, sea_orm::DynIden, sea_orm::DynIden); 3] = [
            (
                "ux_credit_accounts_tenant_customer",
                account::Entity.into_iden(),
                account::Column::CustomerId.into_iden(),
                account::Column::TenantId.into_iden(),
            ),
            (
                "ux_credit_reservations_tenant_order",
                reservation::Entity.into_iden(),
                reservation::Column::OrderId.into_iden(),
                reservation::Column::TenantId.into_iden(),
            ),
            (
                "ux_credit_holds_tenant_order",
                hold::Entity.into_iden(),
                hold::Column::OrderId.into_iden(),
                hold::Column::TenantId.into_iden(),
            ),
        ];
        for (name, table, id, tenant) in indexes {
            let (first, second) = if up { (id, tenant) } else { (tenant, id) };
            manager
                .drop_index(Index::drop().name(name).table(table.clone()).to_owned())
                .await?;
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(table)
                        .col(first)
                        .col(second)
                        .unique()
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl MigrationTrait for SelectiveFirst {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        Self::recreate(manager, true).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        Self::recreate(manager, false).await
    }
}

/// The expiry sweep (`storage::expired_reservations`) asks for the open
/// reservations past their expiry, oldest first, a page at a time. With an
/// index on the state alone, every pass read and sorted every open
/// reservation; on (state, expires_at) it reads the page it takes. The
/// state-only index is replaced: every other query of reservations by
/// state also names the account, the order or the id, and a lookup by
/// state alone can use the new index's first column.
///
/// On PostgreSQL the migration builds the index while it holds the table
/// against writes: on a large table, build it by hand first
/// (`CREATE INDEX CONCURRENTLY IF NOT EXISTS
/// "idx-credit_reservations-state-expires_at" ON credit_reservations
/// (state, expires_at)`, then `DROP INDEX CONCURRENTLY IF EXISTS
/// "idx-credit_reservations-state"`), and the migration finds nothing
/// left to do.
struct SweepIndex;

/// The index the entity's `indexed` state makes in the first migration.
pub const STATE_INDEX: &str = "idx-credit_reservations-state";
/// Its replacement.
pub const SWEEP_INDEX: &str = "idx-credit_reservations-state-expires_at";

impl MigrationName for SweepIndex {
    fn name(&self) -> &str {
        "m20261206_000012_credit_reservation_sweep_index"
    }
}

impl SweepIndex {
    /// Makes the index `made` on `columns` (unless there), then drops the
    /// index `dropped` (if there): up one way, down the other.
    async fn swap(
        manager: &SchemaManager<'_>,
        made: &str,
        columns: &[reservation::Column],
        dropped: &str,
    ) -> Result<(), DbErr> {
        let mut index = Index::create();
        index.name(made).table(reservation::Entity).if_not_exists();
        for column in columns {
            index.col(*column);
        }
        manager.create_index(index.to_owned()).await?;
        manager
            .drop_index(
                Index::drop()
                    .name(dropped)
                    .table(reservation::Entity)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}

#[async_trait::async_trait]
impl MigrationTrait for SweepIndex {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use reservation::Column::{ExpiresAt, State};
        Self::swap(manager, SWEEP_INDEX, &[State, ExpiresAt], STATE_INDEX).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        Self::swap(
            manager,
            STATE_INDEX,
            &[reservation::Column::State],
            SWEEP_INDEX,
        )
        .await
    }
}
