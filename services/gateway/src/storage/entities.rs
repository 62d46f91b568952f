//! Table definitions.

pub mod order {
    use sea_orm::entity::prelude::*;

    /// Orders placed through the gateway: the state of the order-to-cash
    /// workflow. Money is integer minor units.
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "orders")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        /// The key of the PlaceOrder call that created it (the order id is
        /// derived from it and the tenant, so a retried call finds its
        /// order); empty when the order was rebuilt from its credit
        /// decision.
        pub place_key: String,
        #[sea_orm(indexed)]
        pub customer_id: String,
        pub client_reference: String,
        pub currency_code: String,
        pub amount_minor: i64,
        pub status: String,
        /// Reason codes, comma separated.
        pub reasons: String,
        pub reservation_id: Option<String>,
        /// The credit hold while the order is held.
        pub hold_id: Option<String>,
        pub invoice_id: Option<String>,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod api_key {
    use sea_orm::entity::prelude::*;

    /// An API key: only the SHA-256 of its secret is kept.
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "gateway_api_keys")]
    pub struct Model {
        /// UUID v7 (simple form): the public part of the key.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        #[sea_orm(indexed)]
        pub tenant_id: String,
        /// Role codes, comma-separated.
        pub roles: String,
        pub label: String,
        /// Hex SHA-256 of the secret part.
        pub secret_sha256: String,
        pub created_by: String,
        pub created_at: DateTimeUtc,
        /// Revoked, or rotated out after a grace: no use from then on.
        pub expires_at: Option<DateTimeUtc>,
    }

    impl ActiveModelBehavior for ActiveModel {}
}
