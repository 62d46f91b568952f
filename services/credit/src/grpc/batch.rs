//! Group commit of credit checks, per customer. Concurrent `CheckAndReserve`
//! calls for one customer queue behind the transaction that is deciding
//! that customer's orders; when it commits, everything that queued meanwhile
//! (up to [`MAX_BATCH`]) is decided in the next transaction, one order after
//! another on the state the previous one left, and committed once. So a
//! customer whose orders all arrive at once pays one row lock and one commit
//! per batch instead of per order, and each order still sees every earlier
//! one: the limit is never overrun.
//!
//! - Every order keeps its own idempotency record, decision and
//!   reservation, written in the shared transaction; each is answered only
//!   after the commit that made it durable.
//! - The batch reads the idempotency records of all its keys in one
//!   statement, and each order after the first starts from the account as
//!   the previous reservation returned it, instead of reading it again.
//! - An order that fails (a bad request, an order checked before) is rolled
//!   back to its own savepoint and answered with its error; the others go on.
//! - Each order's statements run in its own request's span, so its trace
//!   shows them; the batch's `BEGIN` and `COMMIT` are in the trace of the
//!   order that opened the batch.
//! - One `ExposureChanged` event and one cache write per customer per batch
//!   carry the exposure after its last order.
//!
//! Batches for different customers run side by side.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use o2c_kit::ApiError;
use o2c_kit::idempotency;
use o2c_money::Money;
use o2c_money::ids::CustomerId;
use o2c_proto::credit::v1 as pb;
use sea_orm::{DatabaseTransaction, DbErr, TransactionTrait};
use tokio::sync::oneshot;
use tonic::Status;
use tracing::Instrument;

use super::{CreditApi, checked_decision, same_currency};
use crate::domain::{self, Exposure};
use crate::storage::{self, Alert, check};

/// Most orders decided in one transaction.
pub const MAX_BATCH: usize = 64;

/// A validated credit check.
pub(super) struct Check {
    pub tenant: String,
    pub customer: CustomerId,
    pub order: String,
    /// The client's reference for the order.
    pub reference: String,
    pub amount: Money,
    /// Idempotency scope, key and the request's bytes.
    pub scope: String,
    pub key: String,
    pub bytes: Vec<u8>,
}

type Answer = Result<pb::CheckAndReserveResponse, Status>;

pub(super) struct Pending {
    check: Check,
    span: tracing::Span,
    reply: oneshot::Sender<Answer>,
}

type Key = (String, CustomerId);

/// The queues of checks waiting for their customer's running batch.
#[derive(Default)]
pub struct Batcher {
    queues: Mutex<HashMap<Key, Vec<Pending>>>,
}

impl Batcher {
    fn queues(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Vec<Pending>>> {
        // The map stays consistent whatever a panicking holder did: every
        // change to it is a single insert, push or removal.
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `pending`; true when no batch runs for its customer yet, so
    /// the caller starts one.
    fn enqueue(&self, key: Key, pending: Pending) -> bool {
        let mut queues = self.queues();
        match queues.get_mut(&key) {
            Some(queue) => {
                queue.push(pending);
                false
            }
            None => {
                queues.insert(key, vec![pending]);
                true
            }
        }
    }

    /// The next batch of `key`; None (and the customer's queue gone) when
    /// nothing waits.
    fn next(&self, key: &Key) -> Option<Vec<Pending>> {
        let mut queues = self.queues();
        let queue = queues.get_mut(key)?;
        if queue.is_empty() {
            queues.remove(key);
            return None;
        }
        let take = queue.len().min(MAX_BATCH);
        Some(queue.drain(..take).collect())
    }
}

/// Removes a customer's queue if its batch runner unwinds, so later checks
/// start a new runner instead of waiting for a dead one (whose waiting
/// callers are answered INTERNAL when their reply senders drop).
struct Unwind<'a>(&'a Batcher, &'a Key);

impl Drop for Unwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.queues().remove(self.1);
        }
    }
}

/// Why one order of a batch was not decided.
enum Undecided {
    /// Another transaction recorded the same idempotency key first: its
    /// answer is read after this batch ends.
    Raced,
    Failed(ApiError),
}

impl From<ApiError> for Undecided {
    fn from(error: ApiError) -> Self {
        Undecided::Failed(error)
    }
}

impl From<DbErr> for Undecided {
    fn from(error: DbErr) -> Self {
        Undecided::Failed(error.into())
    }
}

/// What one order of a batch leaves to the next.
struct Carried {
    /// The idempotency records of the batch's keys: read at its start, and
    /// each order's added as it is decided.
    recorded: HashMap<String, idempotency::Recorded>,
    /// The account as the previous order's reservation left it; this
    /// transaction holds its row lock since. Taken by each order, set again
    /// only when that order reserved and was decided.
    reserved: Option<storage::Account>,
}

/// One decided order, answered after the commit.
struct Decided {
    response: pb::CheckAndReserveResponse,
    exposures: Vec<Exposure>,
    alerts: Vec<Alert>,
    /// Outcome and reasons, for the decisions metric (None for a replay).
    counted: Option<(&'static str, String)>,
}

impl CreditApi {
    /// Decides `check` in its customer's next batch.
    pub(super) async fn check_in_batch(&self, check: Check) -> Answer {
        let key = (check.tenant.clone(), check.customer);
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            check,
            span: tracing::Span::current(),
            reply,
        };
        if self.batcher.enqueue(key.clone(), pending) {
            let api = self.clone();
            tokio::spawn(async move {
                let _unwind = Unwind(&api.batcher, &key);
                while let Some(batch) = api.batcher.next(&key) {
                    api.decide_batch(&key.0, batch).await;
                }
            });
        }
        answer
            .await
            .map_err(|_| Status::internal("the credit check's batch ended without an answer"))?
    }

    async fn decide_batch(&self, tenant: &str, batch: Vec<Pending>) {
        let opener = batch
            .first()
            .map(|p| p.span.clone())
            .unwrap_or_else(tracing::Span::none);
        let txn = match self.db.begin().instrument(opener.clone()).await {
            Ok(txn) => txn,
            Err(error) => {
                let status = Status::from(ApiError::from(error));
                for pending in batch {
                    let _ = pending.reply.send(Err(status.clone()));
                }
                return;
            }
        };
        // Savepoints only when orders share the transaction: alone, an
        // order's failure rolls back the transaction that is all its own.
        let shared = batch.len() > 1;
        // Every key of the batch is looked up at once: one tenant, so one
        // scope.
        let scope = batch.first().map_or("", |p| p.check.scope.as_str());
        let keys: Vec<&str> = batch.iter().map(|p| p.check.key.as_str()).collect();
        let recorded = idempotency::recorded_in(&txn, scope, &keys)
            .instrument(opener.clone())
            .await;
        let mut state = match recorded {
            Ok(recorded) => Carried {
                recorded,
                reserved: None,
            },
            Err(error) => {
                let status = Status::from(error);
                for pending in batch {
                    let _ = pending.reply.send(Err(status.clone()));
                }
                let _ = txn.rollback().instrument(opener).await;
                return;
            }
        };
        let mut decided = Vec::new();
        let mut raced = Vec::new();
        let mut failed_alone = false;
        for pending in batch {
            let result = async {
                if shared {
                    let savepoint = txn.begin().await?;
                    match self
                        .decide_one(&savepoint, &pending.check, &mut state)
                        .await
                    {
                        Ok(done) => {
                            savepoint.commit().await?;
                            Ok(done)
                        }
                        Err(error) => {
                            savepoint.rollback().await?;
                            Err(error)
                        }
                    }
                } else {
                    self.decide_one(&txn, &pending.check, &mut state).await
                }
            }
            .instrument(pending.span.clone())
            .await;
            match result {
                Ok(done) => decided.push((pending, done)),
                Err(Undecided::Raced) => {
                    failed_alone = !shared;
                    raced.push(pending);
                }
                Err(Undecided::Failed(error)) => {
                    failed_alone = !shared;
                    let _ = pending.reply.send(Err(error.into()));
                }
            }
        }
        if failed_alone || decided.is_empty() {
            let _ = txn.rollback().instrument(opener.clone()).await;
        } else {
            self.commit_batch(tenant, txn, decided, &opener).await;
        }
        for pending in raced {
            let c = &pending.check;
            let answer = match idempotency::stored_in(&self.db, &c.scope, &c.key, &c.bytes)
                .instrument(pending.span.clone())
                .await
            {
                Ok(Some(response)) => Ok(response),
                Ok(None) => Err(idempotency::concurrent().into()),
                Err(error) => Err(error.into()),
            };
            let _ = pending.reply.send(answer);
        }
    }

    /// Records the batch's last exposure per customer, commits, then
    /// refreshes the cache, publishes the alerts and answers every order.
    async fn commit_batch(
        &self,
        tenant: &str,
        txn: DatabaseTransaction,
        decided: Vec<(Pending, Decided)>,
        opener: &tracing::Span,
    ) {
        let mut latest: HashMap<CustomerId, Exposure> = HashMap::new();
        for (_, done) in &decided {
            for exposure in &done.exposures {
                let newer = latest
                    .get(&exposure.customer_id)
                    .is_none_or(|seen| seen.version < exposure.version);
                if newer {
                    latest.insert(exposure.customer_id, *exposure);
                }
            }
        }
        let exposures: Vec<Exposure> = latest.into_values().collect();
        let committed = async {
            self.record_exposures(&txn, tenant, &exposures).await?;
            txn.commit().await.map_err(ApiError::from)
        }
        .instrument(opener.clone())
        .await;
        if let Err(error) = committed {
            let status = Status::from(error);
            for (pending, _) in decided {
                let _ = pending.reply.send(Err(status.clone()));
            }
            return;
        }
        for exposure in &exposures {
            self.cache
                .put(tenant, exposure)
                .instrument(opener.clone())
                .await;
            if let Some(percent) = exposure.utilisation_percent() {
                o2c_kit::metrics::exposure_utilisation(percent);
            }
        }
        for (pending, done) in decided {
            if let Some((outcome, reasons)) = done.counted {
                o2c_kit::metrics::credit_decision(outcome, reasons);
            }
            self.alerts.publish(done.alerts);
            let _ = pending.reply.send(Ok(done.response));
        }
    }

    /// Decides one order in `conn`: its replay when its key was used, its
    /// error, or its decision with the reservation or hold it made.
    async fn decide_one(
        &self,
        conn: &DatabaseTransaction,
        c: &Check,
        state: &mut Carried,
    ) -> Result<Decided, Undecided> {
        if let Some(found) = state.recorded.get(&c.key) {
            // A replay leaves the account as it was.
            let response = found.replay(&c.bytes)?;
            return Ok(Decided {
                response,
                exposures: Vec::new(),
                alerts: Vec::new(),
                counted: None,
            });
        }
        // An order is checked once; changing its amount is an amendment
        // and a held order is worked from the hold queue.
        if let Some(checked) = storage::order_checked(conn, &c.tenant, &c.order).await? {
            return Err(ApiError::from(checked).into());
        }
        // The account as the batch's previous reservation left it: this
        // transaction holds its row lock since, so nobody changed it.
        let account = match state.reserved.take() {
            Some(account) => Some(account),
            None => storage::find_account(conn, &c.tenant, c.customer).await?,
        };
        if let Some(account) = &account {
            same_currency("amount", &c.amount, account)?;
        }
        let ctx = self.context(self.now());
        let checked = check::check_order(
            conn,
            &ctx,
            &c.tenant,
            c.customer,
            account.as_ref(),
            &c.order,
            &c.reference,
            c.amount,
            true,
        )
        .await?;
        let reasons = domain::Reason::join(&checked.reasons).to_string();
        tracing::info!(
            outcome = checked.outcome.code(),
            reasons = %reasons,
            policy = domain::POLICY_VERSION,
            "credit decision"
        );
        // Codes only: no customer data on the span.
        o2c_kit::telemetry::annotate("credit.decision", checked.outcome.code());
        o2c_kit::telemetry::annotate("credit.reasons", reasons.clone());
        o2c_kit::telemetry::annotate("credit.policy", domain::POLICY_VERSION);
        let response = pb::CheckAndReserveResponse {
            decision: Some(checked_decision(&checked)?),
        };
        let exposures = match &checked.account {
            Some(account) => self.touched(conn, account).await?,
            None => Vec::new(),
        };
        match idempotency::record_in(conn, &c.scope, &c.key, &c.bytes, &response).await {
            Ok(()) => {
                // A retry later in the batch replays it.
                state.recorded.insert(
                    c.key.clone(),
                    idempotency::Recorded::of(&c.bytes, &response),
                );
                if checked.outcome == domain::Outcome::Approve {
                    state.reserved.clone_from(&checked.account);
                }
            }
            Err(error) if o2c_kit::db::is_unique_violation(&error) => {
                return Err(Undecided::Raced);
            }
            Err(error) => return Err(error.into()),
        }
        Ok(Decided {
            response,
            exposures,
            alerts: checked.alerts,
            counted: Some((checked.outcome.code(), reasons)),
        })
    }
}
