//! Schema migrations, applied at start on SQLite and PostgreSQL alike.

use sea_orm_migration::prelude::*;

use super::entities::{api_key, order};

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(o2c_kit::idempotency::Migration),
            Box::new(CreateOrders),
            Box::new(CreateApiKeys),
            Box::new(PlaceKeyNotUnique),
            Box::new(o2c_kit::idempotency::KeyFirst),
        ]
    }
}

struct CreateOrders;

/// One order per PlaceOrder key and tenant: created with the table, dropped
/// since order ids are derived from the key ([`PlaceKeyNotUnique`]).
fn place_key_index() -> IndexCreateStatement {
    Index::create()
        .name("ux_orders_tenant_place_key")
        .table(order::Entity)
        .col(order::Column::TenantId)
        .col(order::Column::PlaceKey)
        .unique()
        .if_not_exists()
        .to_owned()
}

impl MigrationName for CreateOrders {
    fn name(&self) -> &str {
        "m20261204_000001_create_orders"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateOrders {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::create_table_for(manager, order::Entity).await?;
        manager.create_index(place_key_index()).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::drop_table_for(manager, order::Entity).await
    }
}

struct CreateApiKeys;

impl MigrationName for CreateApiKeys {
    fn name(&self) -> &str {
        "m20261205_000002_create_api_keys"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateApiKeys {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::create_table_for(manager, api_key::Entity).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        o2c_kit::db::drop_table_for(manager, api_key::Entity).await
    }
}

/// Order ids are derived from the tenant and the PlaceOrder key, so the id
/// keeps a key to one order; an order rebuilt from its credit decision has
/// no key to keep (see `storage::journal`).
struct PlaceKeyNotUnique;

impl MigrationName for PlaceKeyNotUnique {
    fn name(&self) -> &str {
        "m20261205_000003_orders_place_key_not_unique"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for PlaceKeyNotUnique {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("ux_orders_tenant_place_key")
                    .table(order::Entity)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.create_index(place_key_index()).await
    }
}
