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
        /// The group (parent) account; one level deep.
        #[sea_orm(indexed)]
        pub parent_account_id: Option<String>,
        pub limit_minor: i64,
        /// MANUAL or CALCULATED.
        pub limit_source: String,
        pub limit_valid_until: Option<Date>,
        pub next_review_date: Option<Date>,
        // Running sums of the ledger below, kept in the same transaction as
        // every ledger change; `RecomputeExposure` proves they agree.
        pub reserved_minor: i64,
        pub receivable_minor: i64,
        /// Own exposure plus, for a parent, every child's: what the
        /// parent's limit caps for the group.
        pub group_exposure_minor: i64,
        pub blocked: bool,
        pub max_order_minor: Option<i64>,
        pub risk_class: Option<String>,
        /// The valid-until date an expiry alert was raised for.
        pub expiry_alerted_for: Option<Date>,
        /// The review date a review alert was raised for.
        pub review_alerted_for: Option<Date>,
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
        /// OPEN, CONVERTED, RELEASED or EXPIRED; leaves OPEN exactly once.
        /// Its index (made by the first migration, as it always was) is
        /// replaced by one on (state, expires_at), for the expiry sweep
        /// (`migrations::SweepIndex`).
        #[sea_orm(indexed)]
        pub state: String,
        pub invoice_id: Option<String>,
        pub created_at: DateTimeUtc,
        /// An OPEN reservation past this is released by the sweeper.
        pub expires_at: DateTimeUtc,
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
        pub due_date: Option<Date>,
        /// The dunning level last reached (0: none), so each level is
        /// announced once.
        pub dunning_level: i32,
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
        /// The client's reference for the order (empty when none, and on
        /// re-checks and amendments).
        pub client_reference: String,
        pub amount_minor: i64,
        pub currency_code: String,
        pub outcome: String,
        /// Reason codes, comma separated.
        pub reasons: String,
        pub reservation_id: Option<String>,
        pub hold_id: Option<String>,
        /// The inputs, as JSON: exposure, controls, group, overdue.
        #[sea_orm(column_type = "Text")]
        pub inputs_json: String,
        pub policy_version: String,
        pub created_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod hold {
    use sea_orm::entity::prelude::*;

    /// A held order waiting for an analyst.
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "credit_holds")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        #[sea_orm(indexed)]
        pub account_id: String,
        pub customer_id: String,
        pub order_id: String,
        pub amount_minor: i64,
        pub reasons: String,
        /// OPEN, RELEASED or REJECTED.
        #[sea_orm(indexed)]
        pub state: String,
        pub created_at: DateTimeUtc,
        pub resolved_at: Option<DateTimeUtc>,
        pub resolved_by: Option<String>,
        pub resolution_reason: Option<String>,
        pub reservation_id: Option<String>,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod checked_order {
    use sea_orm::entity::prelude::*;

    /// An order checked into a reservation or a hold: one row per order,
    /// whichever replica and path checked it, so the database refuses a
    /// second first check of an order even when two transactions decided
    /// it at once (their reservation and hold are in different tables).
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "credit_checked_orders")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub tenant_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub order_id: String,
        pub created_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod limit_change {
    use sea_orm::entity::prelude::*;

    /// Audit of every limit change, and pending changes awaiting approval.
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "credit_limit_changes")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub tenant_id: String,
        #[sea_orm(indexed)]
        pub account_id: String,
        pub customer_id: String,
        /// APPLIED, PENDING_APPROVAL or REJECTED.
        pub status: String,
        pub before_minor: i64,
        pub after_minor: i64,
        pub source: String,
        pub valid_until: Option<Date>,
        pub next_review_date: Option<Date>,
        pub reason: String,
        pub requested_by: String,
        pub requested_at: DateTimeUtc,
        pub decided_by: Option<String>,
        pub decided_at: Option<DateTimeUtc>,
        pub decision_reason: Option<String>,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod alert {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "credit_alerts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        #[sea_orm(indexed)]
        pub tenant_id: String,
        pub customer_id: String,
        pub kind: String,
        pub threshold_percent: i32,
        pub message: String,
        pub order_id: Option<String>,
        pub raised_at: DateTimeUtc,
        pub acknowledged_by: Option<String>,
        pub acknowledged_at: Option<DateTimeUtc>,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod risk_facts {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "credit_risk_facts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub account_id: String,
        pub relationship_since: Option<Date>,
        pub annual_volume_minor: i64,
        pub disputes: i32,
        pub write_offs: i32,
        pub broken_promises: i32,
        pub updated_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod payment_behaviour {
    use sea_orm::entity::prelude::*;

    /// How one invoice was paid; one row per invoice.
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "credit_payment_behaviour")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub account_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub invoice_id: String,
        pub days_to_pay: i32,
        pub days_beyond_terms: i32,
        pub recorded_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod risk_score {
    use sea_orm::entity::prelude::*;

    /// A stored score with its inputs and factors, so it can be explained
    /// and replayed.
    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "credit_risk_scores")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        #[sea_orm(indexed)]
        pub account_id: String,
        pub score: i32,
        pub risk_class: String,
        pub calculated_limit_minor: i64,
        #[sea_orm(column_type = "Text")]
        pub inputs_json: String,
        #[sea_orm(column_type = "Text")]
        pub factors_json: String,
        pub policy_version: String,
        pub scored_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}
