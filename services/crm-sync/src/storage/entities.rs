//! Table definitions.

pub mod link {
    use sea_orm::entity::prelude::*;

    /// Which customer a CRM's record maps to.
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "crm_links")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub crm_system: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub external_id: String,
        pub customer_id: String,
        pub linked_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod interaction {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "crm_interactions")]
    pub struct Model {
        /// UUID v7: ordering by id is ordering by recording time.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        #[sea_orm(indexed)]
        pub customer_id: String,
        pub crm_system: String,
        pub kind: String,
        #[sea_orm(column_type = "Text")]
        pub summary: String,
        pub occurred_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod credit_status {
    use sea_orm::entity::prelude::*;

    /// The latest credit status per customer, from credit's events.
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "crm_credit_status")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub customer_id: String,
        pub currency_code: String,
        pub credit_limit: String,
        pub reserved: String,
        pub receivables: String,
        pub available: String,
        /// Credit's account version: only a higher one replaces the row.
        pub version: i64,
        pub updated_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod invoice_record {
    use sea_orm::entity::prelude::*;

    /// The latest state of each invoice, from invoicing's events.
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "crm_invoices")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        /// UUID v7: ordering by id is ordering by issue.
        #[sea_orm(primary_key, auto_increment = false)]
        pub invoice_id: String,
        #[sea_orm(indexed)]
        pub customer_id: String,
        /// The encoded `o2c.crm_sync.v1.InvoiceRecord`.
        pub record: Vec<u8>,
        pub updated_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod payment_record {
    use sea_orm::entity::prelude::*;

    /// The latest state of each payment, from payments' events.
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "crm_payments")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        /// UUID v7: ordering by id is ordering by receipt.
        #[sea_orm(primary_key, auto_increment = false)]
        pub payment_id: String,
        #[sea_orm(indexed)]
        pub customer_id: String,
        /// The encoded `o2c.crm_sync.v1.PaymentRecord`.
        pub record: Vec<u8>,
        pub updated_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}
