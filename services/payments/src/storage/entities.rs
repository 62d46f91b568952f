//! Table definitions. Money columns are integer minor units.

pub mod payment {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "payments")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        #[sea_orm(indexed)]
        pub customer_id: String,
        pub currency_code: String,
        pub amount_minor: i64,
        // What no invoice took: account credit, never dropped.
        pub unapplied_minor: i64,
        /// BANK_TRANSFER, CARD or DIRECT_DEBIT.
        pub method: String,
        pub reference: String,
        pub received_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod allocation {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "payment_allocations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub payment_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub invoice_id: String,
        pub amount_minor: i64,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod refund {
    use sea_orm::entity::prelude::*;

    /// Money paid back from a payment's unapplied cash (the audit).
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "payment_refunds")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        #[sea_orm(indexed)]
        pub payment_id: String,
        pub tenant_id: String,
        pub amount_minor: i64,
        pub reason: String,
        pub actor: String,
        pub refunded_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}
