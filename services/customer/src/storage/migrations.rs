//! Schema migrations, applied at start on SQLite and PostgreSQL alike.

use sea_orm_migration::prelude::*;

use super::entities::{customer, external_id};

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(o2c_kit::idempotency::Migration),
            Box::new(CreateCustomers),
            Box::new(o2c_kit::outbox::Migration),
            Box::new(o2c_kit::outbox::InboxIndex),
            Box::new(o2c_kit::idempotency::KeyFirst),
        ]
    }
}

struct CreateCustomers;

impl MigrationName for CreateCustomers {
    fn name(&self) -> &str {
        "m20261204_000001_create_customers"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateCustomers {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::create_table_for(manager, customer::Entity).await?;
        o2c_kit::db::create_table_for(manager, external_id::Entity).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::drop_table_for(manager, external_id::Entity).await?;
        o2c_kit::db::drop_table_for(manager, customer::Entity).await
    }
}
