//! The transactional outbox (producers) and inbox (consumers).
//!
//! A producer records its events with [`record`] in the same database
//! transaction as the change, one row per subscriber, so the change and its
//! events commit or vanish together. A [`Relay`] delivers them at least
//! once over gRPC (`o2c.events.v1.EventsService/Deliver`), oldest first, so
//! events of one aggregate arrive in order; a failed batch is retried with
//! capped, jittered exponential backoff and nothing after it is sent
//! meanwhile. A consumer ([`Inbox`]) applies each event exactly once by
//! recording its id in the transaction of its effect ([`first_delivery`],
//! or one statement for a whole delivery).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use o2c_proto::events::v1 as pb;
use o2c_proto::events::v1::events_service_client::EventsServiceClient;
use o2c_proto::events::v1::events_service_server::{EventsService, EventsServiceServer};
use prost::Message;
use sea_orm::ActiveValue::Set;
use sea_orm::entity::prelude::*;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, QueryOrder, QuerySelect, QueryTrait,
    TransactionTrait,
};
use tracing::Instrument;

use crate::ApiError;
use crate::client::TracedChannel;
use crate::db::is_unique_violation;

/// Events sent per delivery call.
pub const BATCH: u64 = 256;
/// First and largest retry delay of a failed delivery.
pub const RETRY_BASE_MS: i64 = 200;
pub const RETRY_MAX_MS: i64 = 60_000;

pub mod outbox_entity {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "outbox_events")]
    pub struct Model {
        /// The event id (UUID v7: creation order).
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub subscriber: String,
        /// The encoded `o2c.events.v1.Event`.
        pub payload: Vec<u8>,
        pub attempts: i32,
        #[sea_orm(indexed)]
        pub next_attempt_at: DateTimeUtc,
        pub created_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod inbox_entity {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "inbox_events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub event_id: String,
        /// Indexed for pruning (see [`InboxIndex`](super::InboxIndex)).
        #[sea_orm(indexed)]
        pub received_at: DateTimeUtc,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

/// The migration creating `outbox_events` and `inbox_events`.
pub struct Migration;

impl sea_orm_migration::MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261204_000002_outbox_inbox"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl sea_orm_migration::MigrationTrait for Migration {
    async fn up(&self, manager: &sea_orm_migration::SchemaManager) -> Result<(), DbErr> {
        crate::db::create_table_for(manager, outbox_entity::Entity).await?;
        crate::db::create_table_for(manager, inbox_entity::Entity).await
    }

    async fn down(&self, manager: &sea_orm_migration::SchemaManager) -> Result<(), DbErr> {
        crate::db::drop_table_for(manager, inbox_entity::Entity).await?;
        crate::db::drop_table_for(manager, outbox_entity::Entity).await
    }
}

/// The index pruning the inbox uses; databases created before it existed
/// get it here (new ones already have it from [`Migration`]).
pub struct InboxIndex;

impl sea_orm_migration::MigrationName for InboxIndex {
    fn name(&self) -> &str {
        "m20261205_000004_inbox_received_at"
    }
}

#[sea_orm_migration::async_trait::async_trait]
impl sea_orm_migration::MigrationTrait for InboxIndex {
    async fn up(&self, manager: &sea_orm_migration::SchemaManager) -> Result<(), DbErr> {
        let schema = sea_orm::Schema::new(manager.get_database_backend());
        for mut index in schema.create_index_from_entity(inbox_entity::Entity) {
            manager
                .create_index(index.if_not_exists().to_owned())
                .await?;
        }
        Ok(())
    }

    async fn down(&self, _manager: &sea_orm_migration::SchemaManager) -> Result<(), DbErr> {
        Ok(())
    }
}

/// A span for applying `event` that continues the producer's trace.
pub fn consumer_span(event: &pb::Event, consumer: &'static str) -> tracing::Span {
    let span = tracing::info_span!(
        "event.consume",
        otel.kind = "consumer",
        messaging.consumer = consumer,
        event.id = %event.event_id,
        aggregate.kind = %event.aggregate_type,
    );
    crate::telemetry::continue_trace(&span, &event.traceparent, &event.tracestate);
    span
}

/// The configured subscribers among those that take an event kind.
pub fn route(configured: &[String], takers: &[&str]) -> Vec<String> {
    configured
        .iter()
        .filter(|name| takers.contains(&name.as_str()))
        .cloned()
        .collect()
}

/// Puts the current span's W3C trace context on `event`.
fn stamp_trace(event: &mut pb::Event) {
    (event.traceparent, event.tracestate) = crate::telemetry::current_trace_context();
}

/// Records `event` for every subscriber in the caller's transaction.
pub async fn record(
    conn: &impl ConnectionTrait,
    subscribers: &[String],
    event: pb::Event,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    record_all(conn, subscribers, vec![event], now).await
}

/// Records `events`, in this order, for every subscriber in the caller's
/// transaction, in one statement.
pub async fn record_all(
    conn: &impl ConnectionTrait,
    subscribers: &[String],
    events: Vec<pb::Event>,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    if let Some(insert) = insert_all(subscribers, events, now) {
        conn.execute(&insert).await?;
    }
    Ok(())
}

/// The statement [`record_all`] runs, for a caller that runs it as part of
/// a larger one (None when there is nothing to record).
pub fn insert_all(
    subscribers: &[String],
    events: Vec<pb::Event>,
    now: DateTime<Utc>,
) -> Option<sea_orm::sea_query::InsertStatement> {
    if subscribers.is_empty() || events.is_empty() {
        return None;
    }
    let mut rows = Vec::with_capacity(events.len() * subscribers.len());
    for mut event in events {
        if event.event_id.is_empty() {
            // Version-7 ids are time-ordered: the relay delivers by id.
            event.event_id = uuid::Uuid::now_v7().to_string();
        }
        event.occurred_at = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        stamp_trace(&mut event);
        let payload = event.encode_to_vec();
        for subscriber in subscribers {
            rows.push(outbox_entity::ActiveModel {
                id: Set(event.event_id.clone()),
                subscriber: Set(subscriber.clone()),
                payload: Set(payload.clone()),
                attempts: Set(0),
                next_attempt_at: Set(now),
                created_at: Set(now),
            });
        }
    }
    Some(outbox_entity::Entity::insert_many(rows).into_query())
}

/// Records the delivery of `event_id` in the consumer's transaction: true
/// the first time, false for a redelivery (whose effect is already there).
pub async fn first_delivery(
    conn: &impl ConnectionTrait,
    event_id: &str,
    now: DateTime<Utc>,
) -> Result<bool, ApiError> {
    let inserted = inbox_entity::Entity::insert(inbox_entity::ActiveModel {
        event_id: Set(event_id.to_owned()),
        received_at: Set(now),
    })
    .exec(conn)
    .await;
    match inserted {
        Ok(_) => Ok(true),
        Err(error) if is_unique_violation(&error) => Ok(false),
        Err(error) => Err(error.into()),
    }
}

/// How long a consumer remembers an event it applied. A redelivery comes
/// from a producer that died between the consumer's commit and its own
/// delete, and resumes when that producer restarts: far sooner than this.
pub const INBOX_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Forgets applied events older than `retention`; returns how many.
pub async fn prune_inbox(db: &DatabaseConnection, retention: Duration) -> Result<u64, ApiError> {
    let cutoff = Utc::now()
        - chrono::Duration::from_std(retention)
            .map_err(|e| ApiError::Internal(format!("inbox retention: {e}")))?;
    let result = inbox_entity::Entity::delete_many()
        .filter(inbox_entity::Column::ReceivedAt.lt(cutoff))
        .exec(db)
        .await?;
    Ok(result.rows_affected)
}

/// Whether `event_id` was applied before (read-only check before work).
pub async fn seen(conn: &impl ConnectionTrait, event_id: &str) -> Result<bool, ApiError> {
    Ok(inbox_entity::Entity::find_by_id(event_id.to_owned())
        .one(conn)
        .await?
        .is_some())
}

/// What a service does with the events delivered to it.
#[tonic::async_trait]
pub trait Consumer: Send + Sync + 'static {
    /// The consuming service, as spans name it (e.g. `crm-sync`).
    const NAME: &'static str;

    /// What the effect of one event leaves for after its commit.
    type Applied: Send;

    /// Applies `event` in `txn`, which also records its delivery: both
    /// commit together or neither does. Events of kinds the consumer does
    /// not use are applied as nothing. An error fails the delivery, which
    /// the producer's relay retries from this event on.
    async fn apply(
        &self,
        txn: &DatabaseTransaction,
        event: &pb::Event,
    ) -> Result<Self::Applied, ApiError>;

    /// Applies `events`, in the order delivered, in `txn` (see
    /// [`Self::apply`]): one after another by default, each in a span that
    /// continues its producer's trace. A consumer may apply them set-wise
    /// when the effect is the same as one after another.
    async fn apply_all(
        &self,
        txn: &DatabaseTransaction,
        events: &[&pb::Event],
    ) -> Result<Vec<Self::Applied>, ApiError> {
        let mut applied = Vec::with_capacity(events.len());
        for event in events {
            applied.push(
                self.apply(txn, event)
                    .instrument(consumer_span(event, Self::NAME))
                    .await?,
            );
        }
        Ok(applied)
    }

    /// Runs after the effect committed (cache refresh, live
    /// notifications): work that may be lost without losing the effect.
    async fn committed(&self, _applied: Self::Applied) {}
}

/// Serves `o2c.events.v1.EventsService` for a [`Consumer`]: the events of a
/// delivery in the order delivered, in one transaction with their inbox
/// records (each event, should that fail, in its own), each applied in a
/// span that continues its producer's trace.
pub struct Inbox<C> {
    db: DatabaseConnection,
    consumer: C,
}

impl<C: Consumer> Inbox<C> {
    pub fn new(db: DatabaseConnection, consumer: C) -> Self {
        Self { db, consumer }
    }

    /// The tonic service to add to a server's routes. Also starts an
    /// hourly pruning of the inbox past [`INBOX_RETENTION`], until the
    /// service stops ([`crate::background`]).
    pub fn into_server(self) -> EventsServiceServer<Self> {
        let db = self.db.clone();
        crate::background::every(
            Duration::from_secs(3600),
            crate::background::First::Now,
            move || {
                let db = db.clone();
                async move {
                    match prune_inbox(&db, INBOX_RETENTION).await {
                        Ok(0) => {}
                        Ok(pruned) => tracing::info!(pruned, "inbox pruned"),
                        Err(error) => {
                            tracing::warn!(%error, "inbox pruning failed; retrying next hour")
                        }
                    }
                }
            },
        );
        EventsServiceServer::new(self)
    }

    /// Applies `events` in one transaction, with one statement that reads
    /// which were applied before and one that records the rest as applied;
    /// an error rolls all of them back.
    async fn deliver_together(&self, events: &[pb::Event]) -> Result<(), ApiError> {
        let txn = self.db.begin().await?;
        let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
        let mut done: std::collections::HashSet<String> = inbox_entity::Entity::find()
            .filter(inbox_entity::Column::EventId.is_in(ids))
            .all(&txn)
            .await?
            .into_iter()
            .map(|row| row.event_id)
            .collect();
        let now = Utc::now();
        // Less what was applied before, or is in the delivery twice.
        let fresh: Vec<&pb::Event> = events
            .iter()
            .filter(|event| done.insert(event.event_id.clone()))
            .collect();
        let applied = self.consumer.apply_all(&txn, &fresh).await?;
        let received = fresh.iter().map(|event| inbox_entity::ActiveModel {
            event_id: Set(event.event_id.clone()),
            received_at: Set(now),
        });
        // A concurrent delivery of one of them fails this on its inbox row:
        // the caller rolls back and applies them one by one.
        inbox_entity::Entity::insert_many(received)
            .exec_without_returning(&txn)
            .await?;
        txn.commit().await?;
        for applied in applied {
            self.consumer.committed(applied).await;
        }
        Ok(())
    }

    async fn deliver_one(&self, event: &pb::Event) -> Result<(), ApiError> {
        let txn = self.db.begin().await?;
        if !first_delivery(&txn, &event.event_id, Utc::now()).await? {
            // A redelivery: its effect is already committed.
            return Ok(());
        }
        let applied = self.consumer.apply(&txn, event).await?;
        txn.commit().await?;
        self.consumer.committed(applied).await;
        Ok(())
    }
}

#[tonic::async_trait]
impl<C: Consumer> EventsService for Inbox<C> {
    async fn deliver(
        &self,
        request: tonic::Request<pb::DeliverRequest>,
    ) -> Result<tonic::Response<pb::DeliverResponse>, tonic::Status> {
        let events = &request.get_ref().events;
        // Most deliveries apply in one transaction; one that fails is
        // applied again one event at a time, so the events before a
        // failing one commit and the relay retries from that one on.
        if events.len() > 1 {
            match self.deliver_together(events).await {
                Ok(()) => return Ok(tonic::Response::new(pb::DeliverResponse {})),
                Err(error) => {
                    tracing::debug!(%error, "applying a delivery together failed; one by one")
                }
            }
        }
        for event in events {
            self.deliver_one(event)
                .instrument(consumer_span(event, C::NAME))
                .await?;
        }
        Ok(tonic::Response::new(pb::DeliverResponse {}))
    }
}

/// Delivers recorded events to their subscribers.
#[derive(Clone)]
pub struct Relay {
    db: DatabaseConnection,
    subscribers: BTreeMap<String, EventsServiceClient<TracedChannel>>,
    /// Each subscriber's backlog as last counted, and when: passes that
    /// drain a backlog back to back count it at most once a
    /// [`BACKLOG_COUNT_INTERVAL`].
    counted: std::sync::Arc<std::sync::Mutex<HashMap<String, (std::time::Instant, u64)>>>,
}

/// How often a relay draining a backlog counts it for its gauge.
pub const BACKLOG_COUNT_INTERVAL: Duration = Duration::from_secs(1);

fn backoff(attempts: i32) -> chrono::Duration {
    let exponent = u32::try_from(attempts.clamp(0, 16)).unwrap_or(16);
    let delay = RETRY_BASE_MS
        .saturating_mul(1i64 << exponent)
        .min(RETRY_MAX_MS);
    // Up to 50 % jitter so many producers do not retry in step.
    let jitter = i64::try_from(uuid::Uuid::new_v4().as_u128() % 1_000).unwrap_or(0) * delay / 2_000;
    chrono::Duration::milliseconds(delay + jitter)
}

impl Relay {
    /// A relay for `subscribers` (name → address of its EventsService).
    pub fn new(
        db: DatabaseConnection,
        subscribers: &BTreeMap<String, String>,
        call_timeout: Duration,
    ) -> Result<Self, crate::client::InvalidAddress> {
        let mut clients = BTreeMap::new();
        for (name, url) in subscribers {
            clients.insert(
                name.clone(),
                EventsServiceClient::new(crate::client::channel(url, call_timeout)?),
            );
        }
        Ok(Self {
            db,
            subscribers: clients,
            counted: std::sync::Arc::default(),
        })
    }

    /// The subscriber names events must be recorded for.
    pub fn subscriber_names(&self) -> Vec<String> {
        self.subscribers.keys().cloned().collect()
    }

    /// One pass: delivers due events to every subscriber; returns how many
    /// were delivered. A subscriber whose delivery fails (or whose oldest
    /// events cannot be read) does not hold up the others.
    pub async fn run_once(&self) -> Result<usize, ApiError> {
        let now = Utc::now();
        let mut delivered = 0;
        let mut failed = None;
        for (name, client) in &self.subscribers {
            match self.deliver_to(name, client, now).await {
                Ok(count) => delivered += count,
                Err(error) => {
                    tracing::warn!(subscriber = %name, %error, "event relay pass failed for subscriber");
                    failed = Some(error);
                }
            }
        }
        match failed {
            Some(error) if delivered == 0 => Err(error),
            _ => Ok(delivered),
        }
    }

    /// Delivers the oldest due batch to one subscriber.
    async fn deliver_to(
        &self,
        name: &str,
        client: &EventsServiceClient<TracedChannel>,
        now: DateTime<Utc>,
    ) -> Result<usize, ApiError> {
        // Oldest first; a subscriber that is backing off is skipped whole,
        // so later events never overtake earlier ones.
        let rows = outbox_entity::Entity::find()
            .filter(outbox_entity::Column::Subscriber.eq(name))
            .order_by_asc(outbox_entity::Column::Id)
            .limit(BATCH)
            .all(&self.db)
            .await?;
        let Some(first) = rows.first() else {
            crate::metrics::outbox(name, 0, Duration::ZERO);
            return Ok(0);
        };
        let waiting = (now - first.created_at).to_std().unwrap_or(Duration::ZERO);
        // A short batch is the whole backlog; only a full one needs counting.
        let pending = if (rows.len() as u64) < BATCH {
            rows.len() as u64
        } else {
            self.backlog(name).await?
        };
        crate::metrics::outbox(name, pending, waiting);
        if first.next_attempt_at > now {
            return Ok(0);
        }
        let events = rows
            .iter()
            .map(|row| pb::Event::decode(row.payload.as_slice()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ApiError::Internal(format!("undecodable outbox event: {e}")))?;
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        let mut client = client.clone();
        let delivery = crate::auth::scope(
            crate::auth::CallContext::service(),
            client.deliver(pb::DeliverRequest { events }),
        )
        .await;
        match delivery {
            Ok(_) => {
                outbox_entity::Entity::delete_many()
                    .filter(outbox_entity::Column::Subscriber.eq(name))
                    .filter(outbox_entity::Column::Id.is_in(ids))
                    .exec(&self.db)
                    .await?;
                Ok(rows.len())
            }
            Err(status) => {
                let attempts = first.attempts + 1;
                tracing::warn!(subscriber = %name, attempts, %status, "event delivery failed; backing off");
                outbox_entity::Entity::update_many()
                    .col_expr(outbox_entity::Column::Attempts, Expr::value(attempts))
                    .col_expr(
                        outbox_entity::Column::NextAttemptAt,
                        Expr::value(now + backoff(attempts)),
                    )
                    .filter(outbox_entity::Column::Subscriber.eq(name))
                    .filter(outbox_entity::Column::Id.is_in(ids))
                    .exec(&self.db)
                    .await?;
                Ok(0)
            }
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, (std::time::Instant, u64)>> {
        // A map of plain values: consistent whatever a panicking holder did.
        self.counted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Events waiting for `subscriber`, as counted within the last
    /// [`BACKLOG_COUNT_INTERVAL`].
    async fn backlog(&self, subscriber: &str) -> Result<u64, ApiError> {
        let recent = self
            .counts()
            .get(subscriber)
            .filter(|(at, _)| at.elapsed() < BACKLOG_COUNT_INTERVAL)
            .map(|(_, count)| *count);
        if let Some(count) = recent {
            return Ok(count);
        }
        let count = self.pending(subscriber).await?;
        self.counts()
            .insert(subscriber.to_owned(), (std::time::Instant::now(), count));
        Ok(count)
    }

    /// Events waiting for `subscriber`.
    pub async fn pending(&self, subscriber: &str) -> Result<u64, ApiError> {
        Ok(outbox_entity::Entity::find()
            .filter(outbox_entity::Column::Subscriber.eq(subscriber))
            .count(&self.db)
            .await?)
    }

    /// Runs passes every `interval` until its service stops
    /// ([`crate::background`]), and passes back to back while they
    /// deliver full batches, so a backlog drains at the speed of delivery
    /// rather than a batch per interval.
    pub fn spawn(self, interval: Duration) {
        crate::background::every(interval, crate::background::First::Now, move || {
            let relay = self.clone();
            async move {
                loop {
                    match relay.run_once().await {
                        // Another full batch may wait, unless the service
                        // is stopping.
                        Ok(delivered)
                            if delivered as u64 >= BATCH && !crate::background::stopping() => {}
                        Ok(_) => break,
                        Err(error) => {
                            tracing::warn!(%error, "event relay pass failed; retrying next interval");
                            break;
                        }
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{TraceContextExt, TracerProvider};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[tokio::test]
    async fn pruning_forgets_only_old_deliveries() {
        use sea_orm_migration::MigrationTrait;
        let db = sea_orm::Database::connect("sqlite::memory:").await.unwrap();
        let manager = sea_orm_migration::SchemaManager::new(&db);
        Migration.up(&manager).await.unwrap();
        InboxIndex.up(&manager).await.unwrap();
        let now = Utc::now();
        for (id, age_days) in [("old", 31), ("recent", 29), ("new", 0)] {
            inbox_entity::Entity::insert(inbox_entity::ActiveModel {
                event_id: Set(id.into()),
                received_at: Set(now - chrono::Duration::days(age_days)),
            })
            .exec(&db)
            .await
            .unwrap();
        }
        assert_eq!(prune_inbox(&db, INBOX_RETENTION).await.unwrap(), 1);
        assert!(!seen(&db, "old").await.unwrap());
        assert!(seen(&db, "recent").await.unwrap());
        assert!(seen(&db, "new").await.unwrap());
        // A pruned event delivered again would apply again: the retention
        // is far beyond any redelivery, which is why it is a month.
        assert!(
            first_delivery(&db, "recent", now)
                .await
                .is_ok_and(|first| !first)
        );
    }

    #[test]
    fn the_consumer_span_continues_the_producers_trace() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let producer = tracing::info_span!("producer");
            let producer_context = producer.context();
            let producer_span = producer_context.span();
            let expected = producer_span.span_context();
            assert!(expected.is_valid());
            let mut event = pb::Event {
                event_id: "e-1".into(),
                ..Default::default()
            };
            producer.in_scope(|| stamp_trace(&mut event));
            assert!(
                event.traceparent.starts_with("00-"),
                "{}",
                event.traceparent
            );
            let consumer = consumer_span(&event, "test");
            let consumer_context = consumer.context();
            let consumer_span = consumer_context.span();
            let continued = consumer_span.span_context();
            assert_eq!(continued.trace_id(), expected.trace_id(), "same trace");
            assert_ne!(continued.span_id(), expected.span_id(), "a new span in it");
        });
    }
}
