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
//!   `CheckAndReserve`: a lone order's path is the plain call;
//! - the others wait, and when one of those calls comes back, every check
//!   that waited goes in one `CheckAndReserveMany` (at most [`MAX_BATCH`]),
//!   which credit decides in one batch.
//!
//! Each check keeps what it would have had alone: its answer or error (the
//! same status), its trace (the batched check carries its caller's trace
//! context, and credit decides it under a span that continues it), and its
//! deadline (a caller stops waiting at its own deadline, and a check whose
//! caller stopped waiting before it was sent is not sent). The calls run in
//! tasks of their own, so a caller that goes away takes nothing from the
//! others. A credit without `CheckAndReserveMany` (UNIMPLEMENTED, as during
//! a rolling upgrade) is sent the batch's checks one by one.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

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
/// as no limit): one sent the fewest calls, made the largest batches and
/// decided the most orders (docs/benchmarks.md, tenth session).
pub const IN_FLIGHT: usize = 1;
/// Most calls in flight a setting may ask for.
pub const MAX_IN_FLIGHT: usize = 64;
/// Most checks in one `CheckAndReserveMany` (credit's own limit).
pub const MAX_BATCH: usize = 256;

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

/// The gateway's credit checks (see the module's documentation).
#[derive(Clone)]
pub struct CreditChecks<C> {
    credit: C,
    in_flight: usize,
    lanes: Arc<Mutex<HashMap<Key, Lane>>>,
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

/// What one task sends next.
enum Job {
    Alone {
        check: pb::CheckAndReserveRequest,
        span: tracing::Span,
        reply: oneshot::Sender<Answer>,
    },
    Many(Vec<Waiting>),
}

impl<C: Credit> CreditChecks<C> {
    /// Checks through `credit`, at most `in_flight` calls at a time per
    /// caller context (at least one).
    pub fn new(credit: C, in_flight: usize) -> Self {
        Self {
            credit,
            in_flight: in_flight.max(1),
            lanes: Arc::default(),
        }
    }

    /// Checks and reserves `check` for the current caller
    /// ([`o2c_kit::auth::current`]), as `CheckAndReserve` would.
    pub async fn check(&self, check: pb::CheckAndReserveRequest) -> Answer {
        let context = o2c_kit::auth::current().unwrap_or_default();
        let key = (context.tenant.clone(), context.user.clone());
        let deadline = context.deadline;
        let (reply, answer) = oneshot::channel();
        let job = {
            let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
            let lane = lanes.entry(key.clone()).or_default();
            if lane.in_flight < self.in_flight {
                lane.in_flight += 1;
                Some(Job::Alone {
                    check,
                    span: tracing::Span::current(),
                    reply,
                })
            } else {
                let (traceparent, tracestate) = o2c_kit::telemetry::current_trace_context();
                lane.waiting.push_back(Waiting {
                    check: pb::BatchedCheck {
                        check: Some(check),
                        traceparent,
                        tracestate,
                    },
                    deadline,
                    reply,
                });
                None
            }
        };
        if let Some(job) = job {
            tokio::spawn(self.clone().send(key, context, job));
        }
        let answered = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, answer)
                .await
                .map_err(|_| Status::deadline_exceeded("the caller's deadline has passed"))?,
            None => answer.await,
        };
        answered
            .map_err(|_| Status::unavailable("the credit check's call ended without an answer"))?
    }

    /// Sends `job`, then every batch that waited meanwhile, until none
    /// waits; then gives its place back.
    async fn send(self, key: Key, context: CallContext, job: Job) {
        let mut job = job;
        loop {
            match job {
                Job::Alone { check, span, reply } => {
                    let credit = self.credit.clone();
                    let answer =
                        o2c_kit::auth::scope(context.clone(), credit.check(check).instrument(span))
                            .await;
                    let _ = reply.send(answer);
                }
                Job::Many(batch) => self.send_many(&context, batch).await,
            }
            match self.next(&key) {
                Some(batch) => job = Job::Many(batch),
                None => return,
            }
        }
    }

    /// The checks that waited, whose callers still wait; or, when none
    /// did, gives this call's place back (None).
    fn next(&self, key: &Key) -> Option<Vec<Waiting>> {
        let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        let lane = lanes.get_mut(key)?;
        let now = Instant::now();
        let mut batch = Vec::new();
        while batch.len() < MAX_BATCH {
            let Some(waiting) = lane.waiting.pop_front() else {
                break;
            };
            // A caller that stopped waiting gets no reservation made for it.
            let gone = waiting.reply.is_closed() || waiting.deadline.is_some_and(|d| d <= now);
            if !gone {
                batch.push(waiting);
            }
        }
        if batch.is_empty() {
            lane.in_flight = lane.in_flight.saturating_sub(1);
            if lane.in_flight == 0 && lane.waiting.is_empty() {
                lanes.remove(key);
            }
            return None;
        }
        Some(batch)
    }

    /// Sends `batch` in one call, for the latest of its callers' deadlines,
    /// and answers each check.
    async fn send_many(&self, context: &CallContext, batch: Vec<Waiting>) {
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
        let (checks, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|w| (w.check, w.reply)).unzip();
        let request = pb::CheckAndReserveManyRequest { checks };
        let sent = o2c_kit::auth::scope(context.clone(), self.credit.check_many(request.clone()));
        let results = match sent.await {
            Ok(response) if response.results.len() == replies.len() => response.results,
            Ok(response) => {
                let status = Status::internal(format!(
                    "credit answered {} results for {} checks",
                    response.results.len(),
                    replies.len()
                ));
                for reply in replies {
                    let _ = reply.send(Err(status.clone()));
                }
                return;
            }
            Err(status) if status.code() == Code::Unimplemented => {
                self.send_each(context, request.checks, replies).await;
                return;
            }
            Err(status) => {
                for reply in replies {
                    let _ = reply.send(Err(status.clone()));
                }
                return;
            }
        };
        for (result, reply) in results.into_iter().zip(replies) {
            let _ = reply.send(answer_of(result));
        }
    }

    /// Sends each of `checks` alone, at once, each under a span that
    /// continues its own caller's trace.
    async fn send_each(
        &self,
        context: CallContext,
        checks: Vec<pb::BatchedCheck>,
        replies: Vec<oneshot::Sender<Answer>>,
    ) {
        let mut calls = tokio::task::JoinSet::new();
        for (batched, reply) in checks.into_iter().zip(replies) {
            let span = tracing::info_span!("credit.check");
            o2c_kit::telemetry::continue_trace(&span, &batched.traceparent, &batched.tracestate);
            let credit = self.credit.clone();
            let check = batched.check.unwrap_or_default();
            calls.spawn(o2c_kit::auth::scope(context.clone(), async move {
                let _ = reply.send(credit.check(check).instrument(span).await);
            }));
        }
        while calls.join_next().await.is_some() {}
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

    /// Credit as the checks see it: each call is recorded, then waits for
    /// a permit of `gate`; a check of order "bad-…" is refused.
    #[derive(Clone)]
    struct Recorded {
        calls: Arc<Mutex<Vec<(&'static str, Vec<String>)>>>,
        gate: Arc<Semaphore>,
        many: bool,
    }

    impl Recorded {
        fn new(many: bool) -> Self {
            Self {
                calls: Arc::default(),
                gate: Arc::new(Semaphore::new(0)),
                many,
            }
        }

        fn calls(&self) -> Vec<(&'static str, Vec<String>)> {
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
            if !self.many {
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
        let checks = checks.clone();
        let request = order(id);
        let context = CallContext::for_tenant(tenant, "user");
        tokio::spawn(o2c_kit::auth::scope(context, async move {
            checks.check(request).await
        }))
    }

    fn waiting(checks: &CreditChecks<Recorded>) -> usize {
        checks
            .lanes
            .lock()
            .unwrap()
            .values()
            .map(|l| l.waiting.len())
            .sum()
    }

    async fn until_waiting(checks: &CreditChecks<Recorded>, n: usize) {
        o2c_testkit::eventually(Duration::from_secs(10), || async {
            (waiting(checks) >= n).then_some(())
        })
        .await
        .expect("the checks wait");
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
        assert!(checks.lanes.lock().unwrap().is_empty());
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
        assert!(checks.lanes.lock().unwrap().is_empty());
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
        assert_eq!(waiting(&checks), 0);
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
        // The first caller goes away too: its call still ends, and the
        // check that waited is sent.
        first.abort();
        credit.gate.add_permits(2);
        assert_eq!(ordered(kept.await.unwrap()), "o-kept");
        assert_eq!(
            credit.calls()[1],
            ("many", vec!["o-kept".to_owned()]),
            "only the check whose caller still waits is sent"
        );
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
        o2c_testkit::eventually(Duration::from_secs(10), || async {
            checks.lanes.lock().unwrap().is_empty().then_some(())
        })
        .await
        .expect("the lane empties");
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
        let mut alone: Vec<_> = credit
            .calls()
            .into_iter()
            .map(|(k, o)| (k, o[0].clone()))
            .collect();
        alone.sort();
        assert_eq!(
            alone,
            vec![
                ("alone", "bad-3".to_owned()),
                ("alone", "o-1".to_owned()),
                ("alone", "o-2".to_owned())
            ]
        );
    }
}
