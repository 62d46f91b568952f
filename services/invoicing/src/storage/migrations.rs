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
