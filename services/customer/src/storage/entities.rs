//! Table definitions.

pub mod customer {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "customers")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        #[sea_orm(indexed)]
        pub tenant_id: String,
        pub legal_name: String,
        pub country_code: String,
        pub currency_code: String,
        // Contacts are read and written with the customer, never queried
        // on their own: a JSON document keeps them in one row.
        #[sea_orm(column_type = "Text")]
        pub contacts_json: String,
        pub credit_account_id: Option<String>,
        pub agency: Option<String>,
        pub reference_last4: Option<String>,
        // Tenant-salted SHA-256 of the agency reference; the reference
        // itself is never stored.
        pub reference_sha256: Option<String>,
        pub linked_at: Option<DateTimeUtc>,
        pub created_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod external_id {
    use sea_orm::entity::prelude::*;

    /// One id per (tenant, system, value): a CRM's id names one customer.
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "customer_external_ids")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub system: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub value: String,
        #[sea_orm(indexed)]
        pub customer_id: String,
    }

    impl ActiveModelBehavior for ActiveModel {}
}
