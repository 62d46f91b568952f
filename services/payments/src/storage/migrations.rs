//! Schema migrations, applied at start on SQLite and PostgreSQL alike.

use sea_orm_migration::prelude::*;

use super::entities::{allocation, attempt, mandate, payment, refund, session};

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(o2c_kit::idempotency::Migration),
            Box::new(CreatePayments),
            Box::new(o2c_kit::outbox::Migration),
            Box::new(o2c_kit::outbox::InboxIndex),
            Box::new(o2c_kit::idempotency::KeyFirst),
        ]
    }
}

struct CreatePayments;

impl MigrationName for CreatePayments {
    fn name(&self) -> &str {
        "m20261204_000001_create_payments"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreatePayments {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::create_table_for(manager, payment::Entity).await?;
        o2c_kit::db::create_table_for(manager, allocation::Entity).await?;
        o2c_kit::db::create_table_for(manager, refund::Entity).await?;
        o2c_kit::db::create_table_for(manager, mandate::Entity).await?;
        o2c_kit::db::create_table_for(manager, session::Entity).await?;
        o2c_kit::db::create_table_for(manager, attempt::Entity).await?;
        // One collection per invoice.
        manager
            .create_index(
                Index::create()
                    .name("ux_payment_sessions_tenant_invoice")
                    .table(session::Entity)
                    .col(session::Column::TenantId)
                    .col(session::Column::InvoiceId)
                    .unique()
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::drop_table_for(manager, attempt::Entity).await?;
        o2c_kit::db::drop_table_for(manager, session::Entity).await?;
        o2c_kit::db::drop_table_for(manager, mandate::Entity).await?;
        o2c_kit::db::drop_table_for(manager, refund::Entity).await?;
        o2c_kit::db::drop_table_for(manager, allocation::Entity).await?;
        o2c_kit::db::drop_table_for(manager, payment::Entity).await
    }
}
