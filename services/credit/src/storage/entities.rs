//! Table definitions. Money columns are integer minor units of the
//! account currency (exact on SQLite and PostgreSQL alike).

pub mod account {
    use sea_orm::entity::prelude::*;

    /// One per (tenant_id, customer_id): a unique index enforces it.
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "credit_accounts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        pub customer_id: String,
        pub currency_code: String,
        pub limit_minor: i64,
        // Running sums of the ledger below, kept in the same transaction as
        // every ledger change; `RecomputeExposure` proves they agree.
        pub reserved_minor: i64,
        pub receivable_minor: i64,
        // Bumped by every change: cache entries with a lower version are stale.
        pub version: i64,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod reservation {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "credit_reservations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        #[sea_orm(indexed)]
        pub account_id: String,
        pub customer_id: String,
        pub order_id: String,
        pub amount_minor: i64,
        /// OPEN, CONVERTED or RELEASED; leaves OPEN exactly once.
        pub state: String,
        pub invoice_id: Option<String>,
        pub created_at: DateTimeUtc,
        pub resolved_at: Option<DateTimeUtc>,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod receivable {
    use sea_orm::entity::prelude::*;

    /// One per (tenant_id, invoice_id).
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "credit_receivables")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub invoice_id: String,
        #[sea_orm(indexed)]
        pub account_id: String,
        pub reservation_id: Option<String>,
        pub amount_minor: i64,
        pub open_minor: i64,
        pub created_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod decision {
    use sea_orm::entity::prelude::*;

    /// A documented credit decision: outcome, reasons, inputs, policy.
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "credit_decisions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        #[sea_orm(indexed)]
        pub customer_id: String,
        #[sea_orm(indexed)]
        pub order_id: String,
        pub amount_minor: i64,
        pub currency_code: String,
        pub outcome: String,
        /// Reason codes, comma separated.
        pub reasons: String,
        pub reservation_id: Option<String>,
        // Inputs at decision time (absent without an account).
        pub limit_minor: Option<i64>,
        pub exposure_minor: Option<i64>,
        pub policy_version: String,
        pub created_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod limit_change {
    use sea_orm::entity::prelude::*;

    /// Audit of every limit change.
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "credit_limit_changes")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        #[sea_orm(indexed)]
        pub account_id: String,
        pub before_minor: i64,
        pub after_minor: i64,
        pub reason: String,
        pub created_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}
