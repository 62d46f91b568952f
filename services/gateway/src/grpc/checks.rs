//! Credit checks of concurrent orders, sent to credit together.
//!
//! Every `PlaceOrder` needs credit's `CheckAndReserve`. One call per order
//! pays a gRPC hop's fixed cost at both ends (an HTTP/2 stream, its
//! headers, a task per call), a large share of the suite's CPU under load,
//! while credit decides concurrent checks in one batch anyway. So the
//! gateway keeps few calls to credit in flight per caller context (tenant
//! and user): `credit_checks_in_flight`, by default [`IN_FLIGHT`], one.
//!
//! - a check that finds fewer in flight goes at once, alone, as
//!   `CheckAndReserve`, from its caller's own task: a lone order's path is
//!   the plain call, with no task or channel between;
//! - the others wait, and when one of those calls ends (answered, past its
//!   caller's deadline, or its caller gone), every check that waited goes
//!   in one `CheckAndReserveMany` (at most [`MAX_BATCH`]),
//!   which credit queues at once, so one batch decides them (one per
//!   lane, when credit has several).
//!
//! Each check keeps what it would have had alone: its answer or error (the
//! same status), its trace (the batched check carries its caller's trace
//! context, and credit decides it under a span that continues it), and its
//! deadline (a caller stops waiting at its own deadline, and a check whose
//! caller stopped waiting before it was sent is not sent; a batch's call
//! lasts until the latest of its checks' deadlines, or without one when a
//! check has none). A lone check's call is its caller's, so it ends with
//! its caller as any gRPC call does (a retry under the same key gets
//! credit's decision if it made one); the checks that waited behind it go
//! to credit from a task that takes its place over, so a caller that goes
//! away takes nothing from the others. Batched calls run in tasks of their
//! own: a check already sent in one is decided even if its caller went
//! away meanwhile. A credit without
//! `CheckAndReserveMany` (UNIMPLEMENTED, as during a rolling upgrade) is
//! sent the batch's checks each alone, all at once, and every check goes
//! alone for a minute after.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use o2c_kit::auth::CallContext;
use o2c_kit::client::TracedChannel;
use o2c_kit::settings::SettingsError;
use o2c_proto::credit::v1 as pb;
use o2c_proto::credit::v1::credit_service_client::CreditServiceClient;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::{Code, Status};
use tracing::Instrument;

/// Calls to credit one caller context keeps in flight by default: one,
/// so the orders that arrive while it is away all go in the next call,
/// and credit's lane decides them in one batch as soon as it gets them.
/// Measured by the suite benchmark against two, four and sixteen (as good
/// as no limit): one made the largest batches and decided the most orders
/// (docs/benchmarks.md, tenth session).
pub const IN_FLIGHT: usize = 1;
/// Most calls in flight a setting may ask for.
pub const MAX_IN_FLIGHT: usize = 64;
/// Most checks in one `CheckAndReserveMany`: as many as credit decides in
/// one batch.
pub const MAX_BATCH: usize = 128;
/// How long every check goes alone after credit answered UNIMPLEMENTED to
/// `CheckAndReserveMany`.
const ALONE_AFTER_UNIMPLEMENTED: Duration = Duration::from_secs(60);

type Answer = Result<pb::CheckAndReserveResponse, Status>;

/// Refuses an in-flight limit outside 1 to [`MAX_IN_FLIGHT`].
pub fn validate_in_flight(key: &str, value: usize) -> Result<(), SettingsError> {
    if !(1..=MAX_IN_FLIGHT).contains(&value) {
        return Err(SettingsError::Invalid {
            key: key.to_owned(),
            reason: format!("1 to {MAX_IN_FLIGHT}"),
        });
    }
    Ok(())
}

/// How the checks reach credit: its gRPC client, or a stand-in in tests.
pub trait Credit: Clone + Send + Sync + 'static {
    fn check(&self, request: pb::CheckAndReserveRequest) -> impl Future<Output = Answer> + Send;

    fn check_many(
        &self,
        request: pb::CheckAndReserveManyRequest,
    ) -> impl Future<Output = Result<pb::CheckAndReserveManyResponse, Status>> + Send;
}

impl Credit for CreditServiceClient<TracedChannel> {
    async fn check(&self, request: pb::CheckAndReserveRequest) -> Answer {
        Ok(self.clone().check_and_reserve(request).await?.into_inner())
    }

    async fn check_many(
        &self,
        request: pb::CheckAndReserveManyRequest,
    ) -> Result<pb::CheckAndReserveManyResponse, Status> {
        Ok(self
            .clone()
            .check_and_reserve_many(request)
            .await?
            .into_inner())
    }
}

/// How the gateway's checks went to credit since it started.
#[derive(Debug, Default)]
pub struct CheckCounts {
    alone: AtomicU64,
    batches: AtomicU64,
    batched: AtomicU64,
}

impl CheckCounts {
    /// Checks sent alone, as `CheckAndReserve`.
    pub fn alone(&self) -> u64 {
        self.alone.load(Ordering::Relaxed)
    }

    /// `CheckAndReserveMany` calls.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Checks sent in them.
    pub fn batched(&self) -> u64 {
        self.batched.load(Ordering::Relaxed)
    }
}

/// The gateway's checks, through its credit client.
pub type GatewayChecks = CreditChecks<CreditServiceClient<TracedChannel>>;

/// The gateway's credit checks (see the module's documentation).
#[derive(Clone)]
pub struct CreditChecks<C> {
    credit: C,
    in_flight: usize,
    lanes: Arc<Mutex<HashMap<Key, Lane>>>,
    counts: Arc<CheckCounts>,
    /// Until when every check goes alone (credit answered UNIMPLEMENTED).
    alone_until: Arc<Mutex<Option<Instant>>>,
}

/// A caller context: the tenant and user every check of one call acts for.
type Key = (Option<String>, Option<String>);

#[derive(Default)]
struct Lane {
    /// Calls on their way to credit or back.
    in_flight: usize,
    /// Checks waiting for one of them to come back, oldest first.
    waiting: VecDeque<Waiting>,
}

struct Waiting {
    check: pb::BatchedCheck,
    deadline: Option<Instant>,
    reply: oneshot::Sender<Answer>,
}

impl<C: Credit> CreditChecks<C> {
    /// Checks through `credit`, at most `in_flight` calls at a time per
    /// caller context (at least one).
    pub fn new(credit: C, in_flight: usize) -> Self {
        Self {
            credit,
            in_flight: in_flight.max(1),
            lanes: Arc::default(),
            counts: Arc::default(),
            alone_until: Arc::default(),
        }
    }

    /// How the checks went so far.
    pub fn counts(&self) -> Arc<CheckCounts> {
        Arc::clone(&self.counts)
    }

    /// Checks waiting now for a call to end (those whose callers already
    /// stopped waiting included, until the lane's next batch is taken).
    pub fn waiting(&self) -> usize {
        self.lanes().values().map(|lane| lane.waiting.len()).sum()
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Lane>> {
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks and reserves `check` for the current caller
    /// ([`o2c_kit::auth::current`]), as `CheckAndReserve` would.
    pub async fn check(&self, check: pb::CheckAndReserveRequest) -> Answer {
        let context = o2c_kit::auth::current().unwrap_or_default();
        let key = (context.tenant.clone(), context.user.clone());
        let deadline = context.deadline;
        let alone = self.all_alone();
        let mut check = Some(check);
        // The trace context only for a check that waits, and not under the
        // lock: taken, then the lane looked at again.
        let mut traced = None;
        let answer = loop {
            let mut lanes = self.lanes();
            let lane = lanes.entry(key.clone()).or_default();
            if alone || lane.in_flight < self.in_flight {
                lane.in_flight += 1;
                break None;
            }
            let Some((traceparent, tracestate)) = traced.take() else {
                drop(lanes);
                traced = Some(o2c_kit::telemetry::current_trace_context());
                continue;
            };
            let (reply, answer) = oneshot::channel();
            lane.waiting.push_back(Waiting {
                check: pb::BatchedCheck {
                    check: check.take(),
                    traceparent,
                    tracestate,
                },
                deadline,
                reply,
            });
            break Some(answer);
        };
        if let Some(answer) = answer {
            return by_deadline(deadline, answer).await?.map_err(|_| {
                Status::unavailable("the credit check's call ended without an answer")
            })?;
        }
        // Alone: the caller's own call, in its own task, context and span.
        // Its place goes to the checks that wait meanwhile when it ends,
        // however it ends (the caller may go away).
        let place = self.place(key, context);
        self.counts.alone.fetch_add(1, Ordering::Relaxed);
        let answer = by_deadline(deadline, self.credit.check(check.unwrap_or_default())).await;
        drop(place);
        answer?
    }

    /// Whether every check goes alone for now.
    fn all_alone(&self) -> bool {
        let until = *self
            .alone_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        until.is_some_and(|until| Instant::now() < until)
    }

    /// Sends `batch`, then every batch that waited meanwhile, until none
    /// waits; then gives its place back.
    async fn send(self, mut place: Place<C>, batch: Vec<Waiting>) {
        let mut batch = batch;
        loop {
            self.send_many(&place.context, batch).await;
            match self.next(&place.key) {
                Some(next) => batch = next,
                None => {
                    place.held = false;
                    return;
                }
            }
        }
    }

    /// The place in `key`'s lane a caller just took, acting for `context`.
    fn place(&self, key: Key, context: CallContext) -> Place<C> {
        Place {
            checks: self.clone(),
            key,
            context,
            held: true,
        }
    }

    /// The checks that waited, whose callers still wait; or, when none
    /// did, gives this call's place back (None).
    fn next(&self, key: &Key) -> Option<Vec<Waiting>> {
        let mut lanes = self.lanes();
        let lane = lanes.get_mut(key)?;
        let now = Instant::now();
        let mut batch = Vec::new();
        while batch.len() < MAX_BATCH {
            let Some(waiting) = lane.waiting.pop_front() else {
                break;
            };
            if !gone(&waiting, now) {
                batch.push(waiting);
            }
        }
        if batch.is_empty() {
            release(&mut lanes, key);
            return None;
        }
        Some(batch)
    }

    /// Sends `batch` in one call, for the latest of its callers' deadlines,
    /// and answers each check.
    async fn send_many(&self, context: &CallContext, batch: Vec<Waiting>) {
        if self.all_alone() {
            return self.send_each(context, batch).await;
        }
        self.counts.batches.fetch_add(1, Ordering::Relaxed);
        self.counts
            .batched
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let deadline = batch
            .iter()
            .map(|w| w.deadline)
            .try_fold(None::<Instant>, |latest, d| {
                d.map(|d| Some(latest.map_or(d, |l| l.max(d))))
            })
            .flatten();
        let context = CallContext {
            deadline,
            ..context.clone()
        };
        let request = pb::CheckAndReserveManyRequest {
            checks: batch.iter().map(|w| w.check.clone()).collect(),
        };
        let sent = o2c_kit::auth::scope(context.clone(), self.credit.check_many(request)).await;
        match sent {
            Ok(response) if response.results.len() == batch.len() => {
                for (result, waiting) in response.results.into_iter().zip(batch) {
                    let _ = waiting.reply.send(answer_of(result));
                }
            }
            Ok(response) => {
                let status = Status::internal(format!(
                    "credit answered {} results for {} checks",
                    response.results.len(),
                    batch.len()
                ));
                for waiting in batch {
                    let _ = waiting.reply.send(Err(status.clone()));
                }
            }
            Err(status) if status.code() == Code::Unimplemented => {
                tracing::warn!(
                    "credit has no CheckAndReserveMany: sending every check alone for {} s",
                    ALONE_AFTER_UNIMPLEMENTED.as_secs()
                );
                *self
                    .alone_until
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) =
                    Some(Instant::now() + ALONE_AFTER_UNIMPLEMENTED);
                self.send_each(&context, batch).await;
            }
            Err(status) => {
                for waiting in batch {
                    let _ = waiting.reply.send(Err(status.clone()));
                }
            }
        }
    }

    /// Sends each check of `batch` whose caller still waits alone, at once,
    /// each for its own deadline and under a span that continues its own
    /// caller's trace.
    async fn send_each(&self, context: &CallContext, batch: Vec<Waiting>) {
        let now = Instant::now();
        let mut calls = tokio::task::JoinSet::new();
        for waiting in batch {
            if gone(&waiting, now) {
                continue;
            }
            self.counts.alone.fetch_add(1, Ordering::Relaxed);
            let span = tracing::info_span!("credit.check");
            let batched = waiting.check;
            o2c_kit::telemetry::continue_trace(&span, &batched.traceparent, &batched.tracestate);
            let context = CallContext {
                deadline: waiting.deadline,
                ..context.clone()
            };
            let credit = self.credit.clone();
            let check = batched.check.unwrap_or_default();
            let reply = waiting.reply;
            calls.spawn(o2c_kit::auth::scope(context, async move {
                let _ = reply.send(credit.check(check).instrument(span).await);
            }));
        }
        while calls.join_next().await.is_some() {}
    }
}

/// Whether the caller of `waiting` stopped waiting (a reservation made
/// for it would be for nobody).
fn gone(waiting: &Waiting, now: Instant) -> bool {
    waiting.reply.is_closed() || waiting.deadline.is_some_and(|d| d <= now)
}

/// Gives one call's place in `key`'s lane back; the last one out of a
/// lane with nothing waiting removes it.
fn release(lanes: &mut HashMap<Key, Lane>, key: &Key) {
    let Some(lane) = lanes.get_mut(key) else {
        return;
    };
    lane.in_flight = lane.in_flight.saturating_sub(1);
    if lane.in_flight == 0 {
        // Nothing waits in it: `next` gives a place back only once the
        // lane's queue is empty.
        lanes.remove(key);
    }
}

/// A call's place in its lane. When the call ends, however it ends (its
/// caller went away, its task was dropped before it ran), the checks that
/// waited meanwhile go to credit from a task that takes the place over;
/// with none waiting, the place is given back.
struct Place<C: Credit> {
    checks: CreditChecks<C>,
    key: Key,
    /// The caller context the lane's batches are sent for.
    context: CallContext,
    held: bool,
}

impl<C: Credit> Drop for Place<C> {
    fn drop(&mut self) {
        if !std::mem::replace(&mut self.held, false) {
            return;
        }
        let Some(batch) = self.checks.next(&self.key) else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            // While the runtime shuts down, the spawned task is dropped at
            // once: its place's drop answers the next batch so, in turn.
            Ok(runtime) => {
                let place = Place {
                    checks: self.checks.clone(),
                    key: self.key.clone(),
                    context: self.context.clone(),
                    held: true,
                };
                runtime.spawn(self.checks.clone().send(place, batch));
            }
            // Dropped outside any runtime: nothing can send them, so every
            // caller still waiting is answered UNAVAILABLE (its reply
            // sender drops), and the place is given back.
            Err(_) => {
                drop(batch);
                while self.checks.next(&self.key).is_some() {}
            }
        }
    }
}

/// `answer`, or DEADLINE_EXCEEDED at `deadline`.
async fn by_deadline<T>(
    deadline: Option<Instant>,
    answer: impl Future<Output = T>,
) -> Result<T, Status> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, answer)
            .await
            .map_err(|_| Status::deadline_exceeded("the caller's deadline has passed")),
        None => Ok(answer.await),
    }
}

/// One check's answer as credit gave it within a batch.
fn answer_of(result: pb::BatchedCheckResult) -> Answer {
    match result.result {
        Some(pb::batched_check_result::Result::Response(response)) => Ok(response),
        Some(pb::batched_check_result::Result::Error(error)) => Err(Status::with_details(
            Code::from(error.code),
            error.message,
            error.details.into(),
        )),
        None => Err(Status::internal("credit answered a check with no result")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::time::Duration;

    use tokio::sync::Semaphore;

    use super::*;

    /// A call that reached credit: how, and the orders it checked.
    type Call = (&'static str, Vec<String>);

    /// Credit as the checks see it: each call is recorded with the caller
    /// context it came in, then waits for a permit of `gate`; a check of
    /// order "bad-…" is refused.
    #[derive(Clone)]
    struct Recorded {
        calls: Arc<Mutex<Vec<Call>>>,
        contexts: Arc<Mutex<Vec<Option<CallContext>>>>,
        gate: Arc<Semaphore>,
        many: bool,
    }

    impl Recorded {
        fn new(many: bool) -> Self {
            Self {
                calls: Arc::default(),
                contexts: Arc::default(),
                gate: Arc::new(Semaphore::new(0)),
                many,
            }
        }

        fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }

        /// Waits until `n` calls reached credit.
        async fn until_calls(&self, n: usize) {
            o2c_testkit::eventually(Duration::from_secs(10), || async {
                (self.calls.lock().unwrap().len() >= n).then_some(())
            })
            .await
            .expect("the calls reach credit");
        }

        async fn pass(&self) {
            self.gate.acquire().await.unwrap().forget();
        }
    }

    fn answer(check: &pb::CheckAndReserveRequest) -> Answer {
        if check.order_id.starts_with("bad") {
            return Err(Status::with_details(
                Code::InvalidArgument,
                format!("order {} refused", check.order_id),
                vec![1, 2, 3].into(),
            ));
        }
        Ok(pb::CheckAndReserveResponse {
            decision: Some(pb::CreditDecision {
                order_id: check.order_id.clone(),
                ..Default::default()
            }),
        })
    }

    impl Credit for Recorded {
        async fn check(&self, request: pb::CheckAndReserveRequest) -> Answer {
            self.contexts.lock().unwrap().push(o2c_kit::auth::current());
            self.calls
                .lock()
                .unwrap()
                .push(("alone", vec![request.order_id.clone()]));
            self.pass().await;
            answer(&request)
        }

        async fn check_many(
            &self,
            request: pb::CheckAndReserveManyRequest,
        ) -> Result<pb::CheckAndReserveManyResponse, Status> {
            self.contexts.lock().unwrap().push(o2c_kit::auth::current());
            if !self.many {
                self.calls
                    .lock()
                    .unwrap()
                    .push(("unimplemented", Vec::new()));
                return Err(Status::unimplemented("no CheckAndReserveMany here"));
            }
            let orders = request
                .checks
                .iter()
                .map(|c| c.check.as_ref().unwrap().order_id.clone())
                .collect();
            self.calls.lock().unwrap().push(("many", orders));
            self.pass().await;
            Ok(pb::CheckAndReserveManyResponse {
                results: request
                    .checks
                    .iter()
                    .map(|c| pb::BatchedCheckResult {
                        result: Some(match answer(c.check.as_ref().unwrap()) {
                            Ok(response) => pb::batched_check_result::Result::Response(response),
                            Err(status) => {
                                pb::batched_check_result::Result::Error(pb::CheckError {
                                    code: status.code() as i32,
                                    message: status.message().to_owned(),
                                    details: status.details().to_vec(),
                                })
                            }
                        }),
                    })
                    .collect(),
            })
        }
    }

    fn order(id: &str) -> pb::CheckAndReserveRequest {
        pb::CheckAndReserveRequest {
            order_id: id.into(),
            ..Default::default()
        }
    }

    /// Starts a check of `id` for `tenant`, as a PlaceOrder call would.
    fn start(
        checks: &CreditChecks<Recorded>,
        tenant: &str,
        id: &str,
    ) -> tokio::task::JoinHandle<Answer> {
        start_until(checks, tenant, id, None)
    }

    /// [`start`], for a caller that stops waiting at `deadline`.
    fn start_until(
        checks: &CreditChecks<Recorded>,
        tenant: &str,
        id: &str,
        deadline: Option<Instant>,
    ) -> tokio::task::JoinHandle<Answer> {
        let checks = checks.clone();
        let request = order(id);
        let context = CallContext {
            deadline,
            ..CallContext::for_tenant(tenant, "user")
        };
        tokio::spawn(o2c_kit::auth::scope(context, async move {
            checks.check(request).await
        }))
    }

    async fn until_waiting(checks: &CreditChecks<Recorded>, n: usize) {
        o2c_testkit::eventually(Duration::from_secs(10), || async {
            (checks.waiting() >= n).then_some(())
        })
        .await
        .expect("the checks wait");
    }

    async fn until_no_lanes(checks: &CreditChecks<Recorded>) {
        o2c_testkit::eventually(Duration::from_secs(10), || async {
            checks.lanes.lock().unwrap().is_empty().then_some(())
        })
        .await
        .expect("every lane is given back");
    }

    fn ordered(answer: Answer) -> String {
        answer.unwrap().decision.unwrap().order_id
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_check_goes_alone_and_leaves_nothing_behind() {
        let credit = Recorded::new(true);
        let checks = CreditChecks::new(credit.clone(), 2);
        credit.gate.add_permits(1);
        let answered = start(&checks, "t1", "o-1").await.unwrap();
        assert_eq!(ordered(answered), "o-1");
        assert_eq!(credit.calls(), vec![("alone", vec!["o-1".to_owned()])]);
        until_no_lanes(&checks).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checks_that_wait_go_together_each_with_its_own_answer() {
        let credit = Recorded::new(true);
        let checks = CreditChecks::new(credit.clone(), 1);
        let first = start(&checks, "t1", "o-1");
        credit.until_calls(1).await;
        let mut rest = Vec::new();
        for id in ["o-2", "bad-3", "o-4"] {
            rest.push(start(&checks, "t1", id));
            // In this order.
            until_waiting(&checks, rest.len()).await;
        }
        credit.gate.add_permits(2);
        assert_eq!(ordered(first.await.unwrap()), "o-1");
        let answers: Vec<Answer> = futures_join(rest).await;
        assert_eq!(
            credit.calls(),
            vec![
                ("alone", vec!["o-1".to_owned()]),
                (
                    "many",
                    vec!["o-2".to_owned(), "bad-3".to_owned(), "o-4".to_owned()]
                ),
            ]
        );
        let mut answers = answers.into_iter();
        assert_eq!(ordered(answers.next().unwrap()), "o-2");
        let refused = answers.next().unwrap().unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert_eq!(refused.message(), "order bad-3 refused");
        assert_eq!(refused.details(), &[1, 2, 3]);
        assert_eq!(ordered(answers.next().unwrap()), "o-4");
        until_no_lanes(&checks).await;
        let counts = checks.counts();
        assert_eq!(
            (
                counts.alone(),
                counts.batches(),
                counts.batched(),
                checks.waiting()
            ),
            (1, 1, 3, 0)
        );
    }

    async fn futures_join(handles: Vec<tokio::task::JoinHandle<Answer>>) -> Vec<Answer> {
        let mut answers = Vec::new();
        for handle in handles {
            answers.push(handle.await.unwrap());
        }
        answers
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tenants_do_not_wait_for_each_other() {
        let credit = Recorded::new(true);
        let checks = CreditChecks::new(credit.clone(), 1);
        let first = start(&checks, "t1", "o-1");
        credit.until_calls(1).await;
        let other = start(&checks, "t2", "o-2");
        credit.until_calls(2).await;
        assert_eq!(checks.waiting(), 0);
        credit.gate.add_permits(2);
        assert_eq!(ordered(first.await.unwrap()), "o-1");
        assert_eq!(ordered(other.await.unwrap()), "o-2");
        assert_eq!(
            credit
                .calls()
                .iter()
                .filter(|(kind, _)| *kind == "alone")
                .count(),
            2
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_went_away_is_not_sent_and_takes_nothing_from_the_others() {
        let credit = Recorded::new(true);
        let checks = CreditChecks::new(credit.clone(), 1);
        let first = start(&checks, "t1", "o-1");
        credit.until_calls(1).await;
        let gone = start(&checks, "t1", "o-gone");
        until_waiting(&checks, 1).await;
        let kept = start(&checks, "t1", "o-kept");
        until_waiting(&checks, 2).await;
        gone.abort();
        assert!(gone.await.unwrap_err().is_cancelled());
        // The first caller goes away too, its call with it: the check that
        // waited behind it is sent all the same.
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        credit.gate.add_permits(1);
        assert_eq!(ordered(kept.await.unwrap()), "o-kept");
        assert_eq!(
            credit.calls(),
            vec![
                ("alone", vec!["o-1".to_owned()]),
                ("many", vec!["o-kept".to_owned()])
            ],
            "only the check whose caller still waits is sent"
        );
        until_no_lanes(&checks).await;
        // The lane is free again: the next check goes alone.
        credit.gate.add_permits(1);
        assert_eq!(
            ordered(start(&checks, "t1", "o-next").await.unwrap()),
            "o-next"
        );
        assert_eq!(credit.calls().len(), 3);
    }

    // Paused time: the deadline passes only once everything else waits.
    #[tokio::test(start_paused = true)]
    async fn a_lone_caller_past_its_deadline_hands_the_waiting_checks_on() {
        let credit = Recorded::new(true);
        let checks = CreditChecks::new(credit.clone(), 1);
        let deadline = Instant::now() + Duration::from_secs(1);
        let lone = start_until(&checks, "t1", "o-late", Some(deadline));
        credit.until_calls(1).await;
        let waiting = start(&checks, "t1", "o-2");
        until_waiting(&checks, 1).await;
        // Credit never answers the lone call: its caller's deadline ends it.
        assert_eq!(
            lone.await.unwrap().unwrap_err().code(),
            Code::DeadlineExceeded
        );
        credit.gate.add_permits(1);
        assert_eq!(ordered(waiting.await.unwrap()), "o-2");
        assert_eq!(
            credit.calls(),
            vec![
                ("alone", vec!["o-late".to_owned()]),
                ("many", vec!["o-2".to_owned()])
            ]
        );
        until_no_lanes(&checks).await;
    }

    /// A lane with a call in flight and `n` checks waiting behind it.
    fn lane_with_waiting(
        checks: &CreditChecks<Recorded>,
        n: usize,
    ) -> (Key, Vec<oneshot::Receiver<Answer>>) {
        let key: Key = (Some("t1".into()), Some("user".into()));
        let mut lanes = checks.lanes();
        let lane = lanes.entry(key.clone()).or_default();
        lane.in_flight = 1;
        let answers = (0..n)
            .map(|i| {
                let (reply, answer) = oneshot::channel();
                lane.waiting.push_back(Waiting {
                    check: pb::BatchedCheck {
                        check: Some(order(&format!("o-{i}"))),
                        ..Default::default()
                    },
                    deadline: None,
                    reply,
                });
                answer
            })
            .collect();
        (key, answers)
    }

    #[test]
    fn a_place_dropped_outside_a_runtime_answers_every_waiting_check() {
        let checks = CreditChecks::new(Recorded::new(true), 1);
        let (key, answers) = lane_with_waiting(&checks, 3 * MAX_BATCH);
        drop(checks.place(key, CallContext::for_tenant("t1", "user")));
        for mut answer in answers {
            assert!(
                matches!(answer.try_recv(), Err(oneshot::error::TryRecvError::Closed)),
                "answered UNAVAILABLE: no reply will come"
            );
        }
        assert!(checks.lanes().is_empty(), "the lane is given back");
    }

    #[test]
    fn a_place_dropped_as_its_runtime_shuts_down_gives_its_lane_back() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let checks = CreditChecks::new(Recorded::new(true), 1);
        let (key, answers) = lane_with_waiting(&checks, 3 * MAX_BATCH);
        let place = checks.place(key, CallContext::for_tenant("t1", "user"));
        // A task holding the place, stopped only by the runtime's end.
        runtime.spawn(async move {
            let _place = place;
            std::future::pending::<()>().await;
        });
        drop(runtime);
        for mut answer in answers {
            assert!(matches!(
                answer.try_recv(),
                Err(oneshot::error::TryRecvError::Closed)
            ));
        }
        assert!(checks.lanes().is_empty(), "the lane is given back");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_caller_stops_at_its_deadline() {
        let credit = Recorded::new(true);
        let checks = CreditChecks::new(credit.clone(), 1);
        let first = start(&checks, "t1", "o-1");
        credit.until_calls(1).await;
        let context = CallContext {
            deadline: Some(Instant::now() + Duration::from_millis(50)),
            ..CallContext::for_tenant("t1", "user")
        };
        let late = o2c_kit::auth::scope(context, checks.check(order("o-late"))).await;
        assert_eq!(late.unwrap_err().code(), Code::DeadlineExceeded);
        credit.gate.add_permits(1);
        assert_eq!(ordered(first.await.unwrap()), "o-1");
        until_no_lanes(&checks).await;
        assert_eq!(credit.calls().len(), 1, "the late check was not sent");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_credit_without_the_batched_call_gets_each_check_alone() {
        let credit = Recorded::new(false);
        let checks = CreditChecks::new(credit.clone(), 1);
        let first = start(&checks, "t1", "o-1");
        credit.until_calls(1).await;
        let second = start(&checks, "t1", "o-2");
        until_waiting(&checks, 1).await;
        let third = start(&checks, "t1", "bad-3");
        until_waiting(&checks, 2).await;
        credit.gate.add_permits(3);
        assert_eq!(ordered(first.await.unwrap()), "o-1");
        assert_eq!(ordered(second.await.unwrap()), "o-2");
        assert_eq!(
            third.await.unwrap().unwrap_err().code(),
            Code::InvalidArgument
        );
        let calls = credit.calls();
        assert_eq!(calls[0], ("alone", vec!["o-1".to_owned()]));
        assert_eq!(calls[1], ("unimplemented", Vec::new()));
        let mut alone: Vec<_> = calls[2..].to_vec();
        alone.sort();
        assert_eq!(
            alone,
            vec![
                ("alone", vec!["bad-3".to_owned()]),
                ("alone", vec!["o-2".to_owned()])
            ]
        );
        // From then on every check goes alone at once, even with a call in
        // flight: credit is not asked for the batched call again.
        let fourth = start(&checks, "t1", "o-4");
        credit.until_calls(5).await;
        let fifth = start(&checks, "t1", "o-5");
        credit.until_calls(6).await;
        credit.gate.add_permits(2);
        assert_eq!(ordered(fourth.await.unwrap()), "o-4");
        assert_eq!(ordered(fifth.await.unwrap()), "o-5");
        assert!(credit.calls()[4..].iter().all(|(kind, _)| *kind == "alone"));
        until_no_lanes(&checks).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_goes_for_its_tenant_until_the_latest_deadline_of_its_checks() {
        let credit = Recorded::new(true);
        let checks = CreditChecks::new(credit.clone(), 1);
        let first = start(&checks, "t1", "o-1");
        credit.until_calls(1).await;
        let soon = Instant::now() + Duration::from_secs(30);
        let later = Instant::now() + Duration::from_secs(60);
        let mut waiting = Vec::new();
        for (n, deadline) in [soon, later].into_iter().enumerate() {
            let id = format!("o-{}", n + 2);
            waiting.push(start_until(&checks, "t1", &id, Some(deadline)));
            until_waiting(&checks, n + 1).await;
        }
        credit.gate.add_permits(2);
        assert_eq!(ordered(first.await.unwrap()), "o-1");
        for handle in waiting {
            handle.await.unwrap().unwrap();
        }
        let contexts = credit.contexts.lock().unwrap().clone();
        let many = contexts[1]
            .clone()
            .expect("the batch's call has a caller context");
        assert_eq!(many.tenant.as_deref(), Some("t1"));
        assert_eq!(many.user.as_deref(), Some("user"));
        assert_eq!(many.deadline, Some(later));
        // A check without a deadline makes the batch's call go without one
        // (the channel's own timeout still caps it).
        let first = start(&checks, "t1", "o-4");
        credit.until_calls(3).await;
        let open = start(&checks, "t1", "o-5");
        until_waiting(&checks, 1).await;
        credit.gate.add_permits(2);
        first.await.unwrap().unwrap();
        open.await.unwrap().unwrap();
        let contexts = credit.contexts.lock().unwrap().clone();
        assert_eq!(contexts[3].clone().unwrap().deadline, None);
    }
}
