//! Table definitions. Money columns are integer minor units of the
//! invoice currency; quantities and rates are exact decimal text.

pub mod invoice {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "invoices")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        #[sea_orm(indexed)]
        pub customer_id: String,
        /// At most one invoice per order (unique with tenant_id).
        pub order_id: Option<String>,
        pub currency_code: String,
        pub total_minor: i64,
        pub paid_minor: i64,
        /// Credit notes applied to this invoice.
        pub credited_minor: i64,
        pub written_off_minor: i64,
        /// Early-payment discount granted.
        pub discount_taken_minor: i64,
        #[sea_orm(indexed)]
        pub status: String,
        pub issue_date: Date,
        pub due_date: Date,
        /// DUE_ON_RECEIPT, NET or END_OF_MONTH_PLUS.
        pub terms_kind: String,
        pub net_days: i32,
        /// Early-payment discount percentage (exact decimal text), if any.
        pub discount_percent: Option<String>,
        pub discount_days: i32,
        pub created_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod line {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "invoice_lines")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub invoice_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub line_no: i32,
        pub description: String,
        pub quantity: String,
        pub unit_price_minor: i64,
        pub tax_rate_percent: String,
        pub total_minor: i64,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod applied_payment {
    use sea_orm::entity::prelude::*;

    /// The primary key is what makes applying one payment to one invoice
    /// twice impossible.
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "invoice_applied_payments")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub invoice_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub payment_id: String,
        pub tenant_id: String,
        pub amount_minor: i64,
        /// The early-payment discount this payment earned.
        pub discount_minor: i64,
        pub applied_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod credit_note {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "invoice_credit_notes")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        #[sea_orm(indexed)]
        pub customer_id: String,
        pub invoice_id: Option<String>,
        pub currency_code: String,
        pub amount_minor: i64,
        /// What reduced the invoice.
        pub applied_minor: i64,
        /// What became account credit (never lost).
        pub account_credit_minor: i64,
        pub reason: String,
        pub issued_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod credit_balance {
    use sea_orm::entity::prelude::*;

    /// A customer's account credit in one currency: credit notes add,
    /// payouts subtract (never below zero).
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "invoice_account_credit")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub customer_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub currency_code: String,
        pub balance_minor: i64,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod payout {
    use sea_orm::entity::prelude::*;

    /// Account credit paid out (the audit).
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "invoice_credit_payouts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        #[sea_orm(indexed)]
        pub customer_id: String,
        pub currency_code: String,
        pub amount_minor: i64,
        pub reason: String,
        pub actor: String,
        pub paid_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}
