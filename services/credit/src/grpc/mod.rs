//! The gRPC face of the credit service: the only module that knows prost
//! types. Each mutation is validated, runs idempotently in one database
//! transaction, and only after commit refreshes the exposure cache and
//! publishes its alerts.

mod batch;

pub use batch::{Batcher, Timings};
mod convert;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use o2c_kit::fields::{self, Violations};
use o2c_kit::idempotency::{self, Begun};
use o2c_kit::{ApiError, proto_money};
use o2c_money::ids::{CustomerId, InvoiceId, ReservationId};
use o2c_money::{Currency, Money};
use o2c_proto::credit::v1 as pb;
use o2c_proto::credit::v1::credit_service_server::CreditService;
use o2c_proto::events::v1 as events_pb;
use o2c_proto::invoicing::v1 as invoicing_pb;
use prost::Message;
use sea_orm::{DatabaseConnection, DatabaseTransaction, TransactionTrait};
use tokio::sync::broadcast;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::domain::{self, CreditError, Exposure, Outcome, Policy};
use crate::storage::check::{self, Checked, Context};
use crate::storage::risk::MaintainedFacts;
use crate::storage::{self, Account, Alert, AlertKind, LimitUpdate, cache::ExposureCache};

/// Longest order id accepted from callers.
pub const MAX_ORDER_ID_LENGTH: usize = 100;
/// Most checks one CheckAndReserveMany call may carry: one batch's.
pub const MAX_BATCHED_CHECKS: usize = batch::MAX_BATCH;
/// Longest client reference of an order.
pub const MAX_CLIENT_REFERENCE_LENGTH: usize = 100;
/// Longest reason text on limit changes, holds and releases.
pub const MAX_REASON_LENGTH: usize = 500;
/// Longest actor (user id).
pub const MAX_ACTOR_LENGTH: usize = 100;
/// Alerts buffered for live streams by default; a consumer further behind
/// skips ahead and is told how many it missed.
pub const DEFAULT_ALERT_STREAM_BUFFER: usize = 1_024;

pub use o2c_kit::clock::{Clock, system_clock};

/// The credit policy and operating limits, validated at start.
#[derive(Clone)]
pub struct Config {
    pub policy: Policy,
    pub reservation_ttl: chrono::Duration,
    /// Largest limit an actor may set without a second user, per
    /// currency; raises in other currencies always need one.
    pub authority: o2c_kit::settings::CurrencyLimits,
    /// Batches of credit checks a tenant may have deciding at once (on
    /// PostgreSQL; one on SQLite).
    pub check_lanes: usize,
    pub clock: Clock,
}

/// Batches of credit checks a tenant has deciding at once by default. On
/// the benchmark's two cores one lane decided the most orders: two and four
/// made smaller batches whose extra statements and commits cost more than
/// deciding side by side gained (docs/benchmarks.md).
pub const DEFAULT_CHECK_LANES: usize = 1;

/// Fans alerts out to live streams without ever waiting for them.
#[derive(Clone)]
pub struct AlertHub {
    sender: broadcast::Sender<Alert>,
}

impl AlertHub {
    /// A hub buffering `capacity` alerts per live stream.
    pub fn new(capacity: usize) -> Self {
        Self {
            sender: broadcast::channel(capacity.max(1)).0,
        }
    }

    /// Publishes committed alerts; with no listener they are simply not
    /// streamed (they stay listable).
    pub fn publish(&self, alerts: impl IntoIterator<Item = Alert>) {
        for alert in alerts {
            let _ = self.sender.send(alert);
        }
    }
}

/// Serves `o2c.credit.v1.CreditService`.
#[derive(Clone)]
pub struct CreditApi {
    db: DatabaseConnection,
    /// Where a set-wise batch reads and writes: on PostgreSQL a pool whose
    /// sessions keep each statement's first plan
    /// (`o2c_kit::db::connect_fixed_plans`), else `db`.
    batch_db: DatabaseConnection,
    cache: ExposureCache,
    config: Arc<Config>,
    alerts: AlertHub,
    /// Who gets an `ExposureChanged` event for every change.
    subscribers: Arc<Vec<String>>,
    /// Credit checks waiting for their tenant's running batch.
    batcher: Arc<batch::Batcher>,
}

impl CreditApi {
    pub fn new(
        db: DatabaseConnection,
        batch_db: Option<DatabaseConnection>,
        cache: ExposureCache,
        config: Config,
        alerts: AlertHub,
        subscribers: Vec<String>,
    ) -> Self {
        // SQLite writes one transaction at a time: lanes would only wait.
        let lanes = match db.get_database_backend() {
            sea_orm::DbBackend::Sqlite => 1,
            _ => config.check_lanes,
        };
        Self {
            batch_db: batch_db.unwrap_or_else(|| db.clone()),
            db,
            cache,
            config: Arc::new(config),
            alerts,
            subscribers: Arc::new(subscribers),
            batcher: Arc::new(batch::Batcher::new(lanes)),
        }
    }

    /// The batches credit checks are decided in.
    pub fn batches(&self) -> Arc<Batcher> {
        Arc::clone(&self.batcher)
    }

    /// Records `ExposureChanged` for each exposure in the transaction of
    /// the change.
    async fn record_exposures(
        &self,
        conn: &impl sea_orm::ConnectionTrait,
        tenant: &str,
        exposures: &[Exposure],
    ) -> Result<(), ApiError> {
        let events = Self::exposure_events(tenant, exposures)?;
        o2c_kit::outbox::record_all(conn, &self.subscribers, events, self.now()).await
    }

    /// An `ExposureChanged` event for each of `exposures`.
    fn exposure_events(
        tenant: &str,
        exposures: &[Exposure],
    ) -> Result<Vec<o2c_proto::events::v1::Event>, ApiError> {
        let mut events = Vec::with_capacity(exposures.len());
        for exposure in exposures {
            events.push(o2c_proto::events::v1::Event {
                tenant_id: tenant.to_owned(),
                aggregate_type: "credit_account".into(),
                aggregate_id: exposure.customer_id.to_string(),
                body: Some(o2c_proto::events::v1::event::Body::ExposureChanged(
                    o2c_proto::events::v1::ExposureChanged {
                        customer_id: exposure.customer_id.to_string(),
                        credit_limit: Some(convert::money(exposure, exposure.limit_minor)?),
                        reserved: Some(convert::money(exposure, exposure.reserved_minor)?),
                        receivables: Some(convert::money(exposure, exposure.receivable_minor)?),
                        available: Some(convert::money(exposure, exposure.available_minor())?),
                        version: exposure.version,
                    },
                )),
                ..Default::default()
            });
        }
        Ok(events)
    }

    /// Applies an invoice snapshot in `txn` (the RPC and the event share
    /// this): `None` when the customer has no credit account, so there is
    /// nothing to track.
    /// `as_of` is when invoicing made the change (the event's time; now for
    /// the RPC): a payment fact is measured to then, not to a late delivery.
    async fn sync_in(
        &self,
        txn: &DatabaseTransaction,
        tenant: &str,
        invoice: &SnapshotOf,
        as_of: DateTime<Utc>,
    ) -> Result<Option<SyncedInvoice>, ApiError> {
        let Some(account) = storage::find_account(txn, tenant, invoice.customer_id).await? else {
            return Ok(None);
        };
        same_currency("invoice.total", &invoice.total, &account)?;
        let now = self.now();
        let before = account.exposure;
        let synced = storage::sync_receivable(txn, &account, &invoice.state, now).await?;
        if !synced.changed {
            return Ok(Some(SyncedInvoice {
                account: synced.account,
                converted: None,
                exposures: Vec::new(),
                alerts: Vec::new(),
            }));
        }
        if invoice.paid && invoice.state.open_minor == 0 {
            // Paid in full just now (the open amount only falls, so this
            // happens once): a payment fact; the customer is re-scored.
            let today = as_of.min(now).date_naive();
            let days = |from: Option<chrono::NaiveDate>| {
                from.map(|d| i32::try_from((today - d).num_days()).unwrap_or(i32::MAX))
            };
            if let (Some(to_pay), Some(beyond)) =
                (days(invoice.issue_date), days(invoice.state.due_date))
            {
                storage::risk::record_behaviour(
                    txn,
                    &synced.account,
                    &invoice.state.invoice_id,
                    to_pay.clamp(0, 3_650),
                    beyond.clamp(-3_650, 3_650),
                    now,
                )
                .await?;
                storage::risk::score_and_store(txn, &synced.account, now).await?;
            }
        }
        let alerts =
            check::alerts_after_change(txn, &self.context(now), &synced.account, &before).await?;
        let exposures = self.touched(txn, &synced.account).await?;
        self.record_exposures(txn, tenant, &exposures).await?;
        Ok(Some(SyncedInvoice {
            account: synced.account,
            converted: synced.converted,
            exposures,
            alerts,
        }))
    }

    /// After a sync committed: refreshes the cache and publishes alerts.
    async fn after_sync(&self, tenant: &str, synced: SyncedInvoice) {
        for exposure in &synced.exposures {
            self.cache.put(tenant, exposure).await;
            if let Some(percent) = exposure.utilisation_percent() {
                o2c_kit::metrics::exposure_utilisation(percent);
            }
        }
        self.alerts.publish(synced.alerts);
    }

    fn now(&self) -> DateTime<Utc> {
        (self.config.clock)()
    }

    fn context(&self, now: DateTime<Utc>) -> Context<'_> {
        Context {
            policy: &self.config.policy,
            now,
            reservation_ttl: self.config.reservation_ttl,
        }
    }

    fn authority(&self, currency: Currency) -> Option<i64> {
        self.config.authority.get(currency)
    }

    async fn begin<R: Message + Default>(
        &self,
        scope: &str,
        key: &str,
        bytes: &[u8],
    ) -> Result<Begun<R>, ApiError> {
        idempotency::begin(&self.db, scope, key, bytes).await
    }

    /// Commits `txn` with the response, then refreshes the cache with
    /// `exposures` and publishes `alerts`.
    // The idempotency record (scope, key, request) travels as three values
    // because that is how `kit::idempotency` takes it.
    #[allow(clippy::too_many_arguments)]
    async fn finish<R: Message + Default>(
        &self,
        txn: DatabaseTransaction,
        scope: &str,
        key: &str,
        bytes: &[u8],
        response: R,
        tenant: &str,
        exposures: &[Exposure],
        alerts: Vec<Alert>,
    ) -> Result<Response<R>, Status> {
        self.record_exposures(&txn, tenant, exposures).await?;
        let response = idempotency::commit(&self.db, txn, scope, key, bytes, response).await?;
        for exposure in exposures {
            self.cache.put(tenant, exposure).await;
            if let Some(percent) = exposure.utilisation_percent() {
                o2c_kit::metrics::exposure_utilisation(percent);
            }
        }
        self.alerts.publish(alerts);
        Ok(Response::new(response))
    }

    async fn account_proto(
        &self,
        conn: &impl sea_orm::ConnectionTrait,
        account: &Account,
    ) -> Result<pb::CreditAccount, ApiError> {
        let parent = match &account.parent_account_id {
            Some(parent) => Some(
                storage::account_by_id(conn, parent)
                    .await?
                    .exposure
                    .customer_id
                    .to_string(),
            ),
            None => None,
        };
        convert::account(account, parent)
    }

    /// Exposures to refresh after a change of `account` (and its parent).
    async fn touched(
        &self,
        conn: &impl sea_orm::ConnectionTrait,
        account: &Account,
    ) -> Result<Vec<Exposure>, ApiError> {
        let mut exposures = vec![account.exposure];
        if let Some(parent) = &account.parent_account_id {
            exposures.push(storage::account_by_id(conn, parent).await?.exposure);
        }
        Ok(exposures)
    }
}

impl From<CreditError> for ApiError {
    fn from(error: CreditError) -> Self {
        let message = error.to_string();
        match error {
            CreditError::AccountExists(_) => ApiError::AlreadyExists(message),
            CreditError::NoAccount(_) => ApiError::NotFound(message),
            CreditError::CurrencyMismatch { .. } => {
                ApiError::invalid("amount.currency_code", message)
            }
            CreditError::OrderAlreadyReserved(_) => ApiError::AlreadyExists(message),
            CreditError::ReservationNotOpen(_) => ApiError::FailedPrecondition(message),
            CreditError::Money(_) => ApiError::Internal(message),
            CreditError::Parent(_) => ApiError::invalid("parent_customer_id", message),
            CreditError::SameApprover(_) => ApiError::FailedPrecondition(message),
            CreditError::LimitChangeNotPending(_) => ApiError::FailedPrecondition(message),
            CreditError::HoldNotOpen(_) => ApiError::FailedPrecondition(message),
            CreditError::OrderHeld(_) => ApiError::AlreadyExists(message),
            CreditError::AboveAuthority(_) => ApiError::FailedPrecondition(message),
        }
    }
}

/// A validated invoice snapshot.
pub struct SnapshotOf {
    customer_id: CustomerId,
    total: Money,
    state: storage::InvoiceState,
    /// Paid in full (not cancelled or written off).
    paid: bool,
    issue_date: Option<chrono::NaiveDate>,
}

/// What applying a snapshot left for after the commit.
pub struct SyncedInvoice {
    account: Account,
    converted: Option<storage::Reservation>,
    exposures: Vec<Exposure>,
    alerts: Vec<Alert>,
}

/// Reads the parts of an invoice snapshot credit uses; `None` for a draft.
fn invoice_state(
    field: &str,
    invoice: Option<&invoicing_pb::Invoice>,
) -> Result<Option<SnapshotOf>, ApiError> {
    let Some(invoice) = invoice else {
        return Err(ApiError::invalid(field, "is required"));
    };
    let status = invoicing_pb::InvoiceStatus::try_from(invoice.status)
        .unwrap_or(invoicing_pb::InvoiceStatus::Unspecified);
    match status {
        invoicing_pb::InvoiceStatus::Unspecified => {
            return Err(ApiError::invalid(format!("{field}.status"), "must be set"));
        }
        invoicing_pb::InvoiceStatus::Draft => return Ok(None),
        _ => {}
    }
    let mut v = Violations::default();
    let invoice_id = v.check(fields::id::<InvoiceId>(
        &format!("{field}.invoice_id"),
        &invoice.invoice_id,
    ));
    let customer_id = v.check(fields::id::<CustomerId>(
        &format!("{field}.customer_id"),
        &invoice.customer_id,
    ));
    let order_id = v.check(fields::optional_text(
        &format!("{field}.order_id"),
        &invoice.order_id,
        MAX_ORDER_ID_LENGTH,
    ));
    let total = v.check(proto_money::parse_positive(
        &format!("{field}.total"),
        invoice.total.as_ref(),
    ));
    let open = v.check(proto_money::parse(
        &format!("{field}.amount_open"),
        invoice.amount_open.as_ref(),
    ));
    let due = v.check(fields::optional_date(
        &format!("{field}.due_date"),
        &invoice.due_date,
    ));
    let issued = v.check(fields::optional_date(
        &format!("{field}.issue_date"),
        &invoice.issue_date,
    ));
    v.finish()?;
    let (
        Some(invoice_id),
        Some(customer_id),
        Some(_),
        Some(total),
        Some(open),
        Some(due),
        Some(issue_date),
    ) = (invoice_id, customer_id, order_id, total, open, due, issued)
    else {
        return Err(missing());
    };
    if open.currency() != total.currency()
        || open.is_negative()
        || open.minor_units() > total.minor_units()
    {
        return Err(ApiError::invalid(
            format!("{field}.amount_open"),
            "0 to the total, in its currency",
        ));
    }
    Ok(Some(SnapshotOf {
        customer_id,
        state: storage::InvoiceState {
            invoice_id: invoice_id.to_string(),
            order_id: (!invoice.order_id.is_empty()).then(|| invoice.order_id.clone()),
            total_minor: total.minor_units(),
            open_minor: open.minor_units(),
            due_date: due,
        },
        total,
        paid: status == invoicing_pb::InvoiceStatus::Paid,
        issue_date,
    }))
}

/// Credit's consumer of invoicing's events: each `InvoiceChanged` brings
/// the invoice's receivable up to date, in the transaction that records
/// the event as delivered.
#[tonic::async_trait]
impl o2c_kit::outbox::Consumer for CreditApi {
    const NAME: &'static str = "credit";

    type Applied = Option<(String, SyncedInvoice)>;

    async fn apply(
        &self,
        txn: &DatabaseTransaction,
        event: &events_pb::Event,
    ) -> Result<Self::Applied, ApiError> {
        let Some(events_pb::event::Body::InvoiceChanged(changed)) = &event.body else {
            return Ok(None);
        };
        let snapshot = match invoice_state("invoice", changed.invoice.as_ref()) {
            Ok(Some(snapshot)) => snapshot,
            Ok(None) => return Ok(None),
            // Our own producer sent it: a defect to fix, not to skip.
            Err(error) => {
                return Err(ApiError::Internal(format!(
                    "invoicing event {} is malformed: {error}",
                    event.event_id
                )));
            }
        };
        let as_of = DateTime::parse_from_rfc3339(&event.occurred_at)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(|_| self.now());
        match self.sync_in(txn, &event.tenant_id, &snapshot, as_of).await {
            Ok(synced) => Ok(synced.map(|s| (event.tenant_id.clone(), s))),
            // An invoice in another currency than the account cannot count
            // against its limit; reconciliation reports the difference.
            Err(ApiError::InvalidArgument(violations)) => {
                tracing::warn!(
                    event = %event.event_id,
                    invoice = %snapshot.state.invoice_id,
                    ?violations,
                    "invoice not tracked as a receivable"
                );
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    async fn committed(&self, applied: Self::Applied) {
        if let Some((tenant, synced)) = applied {
            self.after_sync(&tenant, synced).await;
        }
    }
}

fn missing() -> ApiError {
    ApiError::Internal("validated fields missing".into())
}

/// The check a CheckAndReserve request asks for, validated: every bad
/// field at once (INVALID_ARGUMENT), or another tenant's (PERMISSION_DENIED).
fn check_of(request: pb::CheckAndReserveRequest) -> Result<batch::Check, Status> {
    let mut v = Violations::default();
    let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
    let customer = v.check(fields::id::<CustomerId>(
        "customer_id",
        &request.customer_id,
    ));
    let order = v.check(fields::text(
        "order_id",
        &request.order_id,
        MAX_ORDER_ID_LENGTH,
    ));
    let amount = v.check(proto_money::parse_positive(
        "amount",
        request.amount.as_ref(),
    ));
    let reference = v.check(fields::optional_text(
        "client_reference",
        &request.client_reference,
        MAX_CLIENT_REFERENCE_LENGTH,
    ));
    v.check(idempotency::validate_key(&request.idempotency_key));
    v.finish()?;
    let (Some(tenant), Some(customer), Some(order), Some(amount), Some(reference)) =
        (tenant, customer, order, amount, reference)
    else {
        return Err(missing().into());
    };
    Ok(batch::Check {
        scope: format!("{tenant}/credit.CheckAndReserve"),
        key: request.idempotency_key.clone(),
        bytes: request.encode_to_vec(),
        tenant,
        customer,
        order,
        reference,
        amount,
    })
}

fn same_currency(field: &str, amount: &Money, account: &Account) -> Result<(), ApiError> {
    if amount.currency() == account.exposure.currency {
        Ok(())
    } else {
        Err(ApiError::invalid(
            format!("{field}.currency_code"),
            format!(
                "must be the credit account currency {}",
                account.exposure.currency
            ),
        ))
    }
}

fn actor(v: &mut Violations, value: &str) -> Option<String> {
    v.check(fields::text("actor", value, MAX_ACTOR_LENGTH))
}

fn page_token(v: &mut Violations, token: &str) -> Option<Option<String>> {
    if token.is_empty() {
        Some(None)
    } else {
        v.check(fields::id::<uuid::Uuid>("page_token", token).map(|id| Some(id.to_string())))
    }
}

fn next_token<T>(page: &[T], size: u64, id: impl Fn(&T) -> String) -> String {
    if page.len() as u64 == size {
        page.last().map(id).unwrap_or_default()
    } else {
        String::new()
    }
}

fn checked_decision(checked: &Checked) -> Result<pb::CreditDecision, ApiError> {
    convert::decision(
        &checked.decision,
        checked.account.as_ref().map(|a| &a.exposure),
    )
}

type AlertStream = Pin<Box<dyn Stream<Item = Result<pb::StreamAlertsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl CreditService for CreditApi {
    type StreamAlertsStream = AlertStream;

    async fn open_credit_account(
        &self,
        request: Request<pb::OpenCreditAccountRequest>,
    ) -> Result<Response<pb::OpenCreditAccountResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        let currency = v.check(proto_money::parse_currency(
            "currency_code",
            &request.currency_code,
        ));
        let parent = if request.parent_customer_id.is_empty() {
            Some(None)
        } else {
            v.check(
                fields::id::<CustomerId>("parent_customer_id", &request.parent_customer_id)
                    .map(Some),
            )
        };
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(customer), Some(currency), Some(parent)) =
            (tenant, customer, currency, parent)
        else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/credit.OpenCreditAccount");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match self.begin(&scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let account =
            storage::open_account(&txn, &tenant, customer, currency, parent, self.now()).await?;
        let response = pb::OpenCreditAccountResponse {
            credit_account: Some(self.account_proto(&txn, &account).await?),
        };
        self.finish(
            txn,
            &scope,
            key,
            &bytes,
            response,
            &tenant,
            &[account.exposure],
            Vec::new(),
        )
        .await
    }

    async fn set_credit_limit(
        &self,
        request: Request<pb::SetCreditLimitRequest>,
    ) -> Result<Response<pb::SetCreditLimitResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        let limit = v.check(proto_money::parse(
            "credit_limit",
            request.credit_limit.as_ref(),
        ));
        if limit.as_ref().is_some_and(Money::is_negative) {
            v.check::<()>(Err(ApiError::invalid(
                "credit_limit.amount",
                "must not be negative",
            )));
        }
        let reason = v.check(fields::text("reason", &request.reason, MAX_REASON_LENGTH));
        let actor = actor(&mut v, &request.actor);
        let valid_until = v.check(fields::optional_date("valid_until", &request.valid_until));
        let review = v.check(fields::optional_date(
            "next_review_date",
            &request.next_review_date,
        ));
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (
            Some(tenant),
            Some(customer),
            Some(limit),
            Some(reason),
            Some(actor),
            Some(valid_until),
            Some(review),
        ) = (tenant, customer, limit, reason, actor, valid_until, review)
        else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/credit.SetCreditLimit");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match self.begin(&scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let now = self.now();
        let account = storage::require_account(&txn, &tenant, customer).await?;
        same_currency("credit_limit", &limit, &account)?;
        let update = LimitUpdate {
            limit_minor: limit.minor_units(),
            source: storage::SOURCE_MANUAL,
            valid_until,
            next_review_date: review,
            reason,
            actor,
        };
        let (response, account, alerts) = self.change_limit(&txn, &account, &update, now).await?;
        let exposures = self.touched(&txn, &account).await?;
        self.finish(
            txn, &scope, key, &bytes, response, &tenant, &exposures, alerts,
        )
        .await
    }

    async fn check_and_reserve(
        &self,
        request: Request<pb::CheckAndReserveRequest>,
    ) -> Result<Response<pb::CheckAndReserveResponse>, Status> {
        let check = check_of(request.into_inner())?;
        self.queue_check(check).await.map(Response::new)
    }

    async fn check_and_reserve_many(
        &self,
        request: Request<pb::CheckAndReserveManyRequest>,
    ) -> Result<Response<pb::CheckAndReserveManyResponse>, Status> {
        let checks = request.into_inner().checks;
        if checks.is_empty() || checks.len() > MAX_BATCHED_CHECKS {
            return Err(ApiError::invalid(
                "checks",
                format!("must hold 1 to {MAX_BATCHED_CHECKS} checks"),
            )
            .into());
        }
        // Every valid check is queued at once, so the lane's next batch
        // takes them all; each under a span that continues its own order's
        // trace, as the lane decides and logs it under that span.
        let mut outcomes: Vec<Option<Status>> = Vec::with_capacity(checks.len());
        let mut valid = Vec::with_capacity(checks.len());
        for batched in checks {
            let span = tracing::info_span!(
                "credit.check",
                otel.name = "o2c.credit.v1.CreditService/CheckAndReserve",
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = "o2c.credit.v1.CreditService",
                rpc.method = "CheckAndReserve",
                batched = true,
            );
            o2c_kit::telemetry::continue_trace(&span, &batched.traceparent, &batched.tracestate);
            match check_of(batched.check.unwrap_or_default()) {
                Ok(check) => {
                    valid.push((check, span));
                    outcomes.push(None);
                }
                Err(status) => outcomes.push(Some(status)),
            }
        }
        let mut answers = self.queue_checks(valid).into_iter();
        let mut results = Vec::with_capacity(outcomes.len());
        for refused in outcomes {
            let answer = match refused {
                Some(status) => Err(status),
                None => match answers.next() {
                    Some(answer) => answer.await,
                    None => Err(Status::internal("a credit check was not queued")),
                },
            };
            results.push(pb::BatchedCheckResult {
                result: Some(match answer {
                    Ok(response) => pb::batched_check_result::Result::Response(response),
                    Err(status) => pb::batched_check_result::Result::Error(pb::CheckError {
                        code: status.code() as i32,
                        message: status.message().to_owned(),
                        details: status.details().to_vec(),
                    }),
                }),
            });
        }
        Ok(Response::new(pb::CheckAndReserveManyResponse { results }))
    }

    async fn sync_receivable(
        &self,
        request: Request<pb::SyncReceivableRequest>,
    ) -> Result<Response<pb::SyncReceivableResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let invoice = v.check(invoice_state("invoice", request.invoice.as_ref()));
        v.finish()?;
        let (Some(tenant), Some(invoice)) = (tenant, invoice) else {
            return Err(missing().into());
        };
        let Some(invoice) = invoice else {
            // A draft owes nothing yet.
            return Ok(Response::new(pb::SyncReceivableResponse::default()));
        };
        let mut attempt = 0;
        let synced = loop {
            attempt += 1;
            let txn = self.db.begin().await.map_err(ApiError::from)?;
            match self.sync_in(&txn, &tenant, &invoice, self.now()).await {
                Ok(synced) => {
                    txn.commit().await.map_err(ApiError::from)?;
                    break synced;
                }
                // The invoice's event landed at the same moment: once more
                // sees what it did.
                Err(ApiError::Aborted(_)) if attempt < 3 => continue,
                Err(error) => return Err(error.into()),
            }
        };
        let Some(synced) = synced else {
            return Ok(Response::new(pb::SyncReceivableResponse::default()));
        };
        let response = pb::SyncReceivableResponse {
            exposure: Some(convert::exposure(&synced.account.exposure)?),
            converted: synced
                .converted
                .as_ref()
                .map(|r| convert::reservation(r, &synced.account.exposure))
                .transpose()?,
        };
        self.after_sync(&tenant, synced).await;
        Ok(Response::new(response))
    }

    async fn release_reservation(
        &self,
        request: Request<pb::ReleaseReservationRequest>,
    ) -> Result<Response<pb::ReleaseReservationResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let reservation_id = v.check(fields::id::<ReservationId>(
            "reservation_id",
            &request.reservation_id,
        ));
        v.check(fields::optional_text(
            "reason",
            &request.reason,
            MAX_REASON_LENGTH,
        ));
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(reservation_id)) = (tenant, reservation_id) else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/credit.ReleaseReservation");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match self.begin(&scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let reservation = storage::get_reservation(&txn, &tenant, reservation_id).await?;
        let (reservation, account) = storage::release(
            &txn,
            &tenant,
            &reservation,
            storage::STATE_RELEASED,
            self.now(),
        )
        .await?;
        let response = pb::ReleaseReservationResponse {
            reservation: Some(convert::reservation(&reservation, &account.exposure)?),
            exposure: Some(convert::exposure(&account.exposure)?),
        };
        let exposures = self.touched(&txn, &account).await?;
        self.finish(
            txn,
            &scope,
            key,
            &bytes,
            response,
            &tenant,
            &exposures,
            Vec::new(),
        )
        .await
    }

    async fn get_exposure(
        &self,
        request: Request<pb::GetExposureRequest>,
    ) -> Result<Response<pb::GetExposureResponse>, Status> {
        let request = request.into_inner();
        let (tenant, customer) = tenant_and_customer(&request.tenant_id, &request.customer_id)?;
        let exposure = match self.cache.get(&tenant, &customer.to_string()).await {
            Some(cached) => cached,
            None => {
                let account = storage::require_account(&self.db, &tenant, customer).await?;
                self.cache.put(&tenant, &account.exposure).await;
                account.exposure
            }
        };
        Ok(Response::new(pb::GetExposureResponse {
            exposure: Some(convert::exposure(&exposure)?),
        }))
    }

    async fn recompute_exposure(
        &self,
        request: Request<pb::RecomputeExposureRequest>,
    ) -> Result<Response<pb::RecomputeExposureResponse>, Status> {
        let request = request.into_inner();
        let (tenant, customer) = tenant_and_customer(&request.tenant_id, &request.customer_id)?;
        // One transaction so counters and ledger are read at one instant.
        let txn = self.db.begin().await.map_err(ApiError::from)?;
        let account = storage::require_account(&txn, &tenant, customer).await?;
        let recomputed = storage::recompute(&txn, &account).await?;
        txn.commit().await.map_err(ApiError::from)?;
        let consistent = recomputed == account.exposure;
        if !consistent {
            tracing::error!(customer = %customer, stored = ?account.exposure, ledger = ?recomputed, "stored exposure differs from the ledger");
        }
        Ok(Response::new(pb::RecomputeExposureResponse {
            stored: Some(convert::exposure(&account.exposure)?),
            recomputed: Some(convert::exposure(&recomputed)?),
            consistent,
        }))
    }

    async fn get_credit_account(
        &self,
        request: Request<pb::GetCreditAccountRequest>,
    ) -> Result<Response<pb::GetCreditAccountResponse>, Status> {
        let request = request.into_inner();
        let (tenant, customer) = tenant_and_customer(&request.tenant_id, &request.customer_id)?;
        let account = storage::require_account(&self.db, &tenant, customer).await?;
        Ok(Response::new(pb::GetCreditAccountResponse {
            credit_account: Some(self.account_proto(&self.db, &account).await?),
        }))
    }

    async fn get_group_exposure(
        &self,
        request: Request<pb::GetGroupExposureRequest>,
    ) -> Result<Response<pb::GetGroupExposureResponse>, Status> {
        let request = request.into_inner();
        let (tenant, customer) = tenant_and_customer(&request.tenant_id, &request.customer_id)?;
        let txn = self.db.begin().await.map_err(ApiError::from)?;
        let parent = storage::require_account(&txn, &tenant, customer).await?;
        if parent.parent_account_id.is_some() {
            return Err(ApiError::FailedPrecondition(format!(
                "customer {customer} is a group member; ask for its parent's group"
            ))
            .into());
        }
        let mut members = vec![parent.clone()];
        members.extend(storage::children(&txn, &parent).await?);
        let mut recomputed_total = 0i64;
        let mut exposures = Vec::new();
        for member in &members {
            let ledger = storage::recompute(&txn, member).await?;
            recomputed_total += ledger.total_minor();
            exposures.push(convert::exposure(&member.exposure)?);
        }
        txn.commit().await.map_err(ApiError::from)?;
        let e = &parent.exposure;
        Ok(Response::new(pb::GetGroupExposureResponse {
            credit_limit: Some(convert::money(e, e.limit_minor)?),
            total: Some(convert::money(e, parent.group_exposure_minor)?),
            available: Some(convert::money(
                e,
                e.limit_minor - parent.group_exposure_minor,
            )?),
            members: exposures,
            consistent: recomputed_total == parent.group_exposure_minor,
        }))
    }

    async fn set_account_controls(
        &self,
        request: Request<pb::SetAccountControlsRequest>,
    ) -> Result<Response<pb::SetAccountControlsResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        let max = match &request.max_order_value {
            None => Some(None),
            Some(m) => v.check(proto_money::parse_positive("max_order_value", Some(m)).map(Some)),
        };
        v.check(fields::text("reason", &request.reason, MAX_REASON_LENGTH));
        actor(&mut v, &request.actor);
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(customer), Some(max)) = (tenant, customer, max) else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/credit.SetAccountControls");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match self.begin(&scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let account = storage::require_account(&txn, &tenant, customer).await?;
        if let Some(max) = &max {
            same_currency("max_order_value", max, &account)?;
        }
        let account = storage::set_controls(
            &txn,
            &account,
            request.blocked,
            max.map(|m| m.minor_units()),
            self.now(),
        )
        .await?;
        tracing::info!(customer = %customer, blocked = request.blocked, "account controls changed");
        let response = pb::SetAccountControlsResponse {
            credit_account: Some(self.account_proto(&txn, &account).await?),
        };
        self.finish(
            txn,
            &scope,
            key,
            &bytes,
            response,
            &tenant,
            &[account.exposure],
            Vec::new(),
        )
        .await
    }

    async fn decide_limit_change(
        &self,
        request: Request<pb::DecideLimitChangeRequest>,
    ) -> Result<Response<pb::DecideLimitChangeResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let change_id = v.check(fields::id::<uuid::Uuid>(
            "limit_change_id",
            &request.limit_change_id,
        ));
        let reason = v.check(fields::text("reason", &request.reason, MAX_REASON_LENGTH));
        let actor = actor(&mut v, &request.actor);
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(change_id), Some(reason), Some(actor)) =
            (tenant, change_id, reason, actor)
        else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/credit.DecideLimitChange");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match self.begin(&scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let now = self.now();
        let change = storage::get_limit_change(&txn, &tenant, &change_id.to_string()).await?;
        let before = storage::account_by_id(&txn, &change.account_id)
            .await?
            .exposure;
        let (change, account) =
            storage::decide_limit_change(&txn, &change, request.approve, &actor, &reason, now)
                .await?;
        let alerts =
            check::alerts_after_change(&txn, &self.context(now), &account, &before).await?;
        tracing::info!(change = %change.id, status = %change.status, "limit change decided");
        let response = pb::DecideLimitChangeResponse {
            change: Some(convert::limit_change(&change, &account.exposure)?),
            credit_account: Some(self.account_proto(&txn, &account).await?),
        };
        let exposures = self.touched(&txn, &account).await?;
        self.finish(
            txn, &scope, key, &bytes, response, &tenant, &exposures, alerts,
        )
        .await
    }

    async fn list_limit_changes(
        &self,
        request: Request<pb::ListLimitChangesRequest>,
    ) -> Result<Response<pb::ListLimitChangesResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        let size = v.check(fields::page_size("page_size", request.page_size));
        let token = page_token(&mut v, &request.page_token);
        v.finish()?;
        let (Some(tenant), Some(customer), Some(size), Some(token)) =
            (tenant, customer, size, token)
        else {
            return Err(missing().into());
        };
        let account = storage::require_account(&self.db, &tenant, customer).await?;
        let page = storage::list_limit_changes(&self.db, &account, token, size).await?;
        Ok(Response::new(pb::ListLimitChangesResponse {
            changes: page
                .iter()
                .map(|c| convert::limit_change(c, &account.exposure))
                .collect::<Result<_, _>>()?,
            next_page_token: next_token(&page, size, |c| c.id.clone()),
        }))
    }

    async fn amend_reservation(
        &self,
        request: Request<pb::AmendReservationRequest>,
    ) -> Result<Response<pb::AmendReservationResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let reservation_id = v.check(fields::id::<ReservationId>(
            "reservation_id",
            &request.reservation_id,
        ));
        let amount = v.check(proto_money::parse_positive(
            "new_amount",
            request.new_amount.as_ref(),
        ));
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(reservation_id), Some(amount)) = (tenant, reservation_id, amount)
        else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/credit.AmendReservation");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match self.begin(&scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let reservation = storage::get_reservation(&txn, &tenant, reservation_id).await?;
        if reservation.state != storage::STATE_OPEN {
            return Err(ApiError::from(CreditError::ReservationNotOpen("not open")).into());
        }
        let account = storage::account_by_id(&txn, &reservation.account_id).await?;
        same_currency("new_amount", &amount, &account)?;
        let now = self.now();
        let checked = check::amend(&txn, &self.context(now), &tenant, &reservation, amount).await?;
        let after = checked.account.clone().ok_or_else(missing)?;
        let response = pb::AmendReservationResponse {
            decision: Some(checked_decision(&checked)?),
            reservation: checked
                .reservation
                .as_ref()
                .map(|r| convert::reservation(r, &after.exposure))
                .transpose()?,
        };
        let exposures = self.touched(&txn, &after).await?;
        self.finish(
            txn,
            &scope,
            key,
            &bytes,
            response,
            &tenant,
            &exposures,
            checked.alerts,
        )
        .await
    }

    async fn list_decisions(
        &self,
        request: Request<pb::ListDecisionsRequest>,
    ) -> Result<Response<pb::ListDecisionsResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = if request.customer_id.is_empty() {
            Some(None)
        } else {
            v.check(fields::id::<CustomerId>("customer_id", &request.customer_id).map(Some))
        };
        let order = v.check(fields::optional_text(
            "order_id",
            &request.order_id,
            MAX_ORDER_ID_LENGTH,
        ));
        if request.customer_id.is_empty() && request.order_id.is_empty() {
            v.check::<()>(Err(ApiError::invalid(
                "customer_id",
                "customer_id or order_id is required",
            )));
        }
        let size = v.check(fields::page_size("page_size", request.page_size));
        let token = page_token(&mut v, &request.page_token);
        v.finish()?;
        let (Some(tenant), Some(customer), Some(order), Some(size), Some(token)) =
            (tenant, customer, order, size, token)
        else {
            return Err(missing().into());
        };
        let order = (!order.is_empty()).then_some(order);
        let page =
            storage::list_decisions(&self.db, &tenant, customer, order.as_deref(), token, size)
                .await?;
        Ok(Response::new(pb::ListDecisionsResponse {
            decisions: page
                .iter()
                .map(|d| convert::decision(d, None))
                .collect::<Result<_, _>>()?,
            next_page_token: next_token(&page, size, |d| d.id.clone()),
        }))
    }

    async fn list_holds(
        &self,
        request: Request<pb::ListHoldsRequest>,
    ) -> Result<Response<pb::ListHoldsResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = if request.customer_id.is_empty() {
            Some(None)
        } else {
            v.check(fields::id::<CustomerId>("customer_id", &request.customer_id).map(Some))
        };
        let reason = match pb::ReasonCode::try_from(request.reason) {
            Ok(pb::ReasonCode::Unspecified) => Some(None),
            Ok(code) => Some(convert::reason_from_proto(code)),
            Err(_) => v.check(Err(ApiError::invalid("reason", "unknown reason code"))),
        };
        let state = match pb::HoldState::try_from(request.state) {
            Ok(pb::HoldState::Unspecified | pb::HoldState::Open) => Some(storage::HOLD_OPEN),
            Ok(pb::HoldState::Released) => Some(storage::HOLD_RELEASED),
            Ok(pb::HoldState::Rejected) => Some(storage::HOLD_REJECTED),
            Err(_) => v.check(Err(ApiError::invalid("state", "unknown hold state"))),
        };
        let size = v.check(fields::page_size("page_size", request.page_size));
        let token = page_token(&mut v, &request.page_token);
        v.finish()?;
        let (Some(tenant), Some(customer_id), Some(reason), Some(state), Some(size), Some(token)) =
            (tenant, customer, reason, state, size, token)
        else {
            return Err(missing().into());
        };
        let filter = storage::HoldFilter {
            customer_id,
            reason,
            state,
        };
        let page = storage::list_holds(&self.db, &tenant, &filter, token, size).await?;
        let now = self.now();
        let mut holds = Vec::new();
        let mut accounts: HashMap<String, Account> = HashMap::new();
        for hold in &page {
            if !accounts.contains_key(&hold.account_id) {
                let account = storage::account_by_id(&self.db, &hold.account_id).await?;
                accounts.insert(hold.account_id.clone(), account);
            }
            let account = accounts.get(&hold.account_id).ok_or_else(missing)?;
            holds.push(convert::hold(hold, &account.exposure, now)?);
        }
        Ok(Response::new(pb::ListHoldsResponse {
            holds,
            next_page_token: next_token(&page, size, |h| h.id.clone()),
        }))
    }

    async fn release_hold(
        &self,
        request: Request<pb::ReleaseHoldRequest>,
    ) -> Result<Response<pb::ReleaseHoldResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let hold_id = v.check(fields::id::<uuid::Uuid>("hold_id", &request.hold_id));
        let actor = actor(&mut v, &request.actor);
        let reason = v.check(fields::text("reason", &request.reason, MAX_REASON_LENGTH));
        let raise = match &request.raise_limit_to {
            None => Some(None),
            Some(m) => v.check(proto_money::parse_positive("raise_limit_to", Some(m)).map(Some)),
        };
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(hold_id), Some(actor), Some(reason), Some(raise)) =
            (tenant, hold_id, actor, reason, raise)
        else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/credit.ReleaseHold");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match self.begin(&scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let now = self.now();
        let hold = storage::get_hold(&txn, &tenant, &hold_id.to_string()).await?;
        if hold.state != storage::HOLD_OPEN {
            return Err(ApiError::from(CreditError::HoldNotOpen("resolved")).into());
        }
        let mut account = storage::account_by_id(&txn, &hold.account_id).await?;
        let mut alerts = Vec::new();
        if let Some(raise) = raise {
            same_currency("raise_limit_to", &raise, &account)?;
            if raise.minor_units() > account.exposure.limit_minor {
                if domain::needs_approval(
                    account.exposure.limit_minor,
                    raise.minor_units(),
                    self.authority(raise.currency()),
                ) {
                    return Err(ApiError::from(CreditError::AboveAuthority(raise)).into());
                }
                let update = LimitUpdate {
                    limit_minor: raise.minor_units(),
                    source: storage::SOURCE_MANUAL,
                    valid_until: account.limit_valid_until,
                    next_review_date: account.next_review_date,
                    reason: format!("raised to release hold {}: {reason}", hold.id),
                    actor: actor.clone(),
                };
                account = storage::record_limit_change(&txn, &account, &update, true, now)
                    .await?
                    .1;
            }
        }
        let (checked, hold) = self
            .recheck(&txn, &tenant, &account, &hold, &actor, &reason, now)
            .await?;
        alerts.extend(checked.alerts.iter().cloned());
        let after = checked.account.clone().ok_or_else(missing)?;
        let response = pb::ReleaseHoldResponse {
            hold: Some(convert::hold(&hold, &after.exposure, now)?),
            decision: Some(checked_decision(&checked)?),
        };
        let exposures = self.touched(&txn, &after).await?;
        self.finish(
            txn, &scope, key, &bytes, response, &tenant, &exposures, alerts,
        )
        .await
    }

    async fn reject_hold(
        &self,
        request: Request<pb::RejectHoldRequest>,
    ) -> Result<Response<pb::RejectHoldResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let hold_id = v.check(fields::id::<uuid::Uuid>("hold_id", &request.hold_id));
        let actor = actor(&mut v, &request.actor);
        let reason = v.check(fields::text("reason", &request.reason, MAX_REASON_LENGTH));
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(hold_id), Some(actor), Some(reason)) =
            (tenant, hold_id, actor, reason)
        else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/credit.RejectHold");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match self.begin(&scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let now = self.now();
        let hold = storage::get_hold(&txn, &tenant, &hold_id.to_string()).await?;
        if hold.state != storage::HOLD_OPEN {
            return Err(ApiError::from(CreditError::HoldNotOpen("resolved")).into());
        }
        let hold = storage::resolve_hold(
            &txn,
            &hold,
            storage::HOLD_REJECTED,
            &actor,
            &reason,
            None,
            now,
        )
        .await?;
        let account = storage::account_by_id(&txn, &hold.account_id).await?;
        let response = pb::RejectHoldResponse {
            hold: Some(convert::hold(&hold, &account.exposure, now)?),
        };
        self.finish(txn, &scope, key, &bytes, response, &tenant, &[], Vec::new())
            .await
    }

    async fn recheck_holds(
        &self,
        request: Request<pb::RecheckHoldsRequest>,
    ) -> Result<Response<pb::RecheckHoldsResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(customer)) = (tenant, customer) else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/credit.RecheckHolds");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match self.begin(&scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let now = self.now();
        let mut account = storage::require_account(&txn, &tenant, customer).await?;
        let filter = storage::HoldFilter {
            customer_id: Some(customer),
            reason: None,
            state: storage::HOLD_OPEN,
        };
        let open = storage::list_holds(&txn, &tenant, &filter, None, fields::MAX_PAGE_SIZE).await?;
        let mut released = Vec::new();
        let mut still_held = 0;
        let mut alerts = Vec::new();
        for hold in &open {
            let (checked, hold) = self
                .recheck(
                    &txn,
                    &tenant,
                    &account,
                    hold,
                    "system",
                    "automatic re-check",
                    now,
                )
                .await?;
            alerts.extend(checked.alerts.iter().cloned());
            if let Some(after) = checked.account {
                account = after;
            }
            if hold.state == storage::HOLD_RELEASED {
                released.push(convert::hold(&hold, &account.exposure, now)?);
            } else {
                still_held += 1;
            }
        }
        let response = pb::RecheckHoldsResponse {
            released,
            still_held,
        };
        let exposures = self.touched(&txn, &account).await?;
        self.finish(
            txn, &scope, key, &bytes, response, &tenant, &exposures, alerts,
        )
        .await
    }

    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = if request.customer_id.is_empty() {
            Some(None)
        } else {
            v.check(fields::id::<CustomerId>("customer_id", &request.customer_id).map(Some))
        };
        let size = v.check(fields::page_size("page_size", request.page_size));
        let token = page_token(&mut v, &request.page_token);
        v.finish()?;
        let (Some(tenant), Some(customer), Some(size), Some(token)) =
            (tenant, customer, size, token)
        else {
            return Err(missing().into());
        };
        let page = storage::list_alerts(
            &self.db,
            &tenant,
            customer,
            request.unacknowledged_only,
            token,
            size,
        )
        .await?;
        Ok(Response::new(pb::ListAlertsResponse {
            alerts: page.iter().map(convert::alert).collect(),
            next_page_token: next_token(&page, size, |a| a.id.clone()),
        }))
    }

    async fn acknowledge_alert(
        &self,
        request: Request<pb::AcknowledgeAlertRequest>,
    ) -> Result<Response<pb::AcknowledgeAlertResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let alert_id = v.check(fields::id::<uuid::Uuid>("alert_id", &request.alert_id));
        let actor = actor(&mut v, &request.actor);
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(alert_id), Some(actor)) = (tenant, alert_id, actor) else {
            return Err(missing().into());
        };
        let alert = storage::acknowledge_alert(
            &self.db,
            &tenant,
            &alert_id.to_string(),
            &actor,
            self.now(),
        )
        .await?;
        Ok(Response::new(pb::AcknowledgeAlertResponse {
            alert: Some(convert::alert(&alert)),
        }))
    }

    async fn stream_alerts(
        &self,
        request: Request<pb::StreamAlertsRequest>,
    ) -> Result<Response<Self::StreamAlertsStream>, Status> {
        let tenant = fields::tenant_id("tenant_id", &request.get_ref().tenant_id)?;
        let receiver = self.alerts.sender.subscribe();
        let stream = tokio_stream::wrappers::BroadcastStream::new(receiver).filter_map(
            move |item| match item {
                Ok(alert) if alert.tenant_id == tenant => Some(Ok(pb::StreamAlertsResponse {
                    alert: Some(convert::alert(&alert)),
                    missed: 0,
                })),
                Ok(_) => None,
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(missed)) => {
                    Some(Ok(pb::StreamAlertsResponse {
                        alert: None,
                        missed: i64::try_from(missed).unwrap_or(i64::MAX),
                    }))
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn update_risk_facts(
        &self,
        request: Request<pb::UpdateRiskFactsRequest>,
    ) -> Result<Response<pb::UpdateRiskFactsResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        let since = v.check(fields::optional_date(
            "relationship_since",
            &request.relationship_since,
        ));
        let volume = match &request.annual_volume {
            None => Some(None),
            Some(m) => v.check(proto_money::parse("annual_volume", Some(m)).map(Some)),
        };
        if volume
            .as_ref()
            .is_some_and(|v| v.as_ref().is_some_and(Money::is_negative))
        {
            v.check::<()>(Err(ApiError::invalid(
                "annual_volume.amount",
                "must not be negative",
            )));
        }
        for (field, value) in [
            ("disputes", request.disputes),
            ("write_offs", request.write_offs),
            ("broken_promises", request.broken_promises),
        ] {
            if !(0..=10_000).contains(&value) {
                v.check::<()>(Err(ApiError::invalid(field, "0 to 10000")));
            }
        }
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(customer), Some(since), Some(volume)) =
            (tenant, customer, since, volume)
        else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/credit.UpdateRiskFacts");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match self.begin(&scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let now = self.now();
        let account = storage::require_account(&txn, &tenant, customer).await?;
        if let Some(volume) = &volume {
            same_currency("annual_volume", volume, &account)?;
        }
        let facts = MaintainedFacts {
            relationship_since: since,
            annual_volume_minor: volume.map_or(0, |m| m.minor_units()),
            disputes: request.disputes,
            write_offs: request.write_offs,
            broken_promises: request.broken_promises,
        };
        storage::risk::upsert_facts(&txn, &account, &facts, now).await?;
        let (stored, score) = storage::risk::score_and_store(&txn, &account, now).await?;
        let response = pb::UpdateRiskFactsResponse {
            score: Some(convert::score(&stored, &score.factors, &account.exposure)?),
        };
        self.finish(txn, &scope, key, &bytes, response, &tenant, &[], Vec::new())
            .await
    }

    async fn record_payment_behaviour(
        &self,
        request: Request<pb::RecordPaymentBehaviourRequest>,
    ) -> Result<Response<pb::RecordPaymentBehaviourResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        let invoice = v.check(fields::id::<InvoiceId>("invoice_id", &request.invoice_id));
        if !(0..=3_650).contains(&request.days_to_pay) {
            v.check::<()>(Err(ApiError::invalid("days_to_pay", "0 to 3650")));
        }
        if !(-3_650..=3_650).contains(&request.days_beyond_terms) {
            v.check::<()>(Err(ApiError::invalid("days_beyond_terms", "-3650 to 3650")));
        }
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(customer), Some(invoice)) = (tenant, customer, invoice) else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/credit.RecordPaymentBehaviour");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match self.begin(&scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let now = self.now();
        let account = storage::require_account(&txn, &tenant, customer).await?;
        storage::risk::record_behaviour(
            &txn,
            &account,
            &invoice.to_string(),
            request.days_to_pay,
            request.days_beyond_terms,
            now,
        )
        .await?;
        let (stored, score) = storage::risk::score_and_store(&txn, &account, now).await?;
        let response = pb::RecordPaymentBehaviourResponse {
            score: Some(convert::score(&stored, &score.factors, &account.exposure)?),
        };
        self.finish(txn, &scope, key, &bytes, response, &tenant, &[], Vec::new())
            .await
    }

    async fn score_customer(
        &self,
        request: Request<pb::ScoreCustomerRequest>,
    ) -> Result<Response<pb::ScoreCustomerResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        let actor = if request.apply_limit {
            actor(&mut v, &request.actor)
        } else {
            Some(request.actor.clone())
        };
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(customer), Some(actor)) = (tenant, customer, actor) else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/credit.ScoreCustomer");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match self.begin(&scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let now = self.now();
        let account = storage::require_account(&txn, &tenant, customer).await?;
        let (stored, score) = storage::risk::score_and_store(&txn, &account, now).await?;
        let mut alerts = Vec::new();
        let mut account_after = account.clone();
        let change = if request.apply_limit {
            let update = LimitUpdate {
                limit_minor: score.calculated_limit_minor,
                source: storage::SOURCE_CALCULATED,
                valid_until: account.limit_valid_until,
                next_review_date: account.next_review_date,
                reason: format!(
                    "calculated from score {} (class {})",
                    score.points,
                    score.class.code()
                ),
                actor,
            };
            let (response, after, raised) = self.change_limit(&txn, &account, &update, now).await?;
            alerts = raised;
            account_after = after;
            response.change
        } else {
            None
        };
        let response = pb::ScoreCustomerResponse {
            score: Some(convert::score(&stored, &score.factors, &account.exposure)?),
            change,
        };
        let exposures = self.touched(&txn, &account_after).await?;
        self.finish(
            txn, &scope, key, &bytes, response, &tenant, &exposures, alerts,
        )
        .await
    }

    async fn explain_score(
        &self,
        request: Request<pb::ExplainScoreRequest>,
    ) -> Result<Response<pb::ExplainScoreResponse>, Status> {
        let request = request.into_inner();
        let (tenant, customer) = tenant_and_customer(&request.tenant_id, &request.customer_id)?;
        let account = storage::require_account(&self.db, &tenant, customer).await?;
        let stored = storage::risk::latest_score(&self.db, &account)
            .await?
            .ok_or_else(|| ApiError::not_found("risk score of customer", customer))?;
        let factors = storage::risk::stored_factors(&stored)?;
        Ok(Response::new(pb::ExplainScoreResponse {
            score: Some(convert::score(&stored, &factors, &account.exposure)?),
        }))
    }

    async fn list_credit_accounts(
        &self,
        request: Request<pb::ListCreditAccountsRequest>,
    ) -> Result<Response<pb::ListCreditAccountsResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let size = v.check(fields::page_size("page_size", request.page_size));
        let token = page_token(&mut v, &request.page_token);
        v.finish()?;
        let (Some(tenant), Some(size), Some(token)) = (tenant, size, token) else {
            return Err(missing().into());
        };
        let page = storage::list_accounts(&self.db, &tenant, token, size).await?;
        let mut accounts = Vec::new();
        for account in &page {
            accounts.push(self.account_proto(&self.db, account).await?);
        }
        Ok(Response::new(pb::ListCreditAccountsResponse {
            credit_accounts: accounts,
            next_page_token: next_token(&page, size, |a| a.id.to_string()),
        }))
    }

    async fn get_ledger(
        &self,
        request: Request<pb::GetLedgerRequest>,
    ) -> Result<Response<pb::GetLedgerResponse>, Status> {
        let request = request.into_inner();
        let (tenant, customer) = tenant_and_customer(&request.tenant_id, &request.customer_id)?;
        // One transaction so the ledger and the sums are read at one instant.
        let txn = self.db.begin().await.map_err(ApiError::from)?;
        let account = storage::require_account(&txn, &tenant, customer).await?;
        let (receivables, reservations) = storage::ledger(&txn, &account).await?;
        let recomputed = storage::recompute(&txn, &account).await?;
        txn.commit().await.map_err(ApiError::from)?;
        let e = &account.exposure;
        Ok(Response::new(pb::GetLedgerResponse {
            receivables: receivables
                .iter()
                .map(|r| {
                    Ok(pb::Receivable {
                        invoice_id: r.invoice_id.clone(),
                        amount: Some(convert::money(e, r.amount_minor)?),
                        open: Some(convert::money(e, r.open_minor)?),
                        due_date: convert::date(r.due_date),
                    })
                })
                .collect::<Result<_, ApiError>>()?,
            open_reservations: reservations
                .iter()
                .map(|r| convert::reservation(r, e))
                .collect::<Result<_, _>>()?,
            exposure: Some(convert::exposure(e)?),
            consistent: recomputed == account.exposure,
        }))
    }

    async fn report_collection_failure(
        &self,
        request: Request<pb::ReportCollectionFailureRequest>,
    ) -> Result<Response<pb::ReportCollectionFailureResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        v.check(fields::id::<InvoiceId>("invoice_id", &request.invoice_id));
        v.check(fields::id::<uuid::Uuid>("session_id", &request.session_id));
        let reason = v.check(fields::text("reason", &request.reason, MAX_REASON_LENGTH));
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(customer), Some(reason)) = (tenant, customer, reason) else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/credit.ReportCollectionFailure");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match self.begin(&scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let account = storage::require_account(&txn, &tenant, customer).await?;
        let alert = storage::insert_alert(
            &txn,
            &account,
            AlertKind::CollectionFailed,
            0,
            format!(
                "automated collection {} for invoice {} failed: {reason}",
                request.session_id, request.invoice_id
            ),
            None,
            self.now(),
        )
        .await?;
        let response = pb::ReportCollectionFailureResponse {
            alert: Some(convert::alert(&alert)),
        };
        self.finish(
            txn,
            &scope,
            key,
            &bytes,
            response,
            &tenant,
            &[],
            vec![alert],
        )
        .await
    }
}

fn tenant_and_customer(tenant: &str, customer: &str) -> Result<(String, CustomerId), ApiError> {
    let mut v = Violations::default();
    let tenant = v.check(fields::tenant_id("tenant_id", tenant));
    let customer = v.check(fields::id::<CustomerId>("customer_id", customer));
    v.finish()?;
    match (tenant, customer) {
        (Some(tenant), Some(customer)) => Ok((tenant, customer)),
        _ => Err(missing()),
    }
}

impl CreditApi {
    /// Applies a limit change within the actor's authority, or records it
    /// as pending approval (with an alert) above it.
    async fn change_limit(
        &self,
        txn: &DatabaseTransaction,
        account: &Account,
        update: &LimitUpdate,
        now: DateTime<Utc>,
    ) -> Result<(pb::SetCreditLimitResponse, Account, Vec<Alert>), ApiError> {
        let apply = !domain::needs_approval(
            account.exposure.limit_minor,
            update.limit_minor,
            self.authority(account.exposure.currency),
        );
        let (change, after) =
            storage::record_limit_change(txn, account, update, apply, now).await?;
        let mut alerts = if apply {
            check::alerts_after_change(txn, &self.context(now), &after, &account.exposure).await?
        } else {
            let amount = convert::money(&account.exposure, update.limit_minor)?;
            vec![
                storage::insert_alert(
                    txn,
                    account,
                    AlertKind::LimitChangePending,
                    0,
                    format!(
                        "limit change to {} {} by {} awaits approval",
                        amount.amount, amount.currency_code, update.actor
                    ),
                    None,
                    now,
                )
                .await?,
            ]
        };
        alerts.shrink_to_fit();
        tracing::info!(customer = %account.exposure.customer_id, status = %change.status, "limit change");
        Ok((
            pb::SetCreditLimitResponse {
                credit_account: Some(self.account_proto(txn, &after).await?),
                change: Some(convert::limit_change(&change, &after.exposure)?),
            },
            after,
            alerts,
        ))
    }

    /// Re-runs the check of an open hold; releases it when approved.
    #[allow(clippy::too_many_arguments)]
    async fn recheck(
        &self,
        txn: &DatabaseTransaction,
        tenant: &str,
        account: &Account,
        hold: &storage::Hold,
        actor: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<(Checked, storage::Hold), ApiError> {
        let amount = account
            .exposure
            .money(hold.amount_minor)
            .map_err(|e| ApiError::from(CreditError::from(e)))?;
        let ctx = self.context(now);
        let checked = check::check_order(
            txn,
            &ctx,
            tenant,
            account.exposure.customer_id,
            Some(account),
            &hold.order_id,
            "",
            amount,
            false,
        )
        .await?;
        let hold = if checked.outcome == Outcome::Approve {
            let reservation = checked.reservation.as_ref().map(|r| r.id);
            storage::resolve_hold(
                txn,
                hold,
                storage::HOLD_RELEASED,
                actor,
                reason,
                reservation,
                now,
            )
            .await?
        } else {
            storage::update_hold_reasons(txn, hold, &checked.reasons).await?;
            storage::get_hold(txn, tenant, &hold.id).await?
        };
        Ok((checked, hold))
    }
}

/// Periodic work: expire unresolved reservations, raise limit-expiry and
/// review alerts.
#[derive(Clone)]
pub struct Maintenance {
    api: CreditApi,
}

/// Reservations or accounts handled per maintenance pass.
pub const MAINTENANCE_BATCH: u64 = 500;

impl Maintenance {
    pub fn new(api: CreditApi) -> Self {
        Self { api }
    }

    /// One pass; returns how many reservations expired and alerts were
    /// raised.
    pub async fn run_once(&self) -> Result<(usize, usize), ApiError> {
        let api = &self.api;
        let now = api.now();
        let mut expired = 0;
        for (tenant, reservation) in
            storage::expired_reservations(&api.db, now, MAINTENANCE_BATCH).await?
        {
            let txn = api.db.begin().await?;
            // Another pass or a conversion may have resolved it meanwhile.
            let fresh = storage::get_reservation(&txn, &tenant, reservation.id).await?;
            if fresh.state != storage::STATE_OPEN {
                continue;
            }
            let (_, account) =
                storage::release(&txn, &tenant, &fresh, storage::STATE_EXPIRED, now).await?;
            let exposures = api.touched(&txn, &account).await?;
            txn.commit().await?;
            for exposure in &exposures {
                api.cache.put(&tenant, exposure).await;
            }
            tracing::info!(reservation = %fresh.id, order = %fresh.order_id, "reservation expired");
            expired += 1;
        }
        let today = now.date_naive();
        let review_by = today + chrono::Duration::days(api.config.policy.review_notice_days);
        let mut raised = Vec::new();
        for account in
            storage::accounts_needing_date_alerts(&api.db, today, review_by, MAINTENANCE_BATCH)
                .await?
        {
            let txn = api.db.begin().await?;
            let mut expiry_for = None;
            let mut review_for = None;
            if let Some(until) = account.limit_valid_until
                && until < today
                && account.expiry_alerted_for != Some(until)
            {
                raised.push(
                    storage::insert_alert(
                        &txn,
                        &account,
                        AlertKind::LimitExpired,
                        0,
                        format!("credit limit expired on {until}"),
                        None,
                        now,
                    )
                    .await?,
                );
                expiry_for = Some(until);
            }
            if let Some(review) = account.next_review_date
                && review <= review_by
                && account.review_alerted_for != Some(review)
            {
                raised.push(
                    storage::insert_alert(
                        &txn,
                        &account,
                        AlertKind::ReviewDue,
                        0,
                        format!("credit review due on {review}"),
                        None,
                        now,
                    )
                    .await?,
                );
                review_for = Some(review);
            }
            storage::mark_date_alerts(&txn, &account, expiry_for, review_for).await?;
            txn.commit().await?;
        }
        for row in storage::overdue_receivables(&api.db, today, MAINTENANCE_BATCH).await? {
            let Some(due) = row.due_date else { continue };
            let days = (today - due).num_days();
            let Some((level, rung)) =
                domain::dunning_level(&api.config.policy.dunning_levels, days)
            else {
                continue;
            };
            let level = i32::try_from(level).unwrap_or(i32::MAX);
            if level <= row.dunning_level {
                continue;
            }
            let txn = api.db.begin().await?;
            if storage::raise_dunning_level(&txn, &row, level).await? {
                let account = storage::account_by_id(&txn, &row.account_id).await?;
                raised.push(
                    storage::insert_alert(
                        &txn,
                        &account,
                        AlertKind::Dunning,
                        level,
                        format!(
                            "invoice {} is {days} days past due: dunning level {level} ({})",
                            row.invoice_id,
                            rung.action.code()
                        ),
                        None,
                        now,
                    )
                    .await?,
                );
            }
            txn.commit().await?;
        }
        let count = raised.len();
        api.alerts.publish(raised);
        Ok((expired, count))
    }
}
