//! Group commit of credit checks. Concurrent `CheckAndReserve` calls of a
//! tenant queue behind the batch that is deciding the tenant's orders;
//! when it is durable, everything that queued meanwhile (up to
//! [`MAX_BATCH`]) is decided in the next batch and committed once. Each
//! order still sees every earlier one: the limit is never overrun.
//!
//! A batch is decided set-wise, in two round trips on PostgreSQL however
//! many orders and customers it holds:
//! 1. one statement, without locks, reads in one snapshot the accounts of
//!    all its customers, the idempotency records of all its keys, which of
//!    its orders were checked before, and the oldest open due date of each
//!    account ([`storage::batch::read_all`]);
//! 2. every order is decided in memory, in arrival order, on the account as
//!    the orders before it left it ([`check::plan_order`], the policy of
//!    [`check::check_order`]);
//! 3. one statement, a transaction of its own, writes every account it
//!    decided an order on (as its orders left it, or as read when it only
//!    held or blocked them), guarded by the version it read, and inserts
//!    the checked orders, reservations, holds, alerts, decisions,
//!    idempotency records and `ExposureChanged` events (one per customer,
//!    with its exposure after its last order) as data-modifying CTEs
//!    ([`storage::batch::write_all`]). It fails as a whole, and commits
//!    nothing, when one of those accounts changed since the read (another
//!    replica's check, an invoice, a payment, a limit: everything a
//!    decision rests on changes the version) or another transaction
//!    inserted one of its keys or checked one of its orders first;
//! 4. then the answers, sent by the lane before it takes its next batch,
//!    and, in a task of its own so that batch need not wait for Redis,
//!    one pipelined cache write (reads of those customers go to the
//!    database until it lands: `storage::cache`).
//!
//! On SQLite, whose write is one statement per table, the read and the
//! write share a transaction (in process, it costs no round trip), and the
//! commit follows the write.
//!
//! On PostgreSQL a lane also remembers each account as its last committed
//! batch read or wrote it ([`Remembered`]), and decides a batch whose
//! customers are all remembered without step 1: the write's version guard
//! refuses accounts changed since, and its inserts collide with a key
//! recorded or an order approved or held before. A block or a refusal
//! inserts nothing an earlier check collides with, so such a batch is
//! read first; so is a batch whose write fails.
//!
//! What this does not decide goes through [`CreditApi::decide_each`], one
//! order after another in one transaction, each at its own savepoint: the
//! orders of group members (whose check needs the parent's row), of
//! parents of groups (whose rows their members' checks change) and of
//! customers without an account, and the whole batch whenever the
//! set-wise write fails (another replica that changed one of its accounts
//! or checked one of its orders or keys first). That path reads everything
//! again, so it answers what a lone check would. Arrival order holds
//! across the two paths: a batch is decided set-wise up to the first check
//! it cannot decide, the run of such checks from there one by one, and the
//! rest set-wise again, so no check overtakes an earlier one (for a
//! group's limit, an order id or an idempotency key).
//!
//! - Every order keeps its own idempotency record, decision and
//!   reservation; each is answered only after the commit that made it
//!   durable.
//! - An order refused (a key reused for another request, an order checked
//!   before, a foreign currency) is answered with its error; the others go
//!   on.
//! - Each order's decision is logged and annotated in its own request's
//!   span once it is durable; the batch's statements are in the trace of
//!   the order that opened the batch.
//!
//! Batches of different tenants run side by side.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use o2c_kit::ApiError;
use o2c_kit::idempotency;
use o2c_money::Money;
use o2c_money::ids::CustomerId;
use o2c_proto::credit::v1 as pb;
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, TransactionTrait};
use tokio::sync::oneshot;
use tonic::Status;
use tracing::Instrument;

use prost::Message;

use super::{CreditApi, checked_decision, same_currency};
use crate::domain::{self, CreditError, Exposure};
use crate::storage::{self, Alert, check};

/// Most orders decided in one transaction.
pub const MAX_BATCH: usize = 128;

/// The steps of a set-wise batch whose time [`Timings`] sums, and that the
/// `o2c.credit.batch.step.duration` histogram records.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Per check taken from the queue: from its arrival until the lane's
    /// runner took it (whichever path then decides it).
    Queued,
    /// Per batch on SQLite: its `BEGIN`.
    Begin,
    /// Per batch: the read of everything it decides on.
    Read,
    /// Per batch: deciding every check in memory.
    Decide,
    /// Per batch: the write of everything it decided (on PostgreSQL its
    /// commit too).
    Write,
    /// Per batch on SQLite: its commit.
    Commit,
    /// Per check: from its batch's commit to its reply (the cache write
    /// follows the replies).
    Answer,
}

impl Step {
    /// Every step, each at the index of its value.
    const ALL: [Step; 7] = [
        Step::Queued,
        Step::Begin,
        Step::Read,
        Step::Decide,
        Step::Write,
        Step::Commit,
        Step::Answer,
    ];

    fn code(self) -> &'static str {
        match self {
            Step::Queued => "queued",
            Step::Begin => "begin",
            Step::Read => "read",
            Step::Decide => "decide",
            Step::Write => "write",
            Step::Commit => "commit",
            Step::Answer => "answer",
        }
    }
}

/// Where set-wise batches spent their time since the service started:
/// for each step, the sum of its times in microseconds and how many times
/// it was timed, so that two readings give the averages between them
/// ([`Timings::since`]). Checks decided one by one are timed only while
/// queued.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// The checks they were given (a check a batch leaves to a later one
    /// counts in both).
    pub checks: u64,
    /// Per step, in the order of `Step::ALL`: the sum of its times.
    pub micros: [u64; STEPS],
    /// Per step: how many times it was timed (per check for `queued` and
    /// `answer`, per batch for the others).
    pub counts: [u64; STEPS],
    /// Set-wise batches decided on their accounts as remembered, without
    /// a read (they time no `read`).
    pub reads_skipped: u64,
}

/// How many steps [`Timings`] has.
pub const STEPS: usize = Step::ALL.len();

impl Timings {
    /// What happened between `earlier` and this reading.
    pub fn since(&self, earlier: &Timings) -> Timings {
        let between = |now: &[u64; STEPS], then: &[u64; STEPS]| {
            std::array::from_fn(|i| now[i].saturating_sub(then[i]))
        };
        Timings {
            checks: self.checks.saturating_sub(earlier.checks),
            micros: between(&self.micros, &earlier.micros),
            counts: between(&self.counts, &earlier.counts),
            reads_skipped: self.reads_skipped.saturating_sub(earlier.reads_skipped),
        }
    }

    /// Set-wise batches: the times their read was timed (each times one,
    /// unless it was decided without one).
    pub fn batches(&self) -> u64 {
        self.counts[Step::Read as usize] + self.reads_skipped
    }

    /// Each step's code with its average in microseconds over the times it
    /// was timed (0 when it was not).
    pub fn averages(&self) -> Vec<(&'static str, u64)> {
        Step::ALL
            .iter()
            .map(|step| {
                let i = *step as usize;
                (step.code(), self.micros[i] / self.counts[i].max(1))
            })
            .collect()
    }
}

/// Adds one time of `step`, `took`, to the batcher's sums and the metric.
fn record_took(batcher: &Batcher, step: Step, took: std::time::Duration) {
    let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    let i = step as usize;
    batcher.micros[i].fetch_add(micros, Ordering::Relaxed);
    batcher.counts[i].fetch_add(1, Ordering::Relaxed);
    o2c_kit::metrics::credit_batch_step(step.code(), took);
}

/// Adds the time of `step` from `started` until now.
fn record(batcher: &Batcher, step: Step, started: Instant) {
    record_took(batcher, step, started.elapsed());
}

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
    /// When the check arrived.
    queued: Instant,
    check: Check,
    span: tracing::Span,
    reply: oneshot::Sender<Answer>,
}

/// A tenant and a lane: checks of the tenant's customers in the lane share
/// batches.
type Key = (String, usize);

/// The queues of checks waiting for their lane's running batch.
pub struct Batcher {
    queues: Mutex<HashMap<Key, Vec<Pending>>>,
    /// Lanes per tenant: each holds a share of the customers, so a
    /// customer's checks are always decided in one lane, one batch after
    /// another.
    lanes: usize,
    /// Held while checks are decided one by one: such a transaction waits
    /// for row locks (a group member's parent, then the member) while it
    /// holds those of the orders before it, so two at once could deadlock.
    one_at_a_time: tokio::sync::Mutex<()>,
    together: AtomicU64,
    one_by_one: AtomicU64,
    /// The checks set-wise batches were given (the batches are the times
    /// their `read` was timed).
    batched: AtomicU64,
    /// [`Timings::micros`] and [`Timings::counts`].
    micros: [AtomicU64; STEPS],
    counts: [AtomicU64; STEPS],
    /// Each account as the last committed set-wise batch of its lane read
    /// or wrote it, with its oldest open due date (see [`Remembered`]).
    remembered: Mutex<HashMap<(String, CustomerId), Remembered>>,
    /// [`Timings::reads_skipped`].
    reads_skipped: AtomicU64,
}

/// An account as a committed set-wise batch of its lane read or wrote it,
/// and the due date of its oldest open receivable then. A batch whose
/// customers are all remembered is decided on these instead of a read: its
/// write is guarded by the versions remembered, so it commits only if
/// nothing changed those accounts since (everything a decision rests on
/// changes the version, and versions only grow), and a key recorded or an
/// order approved or held before collides with a row the write inserts. A
/// batch that would block or refuse an order, which inserts no such row,
/// is not written so: it is read and decided again, as is a batch whose
/// write fails, after its customers are forgotten.
#[derive(Clone)]
struct Remembered {
    account: storage::Account,
    oldest_due: Option<chrono::NaiveDate>,
}

/// Most accounts remembered; past it, the memory starts again empty.
pub const MAX_REMEMBERED_ACCOUNTS: usize = 100_000;

impl Batcher {
    /// Batches in `lanes` lanes per tenant.
    pub fn new(lanes: usize) -> Self {
        Self {
            queues: Mutex::default(),
            lanes: lanes.max(1),
            one_at_a_time: tokio::sync::Mutex::new(()),
            together: AtomicU64::default(),
            one_by_one: AtomicU64::default(),
            batched: AtomicU64::default(),
            micros: Default::default(),
            counts: Default::default(),
            remembered: Mutex::default(),
            reads_skipped: AtomicU64::default(),
        }
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, HashMap<(String, CustomerId), Remembered>> {
        // Every change is an insert, a removal or a clear.
        self.remembered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The accounts of `customers` of `tenant` and their oldest due dates
    /// (by account id), when every one of them is remembered.
    fn recall(
        &self,
        tenant: &str,
        customers: &[CustomerId],
    ) -> Option<(
        HashMap<CustomerId, storage::Account>,
        HashMap<String, chrono::NaiveDate>,
    )> {
        let remembered = self.remembered();
        let mut accounts = HashMap::with_capacity(customers.len());
        let mut due = HashMap::new();
        for customer in customers {
            let found = remembered.get(&(tenant.to_owned(), *customer))?;
            if let Some(date) = found.oldest_due {
                due.insert(found.account.id.to_string(), date);
            }
            accounts.insert(*customer, found.account.clone());
        }
        Some((accounts, due))
    }

    /// Remembers `accounts` of `tenant` as a committed batch read or wrote
    /// them.
    fn remember(
        &self,
        tenant: &str,
        accounts: &HashMap<CustomerId, storage::Account>,
        due: &HashMap<String, chrono::NaiveDate>,
    ) {
        let mut remembered = self.remembered();
        if remembered.len() + accounts.len() > MAX_REMEMBERED_ACCOUNTS {
            remembered.clear();
        }
        for (customer, account) in accounts {
            let oldest_due = due.get(&account.id.to_string()).copied();
            remembered.insert(
                (tenant.to_owned(), *customer),
                Remembered {
                    account: account.clone(),
                    oldest_due,
                },
            );
        }
    }

    /// Forgets `customers` of `tenant`: the next batch of theirs reads.
    fn forget(&self, tenant: &str, customers: impl IntoIterator<Item = CustomerId>) {
        let mut remembered = self.remembered();
        for customer in customers {
            remembered.remove(&(tenant.to_owned(), customer));
        }
    }

    /// The queue of `check`.
    fn key_of(&self, check: &Check) -> Key {
        let lane = check.customer.as_uuid().as_u128() % self.lanes as u128;
        (
            check.tenant.clone(),
            usize::try_from(lane).unwrap_or_default(),
        )
    }

    /// How many checks were decided set-wise and how many one by one
    /// since the service started.
    pub fn decided(&self) -> (u64, u64) {
        (
            self.together.load(Ordering::Relaxed),
            self.one_by_one.load(Ordering::Relaxed),
        )
    }

    /// Where set-wise batches spent their time so far.
    pub fn timings(&self) -> Timings {
        Timings {
            checks: self.batched.load(Ordering::Relaxed),
            micros: std::array::from_fn(|i| self.micros[i].load(Ordering::Relaxed)),
            counts: std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed)),
            reads_skipped: self.reads_skipped.load(Ordering::Relaxed),
        }
    }

    /// How many batch runners are deciding and how many checks wait for
    /// them.
    pub fn load(&self) -> (usize, usize) {
        let queues = self.queues();
        (queues.len(), queues.values().map(Vec::len).sum())
    }

    fn count(&self, together: usize, one_by_one: usize) {
        for (counter, path, n) in [
            (&self.together, "together", together),
            (&self.one_by_one, "one_by_one", one_by_one),
        ] {
            if n > 0 {
                let n = n as u64;
                counter.fetch_add(n, Ordering::Relaxed);
                o2c_kit::metrics::credit_checks_batched(path, n);
            }
        }
    }

    fn queues(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Vec<Pending>>> {
        // The map stays consistent whatever a panicking holder did: every
        // change to it is a single insert, push or removal.
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues every one of `pending` under one lock; returns the lanes
    /// that had no batch runner yet, for the caller to start one each.
    fn enqueue_all(&self, pending: Vec<(Key, Pending)>) -> Vec<Key> {
        let mut started = Vec::new();
        let mut queues = self.queues();
        for (key, pending) in pending {
            match queues.get_mut(&key) {
                Some(queue) => queue.push(pending),
                None => {
                    started.push(key.clone());
                    queues.insert(key, vec![pending]);
                }
            }
        }
        started
    }

    /// The next batch of `key`; None (and the tenant's queue gone) when
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

/// Removes a tenant's queue if its batch runner unwinds, so later checks
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
    /// Each account as the last order's reservation on it left it; this
    /// transaction holds its row lock since. Taken by each order of the
    /// customer, set again only when that order reserved and was decided.
    reserved: HashMap<CustomerId, storage::Account>,
}

/// What a set-wise batch decided for one check.
enum Fate {
    Decided(Box<Decided>),
    /// Answered with this error once the batch committed.
    Refused(ApiError),
}

/// The checks a set-wise batch leaves, in arrival order.
struct Left {
    /// To decide one by one next.
    alone: Vec<Pending>,
    /// After those, for the next set-wise batch.
    rest: Vec<Pending>,
}

impl Left {
    /// Every check, one by one.
    fn all(batch: Vec<Pending>) -> Self {
        Self {
            alone: batch,
            rest: Vec::new(),
        }
    }
}

/// Logs a durable decision and annotates the current span with it (codes
/// only: no customer data on the span).
fn log_decision(outcome: &'static str, reasons: &str) {
    tracing::info!(
        outcome,
        reasons,
        policy = domain::POLICY_VERSION,
        "credit decision"
    );
    o2c_kit::telemetry::annotate("credit.decision", outcome);
    o2c_kit::telemetry::annotate("credit.reasons", reasons);
    o2c_kit::telemetry::annotate("credit.policy", domain::POLICY_VERSION);
}

/// What a set-wise batch decided and wrote (on SQLite, before its
/// commit).
struct Planned {
    /// One per check decided, in order.
    fates: Vec<Fate>,
    /// How many checks from there on have no account here.
    run: usize,
    /// Each customer's exposure as its last order left it.
    exposures: Vec<Exposure>,
}

/// The exposure each customer was left with by the last of `decided` that
/// changed it.
fn latest_exposures<'a>(decided: impl Iterator<Item = &'a Decided>) -> Vec<Exposure> {
    let mut latest: HashMap<CustomerId, Exposure> = HashMap::new();
    for done in decided {
        for exposure in &done.exposures {
            let newer = latest
                .get(&exposure.customer_id)
                .is_none_or(|seen| seen.version < exposure.version);
            if newer {
                latest.insert(exposure.customer_id, *exposure);
            }
        }
    }
    latest.into_values().collect()
}

/// Answers every check of `checks` with `error`.
fn fail_all(checks: impl IntoIterator<Item = Pending>, error: ApiError) {
    let status = Status::from(error);
    for pending in checks {
        let _ = pending.reply.send(Err(status.clone()));
    }
}

/// Answers a check with its fate: a decision once it is durable, or a
/// refusal.
fn reply(api: &CreditApi, pending: Pending, fate: Fate) {
    match fate {
        Fate::Decided(done) => api.answer(pending, *done),
        Fate::Refused(error) => {
            let _ = pending.reply.send(Err(error.into()));
        }
    }
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
    /// Puts `check` in its tenant's next batch, under the current span,
    /// and returns the future of its answer: checks queued before the first
    /// of their answers is awaited go into the same batch.
    pub(super) fn queue_check(&self, check: Check) -> impl Future<Output = Answer> + use<> {
        let mut answers = self.queue_checks(vec![(check, tracing::Span::current())]);
        let answer = answers.pop();
        async move {
            match answer {
                Some(answer) => answer.await,
                None => Err(Status::internal("the credit check was not queued")),
            }
        }
    }

    /// Puts every one of `checks`, each decided and logged under its span,
    /// in its lane's queue at once (under one lock: no batch runner takes
    /// some of them without the others), and returns the futures of their
    /// answers, in order.
    pub(super) fn queue_checks(
        &self,
        checks: Vec<(Check, tracing::Span)>,
    ) -> Vec<impl Future<Output = Answer> + use<>> {
        let queued = Instant::now();
        let mut answers = Vec::with_capacity(checks.len());
        let mut pending = Vec::with_capacity(checks.len());
        for (check, span) in checks {
            let (reply, answer) = oneshot::channel();
            pending.push((
                self.batcher.key_of(&check),
                Pending {
                    check,
                    span,
                    queued,
                    reply,
                },
            ));
            answers.push(async move {
                answer.await.map_err(|_| {
                    Status::internal("the credit check's batch ended without an answer")
                })?
            });
        }
        for key in self.batcher.enqueue_all(pending) {
            let api = self.clone();
            tokio::spawn(async move {
                let _unwind = Unwind(&api.batcher, &key);
                while let Some(batch) = api.batcher.next(&key) {
                    api.decide_batch(&key, batch).await;
                }
            });
        }
        answers
    }

    async fn decide_batch(&self, key: &Key, batch: Vec<Pending>) {
        let tenant = key.0.as_str();
        let taken = Instant::now();
        for pending in &batch {
            record_took(
                &self.batcher,
                Step::Queued,
                taken.saturating_duration_since(pending.queued),
            );
        }
        let opener = batch
            .first()
            .map(|p| p.span.clone())
            .unwrap_or_else(tracing::Span::none);
        // Arrival order holds across the two paths: set-wise up to the
        // first check it cannot decide, then the run of such checks one by
        // one, then set-wise again from there.
        let mut queue = batch;
        while !queue.is_empty() {
            let size = queue.len();
            let Left { alone, rest } = self.decide_together(key, queue, &opener).await;
            self.batcher
                .count(size - alone.len() - rest.len(), alone.len());
            if !alone.is_empty() {
                // Decided one by one, their accounts change behind the
                // lane's memory.
                self.batcher
                    .forget(tenant, alone.iter().map(|p| p.check.customer));
                let _turn = self.batcher.one_at_a_time.lock().await;
                self.decide_each(tenant, alone, &opener).await;
            }
            queue = rest;
        }
    }

    /// Decides the checks of `batch` set-wise (see the module's
    /// documentation) up to the first one it cannot decide, and answers
    /// them once they are durable; leaves the run of checks it cannot
    /// decide from there, and the checks after that run. When its write
    /// fails, nothing of it holds and it leaves every check to be decided
    /// one by one.
    async fn decide_together(
        &self,
        key: &Key,
        mut batch: Vec<Pending>,
        opener: &tracing::Span,
    ) -> Left {
        let tenant = key.0.as_str();
        self.batcher
            .batched
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        // On PostgreSQL the read and the write are each a transaction of
        // their own, on the pool that keeps their plans (`batch_db`): the
        // write fails itself when anything it decided on changed. SQLite's
        // write is a statement per table, so both go in one transaction
        // there (in process, it costs no round trip).
        let txn = if self.db.get_database_backend() == DbBackend::Postgres {
            None
        } else {
            let started = Instant::now();
            let begun = self.db.begin().instrument(opener.clone()).await;
            record(&self.batcher, Step::Begin, started);
            match begun {
                Ok(txn) => Some(txn),
                // The next path reports what keeps the database away.
                Err(_) => return Left::all(batch),
            }
        };
        let planned = match &txn {
            Some(txn) => {
                self.plan_together(txn, tenant, &batch, false)
                    .instrument(opener.clone())
                    .await
            }
            None => {
                self.plan_together(&self.batch_db, tenant, &batch, true)
                    .instrument(opener.clone())
                    .await
            }
        };
        let Planned {
            fates,
            run,
            exposures,
        } = match planned {
            Ok(planned) => planned,
            Err(error) => {
                tracing::debug!(%error, "set-wise credit checks fell back to one by one");
                if let Some(txn) = txn {
                    let _ = txn.rollback().instrument(opener.clone()).await;
                }
                return Left::all(batch);
            }
        };
        let mut after = batch.split_off(fates.len().min(batch.len()));
        let rest = after.split_off(run.min(after.len()));
        let answers: Vec<(Pending, Fate)> = batch.into_iter().zip(fates).collect();
        let decided = answers
            .iter()
            .any(|(_, fate)| matches!(fate, Fate::Decided(_)));
        match txn {
            // Refusals alone rest only on what was committed before.
            _ if !decided => {
                if let Some(txn) = txn {
                    let _ = txn.rollback().instrument(opener.clone()).await;
                }
                for (pending, fate) in answers {
                    reply(self, pending, fate);
                }
            }
            // The write committed.
            None => self.answer_all(tenant, exposures, answers, opener, Instant::now(), true),
            Some(txn) => {
                if let Err((error, answers)) = self
                    .commit_then_answer(tenant, txn, exposures, answers, opener, true)
                    .await
                {
                    tracing::warn!(%error, checks = answers.len(), "a set-wise batch of credit checks did not commit; deciding them one by one");
                    let mut batch: Vec<Pending> =
                        answers.into_iter().map(|(pending, _)| pending).collect();
                    batch.extend(after);
                    batch.extend(rest);
                    return Left::all(batch);
                }
            }
        }
        Left { alone: after, rest }
    }

    /// Decides `batch` as [`Self::plan_on`] does. With `remember` (a
    /// write that commits itself, on PostgreSQL), a batch whose customers'
    /// accounts are all remembered from the lane's earlier batches is
    /// decided on those without a read ([`Remembered`]); when that ends in
    /// an error (a failed write, a block or a refusal), the customers are
    /// forgotten and the batch is read and decided again. Every batch that
    /// commits leaves its accounts remembered.
    async fn plan_together(
        &self,
        conn: &impl ConnectionTrait,
        tenant: &str,
        batch: &[Pending],
        remember: bool,
    ) -> Result<Planned, ApiError> {
        let mut customers: Vec<CustomerId> = batch.iter().map(|p| p.check.customer).collect();
        customers.sort_unstable();
        customers.dedup();
        if remember && let Some(recalled) = self.batcher.recall(tenant, &customers) {
            match self
                .plan_on(conn, tenant, batch, &customers, Some(recalled), true)
                .await
            {
                Ok(planned) => {
                    self.batcher.reads_skipped.fetch_add(1, Ordering::Relaxed);
                    return Ok(planned);
                }
                Err(error) => {
                    tracing::debug!(%error, "a batch decided on remembered accounts did not commit; reading them");
                    self.batcher.forget(tenant, customers.iter().copied());
                }
            }
        }
        let planned = self
            .plan_on(conn, tenant, batch, &customers, None, remember)
            .await;
        if planned.is_err() {
            self.batcher.forget(tenant, customers);
        }
        planned
    }

    /// Reads what `batch` needs for its distinct, sorted `customers` (or
    /// takes the `recalled` accounts and due
    /// dates, and no idempotency records or checked orders: the write's
    /// inserts collide with those, and a block or a refusal, which inserts
    /// nothing to collide, ends it with ABORTED), decides its checks in memory up to the
    /// first one that has no account here (no account, or one in a
    /// group), and writes the result, with the events of the exposures it
    /// left, in `conn`; with `remember`, remembers the accounts as the
    /// batch read or wrote them once its write committed.
    async fn plan_on(
        &self,
        conn: &impl ConnectionTrait,
        tenant: &str,
        batch: &[Pending],
        customers: &[CustomerId],
        recalled: Option<(
            HashMap<CustomerId, storage::Account>,
            HashMap<String, chrono::NaiveDate>,
        )>,
        remember: bool,
    ) -> Result<Planned, ApiError> {
        // One tenant, so one scope.
        let scope = batch.first().map_or("", |p| p.check.scope.as_str());
        let keys: Vec<&str> = batch.iter().map(|p| p.check.key.as_str()).collect();
        let orders: Vec<&str> = batch.iter().map(|p| p.check.order.as_str()).collect();
        // Decided on memory, a batch knows of no order checked before; only
        // an approval or a hold inserts a row that collides with one.
        let from_memory = recalled.is_some();
        let from_memory_only =
            |why: &str| ApiError::Aborted(format!("{why}: decided again after a read"));
        // Read: everything in one statement, so in one snapshot; the write
        // fails if what it saw changed since. A replay's customer is read
        // too, and left as it was.
        let (
            mut accounts,
            storage::batch::Found {
                mut recorded,
                checked: mut checked_before,
                oldest_due: due,
            },
        ) = match recalled {
            Some((accounts, oldest_due)) => (
                accounts,
                storage::batch::Found {
                    oldest_due,
                    ..Default::default()
                },
            ),
            None => {
                let started = Instant::now();
                let read = storage::batch::read_all(conn, tenant, customers, scope, &keys, &orders)
                    .await?;
                record(&self.batcher, Step::Read, started);
                read
            }
        };
        let started = Instant::now();
        let read_versions: HashMap<CustomerId, i64> = accounts
            .iter()
            .map(|(customer, account)| (*customer, account.exposure.version))
            .collect();
        let ctx = self.context(self.now());
        let mut rows = storage::batch::Rows::default();
        let mut records: Vec<(&str, &[u8], Vec<u8>)> = Vec::new();
        let mut fates = Vec::with_capacity(batch.len());
        let mut run = 0;
        // Customers with a new decision: their accounts are written, each
        // guarded by the version read, whether or not a reservation changed
        // it, so that a hold or a block rests on the account as it still
        // is when it commits (a payment committed meanwhile fails the
        // write; a recheck of the holds after the payment would not see
        // this batch's hold).
        let mut decided_on: std::collections::HashSet<CustomerId> = Default::default();
        for (i, pending) in batch.iter().enumerate() {
            let c = &pending.check;
            if let Some(found) = recorded.get(&c.key) {
                // A replay leaves the account as it was.
                fates.push(match found.replay(&c.bytes) {
                    Ok(response) => Fate::Decided(Box::new(Decided {
                        response,
                        exposures: Vec::new(),
                        alerts: Vec::new(),
                        counted: None,
                    })),
                    Err(error) => Fate::Refused(error),
                });
                continue;
            }
            // An order is checked once; changing its amount is an
            // amendment and a held order is worked from the hold queue.
            if let Some(checked) = checked_before.get(&c.order) {
                fates.push(Fate::Refused(checked.clone().into()));
                continue;
            }
            // No account, or one in a group: decided one by one, and
            // so is everything from here on until that has been.
            let Some(account) = accounts.get_mut(&c.customer) else {
                run = batch[i..]
                    .iter()
                    .take_while(|p| !accounts.contains_key(&p.check.customer))
                    .count();
                break;
            };
            if let Err(error) = same_currency("amount", &c.amount, account) {
                if from_memory {
                    return Err(from_memory_only("a refusal"));
                }
                fates.push(Fate::Refused(error));
                continue;
            }
            let oldest_due = due.get(&account.id.to_string()).copied();
            let planned = check::plan_order(
                &ctx,
                &c.tenant,
                c.customer,
                Some(account),
                oldest_due,
                &c.order,
                &c.reference,
                c.amount,
            )?;
            let checked = planned.checked;
            if from_memory && checked.outcome == domain::Outcome::Block {
                return Err(from_memory_only("a block"));
            }
            let reasons = domain::Reason::join(&checked.reasons).to_string();
            let response = pb::CheckAndReserveResponse {
                decision: Some(checked_decision(&checked)?),
            };
            // A retry later in the batch replays it; a second check of
            // the order is refused.
            recorded.insert(
                c.key.clone(),
                idempotency::Recorded::of(&c.bytes, &response),
            );
            records.push((&c.key, &c.bytes, response.encode_to_vec()));
            let checked_into = match checked.outcome {
                domain::Outcome::Approve => {
                    Some(CreditError::OrderAlreadyReserved(c.order.clone()))
                }
                domain::Outcome::Hold => Some(CreditError::OrderHeld(c.order.clone())),
                domain::Outcome::Block => None,
            };
            if let Some(error) = checked_into {
                checked_before.insert(c.order.clone(), error);
                rows.checked
                    .push(storage::checked_order_row(&c.tenant, &c.order, ctx.now));
            }
            rows.reservations.extend(planned.reservation);
            rows.holds.extend(checked.hold);
            rows.alerts.extend(checked.alerts.iter().cloned());
            rows.decisions.push(checked.decision);
            decided_on.insert(c.customer);
            fates.push(Fate::Decided(Box::new(Decided {
                response,
                exposures: checked.account.iter().map(|a| a.exposure).collect(),
                alerts: checked.alerts,
                counted: Some((checked.outcome.code(), reasons)),
            })));
        }
        let changed: Vec<(i64, &storage::Account)> = accounts
            .iter()
            .filter_map(|(customer, account)| {
                let read = read_versions.get(customer).copied()?;
                (decided_on.contains(customer) || read != account.exposure.version)
                    .then_some((read, account))
            })
            .collect();
        let exposures = latest_exposures(fates.iter().filter_map(|fate| match fate {
            Fate::Decided(done) => Some(done.as_ref()),
            Fate::Refused(_) => None,
        }));
        let events = Self::exposure_events(tenant, &exposures)?;
        let more = [
            idempotency::insert_all(scope, &records),
            o2c_kit::outbox::insert_all(&self.subscribers, events, ctx.now),
        ];
        record(&self.batcher, Step::Decide, started);
        let started = Instant::now();
        storage::batch::write_all(
            conn,
            &changed,
            ctx.now,
            rows,
            more.into_iter().flatten().collect(),
        )
        .await?;
        record(&self.batcher, Step::Write, started);
        if remember {
            self.batcher.remember(tenant, &accounts, &due);
        }
        Ok(Planned {
            fates,
            run,
            exposures,
        })
    }

    /// Decides `batch` one order after another in one transaction, each at
    /// its own savepoint, reading everything as a lone check would.
    async fn decide_each(&self, tenant: &str, batch: Vec<Pending>, opener: &tracing::Span) {
        let opener = opener.clone();
        let txn = match self.db.begin().instrument(opener.clone()).await {
            Ok(txn) => txn,
            Err(error) => return fail_all(batch, error.into()),
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
                reserved: HashMap::new(),
            },
            Err(error) => {
                let _ = txn.rollback().instrument(opener).await;
                return fail_all(batch, error);
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
            let exposures = latest_exposures(decided.iter().map(|(_, done)| done));
            let answers: Vec<(Pending, Fate)> = decided
                .into_iter()
                .map(|(pending, done)| (pending, Fate::Decided(Box::new(done))))
                .collect();
            let committed = match self
                .record_exposures(&txn, tenant, &exposures)
                .instrument(opener.clone())
                .await
            {
                Ok(()) => {
                    self.commit_then_answer(tenant, txn, exposures, answers, &opener, false)
                        .await
                }
                Err(error) => {
                    let _ = txn.rollback().instrument(opener.clone()).await;
                    Err((error, answers))
                }
            };
            if let Err((error, answers)) = committed {
                fail_all(answers.into_iter().map(|(pending, _)| pending), error);
            }
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

    /// Commits `txn`, whose checks left `exposures` (timing the commit
    /// when it is a set-wise batch's), then answers them
    /// ([`Self::answer_all`]). When the commit fails, nothing is answered:
    /// the checks come back.
    async fn commit_then_answer(
        &self,
        tenant: &str,
        txn: DatabaseTransaction,
        exposures: Vec<Exposure>,
        answers: Vec<(Pending, Fate)>,
        opener: &tracing::Span,
        set_wise: bool,
    ) -> Result<(), (ApiError, Vec<(Pending, Fate)>)> {
        let started = Instant::now();
        if let Err(error) = txn.commit().instrument(opener.clone()).await {
            return Err((error.into(), answers));
        }
        if set_wise {
            record(&self.batcher, Step::Commit, started);
        }
        self.answer_all(tenant, exposures, answers, opener, Instant::now(), set_wise);
        Ok(())
    }

    /// Once the checks of `answers` are durable (since `committed`):
    /// answers each check at once, then, in a task of its own so that the
    /// lane's next batch does not wait for Redis, writes `exposures` to the
    /// cache (noted before the answers, so this process reads those
    /// customers from the database until the write lands). Times the
    /// answers of a set-wise batch.
    ///
    /// The answers are sent here rather than from that task: tokio runs a
    /// task spawned by the lane next on the lane's own worker (its LIFO
    /// slot, which the other workers do not steal from), so only once the
    /// lane has taken its next batch and awaits a statement. Under load
    /// that put 0.4 ms between a batch's commit and the sending of its
    /// answers, against under 0.1 ms here. Each reply wakes its check's
    /// handler into that same slot, moving the one before to the queue
    /// the other workers steal from; the cache write's spawn moves the
    /// last one there.
    fn answer_all(
        &self,
        tenant: &str,
        exposures: Vec<Exposure>,
        answers: Vec<(Pending, Fate)>,
        opener: &tracing::Span,
        committed: Instant,
        set_wise: bool,
    ) {
        // Reads of these customers go to the database until the cache has
        // them (`storage::cache`).
        self.cache.begin_writes(tenant, &exposures);
        for (pending, fate) in answers {
            reply(self, pending, fate);
            if set_wise {
                record(&self.batcher, Step::Answer, committed);
            }
        }
        if exposures.is_empty() {
            return;
        }
        let api = self.clone();
        let tenant = tenant.to_owned();
        let opener = opener.clone();
        tokio::spawn(async move {
            for exposure in &exposures {
                if let Some(percent) = exposure.utilisation_percent() {
                    o2c_kit::metrics::exposure_utilisation(percent);
                }
            }
            api.cache
                .put_all(&tenant, &exposures)
                .instrument(opener)
                .await;
        });
    }

    /// Answers a check whose decision is durable: logs and counts it (a
    /// new one), publishes its alerts and replies.
    fn answer(&self, pending: Pending, done: Decided) {
        if let Some((outcome, reasons)) = done.counted {
            pending.span.in_scope(|| log_decision(outcome, &reasons));
            o2c_kit::metrics::credit_decision(outcome, reasons);
        }
        self.alerts.publish(done.alerts);
        let _ = pending.reply.send(Ok(done.response));
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
        let account = match state.reserved.remove(&c.customer) {
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
                if checked.outcome == domain::Outcome::Approve
                    && let Some(account) = &checked.account
                {
                    state.reserved.insert(c.customer, account.clone());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_step_is_averaged_over_the_times_it_was_timed() {
        let earlier = Timings {
            checks: 3,
            micros: [30, 1, 3, 4, 5, 6, 30],
            counts: [3, 1, 1, 1, 1, 1, 3],
            reads_skipped: 0,
        };
        let later = Timings {
            checks: 13,
            micros: [230, 41, 603, 24, 805, 406, 530],
            counts: [13, 3, 3, 3, 3, 2, 8],
            reads_skipped: 0,
        };
        let between = later.since(&earlier);
        assert_eq!((between.batches(), between.checks), (2, 10));
        assert_eq!(
            between.averages(),
            vec![
                ("queued", 20),
                ("begin", 20),
                ("read", 300),
                ("decide", 10),
                ("write", 400),
                // One of the two batches committed; five checks answered.
                ("commit", 400),
                ("answer", 100),
            ]
        );
        // Nothing between two equal readings: zeros, not a division by zero.
        assert!(
            later
                .since(&later)
                .averages()
                .iter()
                .all(|(_, micros)| *micros == 0)
        );
    }

    #[test]
    fn every_step_sits_at_the_index_of_its_value() {
        for (i, step) in Step::ALL.iter().enumerate() {
            assert_eq!(*step as usize, i, "{}", step.code());
        }
    }
}
