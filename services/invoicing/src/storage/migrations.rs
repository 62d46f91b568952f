//! Schema migrations, applied at start on SQLite and PostgreSQL alike.

use sea_orm_migration::prelude::*;

use super::entities::{applied_payment, credit_balance, credit_note, invoice, line, payout};

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(o2c_kit::idempotency::Migration),
            Box::new(CreateInvoices),
            Box::new(o2c_kit::outbox::Migration),
            Box::new(AppliedPaymentDiscount),
            Box::new(o2c_kit::outbox::InboxIndex),
            Box::new(o2c_kit::idempotency::KeyFirst),
        ]
    }
}

struct CreateInvoices;

impl MigrationName for CreateInvoices {
    fn name(&self) -> &str {
        "m20261204_000001_create_invoices"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateInvoices {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::create_table_for(manager, invoice::Entity).await?;
        o2c_kit::db::create_table_for(manager, line::Entity).await?;
        o2c_kit::db::create_table_for(manager, applied_payment::Entity).await?;
        o2c_kit::db::create_table_for(manager, credit_note::Entity).await?;
        o2c_kit::db::create_table_for(manager, credit_balance::Entity).await?;
        o2c_kit::db::create_table_for(manager, payout::Entity).await?;
        // One invoice per order (NULL order ids, standalone invoices, are
        // distinct on both databases).
        manager
            .create_index(
                Index::create()
                    .name("ux_invoices_tenant_order")
                    .table(invoice::Entity)
                    .col(invoice::Column::TenantId)
                    .col(invoice::Column::OrderId)
                    .unique()
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::drop_table_for(manager, payout::Entity).await?;
        o2c_kit::db::drop_table_for(manager, credit_balance::Entity).await?;
        o2c_kit::db::drop_table_for(manager, credit_note::Entity).await?;
        o2c_kit::db::drop_table_for(manager, applied_payment::Entity).await?;
        o2c_kit::db::drop_table_for(manager, line::Entity).await?;
        o2c_kit::db::drop_table_for(manager, invoice::Entity).await
    }
}

/// Each applied payment keeps the discount it earned, so a repeated
/// application answers exactly what the first did.
struct AppliedPaymentDiscount;

impl MigrationName for AppliedPaymentDiscount {
    fn name(&self) -> &str {
        "m20261205_000003_applied_payment_discount"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for AppliedPaymentDiscount {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::add_column_if_missing(
            manager,
            applied_payment::Entity,
            applied_payment::Column::DiscountMinor,
            ColumnDef::new(applied_payment::Column::DiscountMinor)
                .big_integer()
                .not_null()
                .default(0)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::drop_column_for(
            manager,
            applied_payment::Entity,
            applied_payment::Column::DiscountMinor,
        )
        .await
    }
}
