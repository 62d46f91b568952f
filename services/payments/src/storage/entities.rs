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

pub mod mandate {
    use sea_orm::entity::prelude::*;

    /// A customer's agreed mandate. The instrument is a processor token
    /// and its last four digits, never a card number.
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "payment_mandates")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        #[sea_orm(indexed)]
        pub customer_id: String,
        pub method: String,
        pub processor_token: String,
        pub last4: String,
        pub currency_code: String,
        /// ACTIVE or REVOKED.
        pub status: String,
        pub created_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod session {
    use sea_orm::entity::prelude::*;

    /// One collection of one invoice: scheduled → attempts → succeeded or
    /// failed. Unique per (tenant, invoice).
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "payment_sessions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        #[sea_orm(indexed)]
        pub customer_id: String,
        pub mandate_id: String,
        pub invoice_id: String,
        pub currency_code: String,
        pub amount_minor: i64,
        /// SCHEDULED, RETRYING, COLLECTED, SUCCEEDED or FAILED.
        #[sea_orm(indexed)]
        pub state: String,
        pub scheduled_for: Date,
        pub next_attempt_at: Option<DateTimeUtc>,
        pub attempts: i32,
        pub payment_id: Option<String>,
        pub last_failure: Option<String>,
        /// Whether the final failure was reported to credit (an alert).
        pub failure_reported: bool,
        pub created_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod attempt {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "payment_attempts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub session_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub number: i32,
        pub attempted_at: DateTimeUtc,
        pub succeeded: bool,
        pub failure_reason: Option<String>,
    }

    impl ActiveModelBehavior for ActiveModel {}
}
