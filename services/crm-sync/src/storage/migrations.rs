//! Schema migrations, applied at start on SQLite and PostgreSQL alike.

use sea_orm_migration::prelude::*;

use super::entities::{credit_status, interaction, invoice_record, link, payment_record};

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(o2c_kit::idempotency::Migration),
            Box::new(o2c_kit::outbox::Migration),
            Box::new(CreateCrmTables),
            Box::new(CreateActivityTables),
            Box::new(o2c_kit::outbox::InboxIndex),
            Box::new(o2c_kit::idempotency::KeyFirst),
        ]
    }
}

struct CreateCrmTables;

impl MigrationName for CreateCrmTables {
    fn name(&self) -> &str {
        "m20261204_000001_create_crm_tables"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateCrmTables {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::create_table_for(manager, link::Entity).await?;
        o2c_kit::db::create_table_for(manager, interaction::Entity).await?;
        o2c_kit::db::create_table_for(manager, credit_status::Entity).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::drop_table_for(manager, credit_status::Entity).await?;
        o2c_kit::db::drop_table_for(manager, interaction::Entity).await?;
        o2c_kit::db::drop_table_for(manager, link::Entity).await
    }
}

/// Invoices and payments as CRMs read them.
struct CreateActivityTables;

impl MigrationName for CreateActivityTables {
    fn name(&self) -> &str {
        "m20261205_000003_create_activity_tables"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateActivityTables {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::create_table_for(manager, invoice_record::Entity).await?;
        o2c_kit::db::create_table_for(manager, payment_record::Entity).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::drop_table_for(manager, payment_record::Entity).await?;
        o2c_kit::db::drop_table_for(manager, invoice_record::Entity).await
    }
}
