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
        /// The key of the PlaceOrder call that created it (unique per
        /// tenant), so a retried call finds its order instead of making a
        /// second one.
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
