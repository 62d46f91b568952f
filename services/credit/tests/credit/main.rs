//! The credit service over real gRPC on 127.0.0.1:0, against a real
//! database per test (SQLite, and PostgreSQL with Redis).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use o2c_proto::common::v1::Money;
use o2c_proto::credit::v1 as pb;
use o2c_proto::credit::v1::credit_service_client::CreditServiceClient;
use o2c_proto::invoicing::v1 as invoicing_pb;
use o2c_testkit::{Backend, Served, TestDatabase, assert_invalid};
use tonic::Code;
use tonic::transport::Channel;

pub const TENANT: &str = "tenant-a";

mod policy;

pub struct Harness {
    pub client: CreditServiceClient<Channel>,
    pub served: Served,
    pub maintenance: o2c_credit::Maintenance,
    pub relay: o2c_kit::outbox::Relay,
    pub batches: std::sync::Arc<o2c_credit::grpc::Batcher>,
    pub clock: ManualClock,
    pub db: TestDatabase,
}

/// A clock tests move by hand.
#[derive(Clone)]
pub struct ManualClock(Arc<std::sync::Mutex<chrono::DateTime<chrono::Utc>>>);

impl ManualClock {
    fn new() -> Self {
        Self(Arc::new(std::sync::Mutex::new(chrono::Utc::now())))
    }

    pub fn advance(&self, by: chrono::Duration) {
        let mut now = self.0.lock().unwrap();
        *now += by;
    }

    pub fn today(&self) -> chrono::NaiveDate {
        self.0.lock().unwrap().date_naive()
    }

    fn clock(&self) -> o2c_credit::Clock {
        let inner = self.0.clone();
        Arc::new(move || *inner.lock().unwrap())
    }
}

async fn start(backend: Backend, name: &str) -> Option<Harness> {
    start_with(backend, name, o2c_credit::CreditSettings::default(), None).await
}

/// Starts the credit service with `settings`, on a manual clock, with
/// Redis on PostgreSQL runs (or at `redis_override`).
pub async fn start_with(
    backend: Backend,
    name: &str,
    settings: o2c_credit::CreditSettings,
    redis_override: Option<String>,
) -> Option<Harness> {
    let db = o2c_testkit::database(backend, name).await?;
    let redis = match (redis_override, backend) {
        (Some(url), _) => Some(url),
        (None, Backend::Postgres) => o2c_testkit::redis_url().await,
        (None, Backend::Sqlite) => None,
    };
    let mut service = o2c_kit::settings::ServiceSettings::local("credit", 0);
    service.database_url = db.url.clone();
    let clock = ManualClock::new();
    let built = o2c_credit::build_with(&service, redis.as_deref(), &settings, clock.clock())
        .await
        .unwrap();
    let served = o2c_testkit::serve(o2c_credit::SERVICE_NAME, built.routes).await;
    let client = CreditServiceClient::new(served.channel().await);
    Some(Harness {
        client,
        served,
        maintenance: built.maintenance,
        relay: built.relay,
        batches: built.batches,
        clock,
        db,
    })
}

pub fn eur(amount: &str) -> Option<Money> {
    Some(Money {
        amount: amount.into(),
        currency_code: "EUR".into(),
    })
}

pub fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub async fn open_with_limit(client: &mut CreditServiceClient<Channel>, limit: &str) -> String {
    let customer = uuid::Uuid::now_v7().to_string();
    client
        .open_credit_account(pb::OpenCreditAccountRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
            currency_code: "EUR".into(),
            parent_customer_id: String::new(),
        })
        .await
        .unwrap();
    client
        .set_credit_limit(pb::SetCreditLimitRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
            credit_limit: eur(limit),
            reason: "test".into(),
            actor: "analyst-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    customer
}

pub async fn reserve(
    client: &mut CreditServiceClient<Channel>,
    customer: &str,
    order: &str,
    amount: &str,
) -> pb::CreditDecision {
    client
        .check_and_reserve(pb::CheckAndReserveRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: customer.into(),
            order_id: order.into(),
            amount: eur(amount),
            client_reference: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .decision
        .unwrap()
}

pub async fn exposure(client: &mut CreditServiceClient<Channel>, customer: &str) -> pb::Exposure {
    client
        .get_exposure(pb::GetExposureRequest {
            tenant_id: TENANT.into(),
            customer_id: customer.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .exposure
        .unwrap()
}

pub async fn assert_consistent(
    client: &mut CreditServiceClient<Channel>,
    customer: &str,
) -> pb::Exposure {
    let check = client
        .recompute_exposure(pb::RecomputeExposureRequest {
            tenant_id: TENANT.into(),
            customer_id: customer.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        check.consistent,
        "stored {:?} != ledger {:?}",
        check.stored, check.recomputed
    );
    assert_eq!(check.stored, check.recomputed);
    check.stored.unwrap()
}

/// An invoice snapshot as invoicing would send it (EUR, net terms).
pub fn invoice(
    customer: &str,
    order_id: &str,
    invoice_id: &str,
    total: &str,
    open: &str,
    due_date: &str,
) -> invoicing_pb::Invoice {
    let status = if open == "0.00" {
        invoicing_pb::InvoiceStatus::Paid
    } else if open == total {
        invoicing_pb::InvoiceStatus::Open
    } else {
        invoicing_pb::InvoiceStatus::PartiallyPaid
    };
    invoicing_pb::Invoice {
        invoice_id: invoice_id.into(),
        tenant_id: TENANT.into(),
        customer_id: customer.into(),
        order_id: order_id.into(),
        currency_code: "EUR".into(),
        total: eur(total),
        amount_open: eur(open),
        status: status as i32,
        due_date: due_date.into(),
        ..Default::default()
    }
}

/// Sends `invoice` to credit as the gateway does.
pub async fn sync(
    client: &mut CreditServiceClient<Channel>,
    invoice: invoicing_pb::Invoice,
) -> pb::SyncReceivableResponse {
    client
        .sync_receivable(pb::SyncReceivableRequest {
            tenant_id: TENANT.into(),
            invoice: Some(invoice),
        })
        .await
        .unwrap()
        .into_inner()
}

pub fn amount(m: &Option<Money>) -> &str {
    &m.as_ref().unwrap().amount
}

async fn ledger_lifecycle(backend: Backend) {
    let Some(mut h) = start(backend, "ledger").await else {
        return;
    };
    let customer = open_with_limit(&mut h.client, "1000.00").await;

    let approved = reserve(&mut h.client, &customer, "order-1", "400.00").await;
    assert_eq!(approved.decision(), pb::Decision::Approve);
    assert!(approved.reasons.is_empty());
    assert!(!approved.reservation_id.is_empty());

    let held = reserve(&mut h.client, &customer, "order-2", "700.00").await;
    assert_eq!(held.decision(), pb::Decision::Hold);
    assert_eq!(
        held.reasons().collect::<Vec<_>>(),
        [pb::ReasonCode::OverLimit]
    );
    assert!(held.reservation_id.is_empty());

    let invoice_id = uuid::Uuid::now_v7().to_string();
    let snapshot = |open: &str| invoice(&customer, "order-1", &invoice_id, "400.00", open, "");
    let converted = sync(&mut h.client, snapshot("400.00")).await;
    let reservation = converted.converted.unwrap();
    assert_eq!(reservation.reservation_id, approved.reservation_id);
    assert_eq!(reservation.state(), pb::ReservationState::Converted);
    let e = converted.exposure.unwrap();
    assert_eq!(amount(&e.reserved), "0.00");
    assert_eq!(amount(&e.receivables), "400.00");

    // A reservation resolves exactly once.
    let again = h
        .client
        .release_reservation(pb::ReleaseReservationRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            reservation_id: approved.reservation_id.clone(),
            reason: "cancel".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);

    // 150.00 paid: the open amount falls.
    let settled = sync(&mut h.client, snapshot("250.00"))
        .await
        .exposure
        .unwrap();
    assert_eq!(amount(&settled.receivables), "250.00");
    assert_eq!(amount(&settled.available), "750.00");

    // A repeated or stale snapshot (the event arriving after the call, or
    // an older one late) changes nothing: the open amount only falls.
    for stale in ["250.00", "400.00"] {
        let unchanged = sync(&mut h.client, snapshot(stale)).await;
        assert!(unchanged.converted.is_none());
        let e = unchanged.exposure.unwrap();
        assert_eq!(amount(&e.receivables), "250.00", "after {stale}");
        assert_eq!(e.version, settled.version, "after {stale}");
    }

    // An open amount above the total is refused and changes nothing.
    let bad = h
        .client
        .sync_receivable(pb::SyncReceivableRequest {
            tenant_id: TENANT.into(),
            invoice: Some(snapshot("400.01")),
        })
        .await
        .unwrap_err();
    assert_invalid(&bad, "invoice.amount_open");

    // A standalone invoice (no order) becomes a receivable of its own.
    let standalone = uuid::Uuid::now_v7().to_string();
    let e = sync(
        &mut h.client,
        invoice(&customer, "", &standalone, "50.00", "50.00", ""),
    )
    .await
    .exposure
    .unwrap();
    assert_eq!(amount(&e.receivables), "300.00");
    let e = sync(
        &mut h.client,
        invoice(&customer, "", &standalone, "50.00", "0.00", ""),
    )
    .await
    .exposure
    .unwrap();
    assert_eq!(amount(&e.receivables), "250.00");

    let read = exposure(&mut h.client, &customer).await;
    assert_eq!(amount(&read.total), "250.00");
    let stored = assert_consistent(&mut h.client, &customer).await;
    assert_eq!(stored.version, read.version);
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_lifecycle_sqlite() {
    ledger_lifecycle(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_lifecycle_postgres() {
    ledger_lifecycle(Backend::Postgres).await;
}

async fn idempotency(backend: Backend) {
    let Some(mut h) = start(backend, "idem").await else {
        return;
    };
    let customer = open_with_limit(&mut h.client, "100.00").await;
    let request = pb::CheckAndReserveRequest {
        idempotency_key: "same-key".into(),
        tenant_id: TENANT.into(),
        customer_id: customer.clone(),
        order_id: "order-1".into(),
        amount: eur("60.00"),
        client_reference: String::new(),
    };
    let first = h
        .client
        .check_and_reserve(request.clone())
        .await
        .unwrap()
        .into_inner();
    let replay = h
        .client
        .check_and_reserve(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, replay, "a replay returns the first response");
    assert_eq!(
        amount(&exposure(&mut h.client, &customer).await.reserved),
        "60.00"
    );

    let mut changed = request.clone();
    changed.amount = eur("10.00");
    let status = h.client.check_and_reserve(changed).await.unwrap_err();
    assert_invalid(&status, "idempotency_key");
    assert_eq!(
        amount(&exposure(&mut h.client, &customer).await.reserved),
        "60.00"
    );

    // The same order cannot be reserved twice under another key.
    let mut second = request.clone();
    second.idempotency_key = key();
    let status = h.client.check_and_reserve(second).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_consistent(&mut h.client, &customer).await;
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_sqlite() {
    idempotency(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_postgres() {
    idempotency(Backend::Postgres).await;
}

/// The checks of several orders in one call: each answered as alone,
/// in order, decided in one batch, and replayed under its own key.
async fn checks_in_one_call(backend: Backend) {
    let Some(mut h) = start(backend, "many").await else {
        return;
    };
    let a = open_with_limit(&mut h.client, "100.00").await;
    let b = open_with_limit(&mut h.client, "100.00").await;
    let check = |customer: &str, order: &str, amount: &str| pb::BatchedCheck {
        check: Some(pb::CheckAndReserveRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: customer.into(),
            order_id: order.into(),
            amount: eur(amount),
            client_reference: String::new(),
        }),
        ..Default::default()
    };
    let mut bad = check(&a, "order-bad", "10.00");
    bad.check.as_mut().unwrap().customer_id = "not-an-id".into();
    bad.check.as_mut().unwrap().amount = eur("-1.00");
    let request = pb::CheckAndReserveManyRequest {
        checks: vec![
            check(&a, "order-1", "60.00"),
            bad,
            check(&a, "order-2", "60.00"),
            check(&b, "order-3", "10.00"),
            pb::BatchedCheck::default(),
        ],
    };
    let before = h.batches.timings();
    let results = h
        .client
        .check_and_reserve_many(request.clone())
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(
        h.batches.timings().since(&before).batches(),
        1,
        "the call's checks share one batch"
    );
    assert_eq!(results.len(), 5);
    let decision = |i: usize| match &results[i].result {
        Some(pb::batched_check_result::Result::Response(r)) => r.decision.clone().unwrap(),
        other => panic!("check {i}: {other:?}"),
    };
    let error = |i: usize| match &results[i].result {
        Some(pb::batched_check_result::Result::Error(e)) => tonic::Status::with_details(
            Code::from(e.code),
            e.message.clone(),
            e.details.clone().into(),
        ),
        other => panic!("check {i}: {other:?}"),
    };
    assert_eq!(decision(0).order_id, "order-1");
    assert_eq!(decision(0).decision(), pb::Decision::Approve);
    // The bad check is refused as CheckAndReserve refuses it: every field.
    assert_invalid(&error(1), "customer_id");
    assert_invalid(&error(1), "amount.amount");
    // Over the limit after the first: decided, not approved.
    assert_eq!(decision(2).order_id, "order-2");
    assert_ne!(decision(2).decision(), pb::Decision::Approve);
    assert!(decision(2).reservation_id.is_empty());
    assert_eq!(decision(3).decision(), pb::Decision::Approve);
    assert_invalid(&error(4), "idempotency_key");
    assert_eq!(
        amount(&assert_consistent(&mut h.client, &a).await.reserved),
        "60.00"
    );
    assert_eq!(
        amount(&assert_consistent(&mut h.client, &b).await.reserved),
        "10.00"
    );

    // Each check is idempotent under its own key: the same call again
    // answers the same decisions and reserves nothing more; one check
    // alone answers what it answered in the call.
    let again = h
        .client
        .check_and_reserve_many(request.clone())
        .await
        .unwrap()
        .into_inner()
        .results;
    for i in [0, 2, 3] {
        assert_eq!(again[i], results[i], "check {i} replayed");
    }
    let alone = h
        .client
        .check_and_reserve(request.checks[0].check.clone().unwrap())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(alone.decision.unwrap(), decision(0));
    assert_eq!(
        amount(&assert_consistent(&mut h.client, &a).await.reserved),
        "60.00"
    );

    // An empty call, or one of too many, is refused whole.
    let status = h
        .client
        .check_and_reserve_many(pb::CheckAndReserveManyRequest::default())
        .await
        .unwrap_err();
    assert_invalid(&status, "checks");
    let too_many = pb::CheckAndReserveManyRequest {
        checks: (0..=o2c_credit::grpc::MAX_BATCHED_CHECKS)
            .map(|n| check(&b, &format!("order-many-{n}"), "0.01"))
            .collect(),
    };
    let status = h.client.check_and_reserve_many(too_many).await.unwrap_err();
    assert_invalid(&status, "checks");
    assert_eq!(
        amount(&assert_consistent(&mut h.client, &b).await.reserved),
        "10.00"
    );
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_in_one_call_sqlite() {
    checks_in_one_call(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_in_one_call_postgres() {
    checks_in_one_call(Backend::Postgres).await;
}

async fn bad_input(backend: Backend) {
    let Some(mut h) = start(backend, "bad").await else {
        return;
    };
    let customer = open_with_limit(&mut h.client, "100.00").await;
    let good = pb::CheckAndReserveRequest {
        idempotency_key: key(),
        tenant_id: TENANT.into(),
        customer_id: customer.clone(),
        order_id: "order-1".into(),
        amount: eur("10.00"),
        client_reference: String::new(),
    };
    type Change = Box<dyn Fn(&mut pb::CheckAndReserveRequest)>;
    let cases: Vec<(&str, Change)> = vec![
        ("idempotency_key", Box::new(|r| r.idempotency_key.clear())),
        ("tenant_id", Box::new(|r| r.tenant_id.clear())),
        (
            "customer_id",
            Box::new(|r| r.customer_id = "not-an-id".into()),
        ),
        ("order_id", Box::new(|r| r.order_id.clear())),
        ("amount", Box::new(|r| r.amount = None)),
        ("amount.amount", Box::new(|r| r.amount = eur("-5.00"))),
        ("amount.amount", Box::new(|r| r.amount = eur("0"))),
        ("amount.amount", Box::new(|r| r.amount = eur("1.001"))),
        ("amount.amount", Box::new(|r| r.amount = eur("ten"))),
        (
            "amount.currency_code",
            Box::new(|r| r.amount.as_mut().unwrap().currency_code = "XYZ".into()),
        ),
        (
            "amount.currency_code",
            Box::new(|r| r.amount.as_mut().unwrap().currency_code = "USD".into()),
        ),
    ];
    for (field, mutate) in cases {
        let mut request = good.clone();
        request.idempotency_key = key();
        mutate(&mut request);
        let status = h.client.check_and_reserve(request).await.unwrap_err();
        assert_invalid(&status, field);
    }
    let e = exposure(&mut h.client, &customer).await;
    assert_eq!(
        amount(&e.reserved),
        "0.00",
        "refused requests change nothing"
    );

    let unknown = h
        .client
        .release_reservation(pb::ReleaseReservationRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            reservation_id: uuid::Uuid::now_v7().to_string(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let unknown = h
        .client
        .get_exposure(pb::GetExposureRequest {
            tenant_id: TENANT.into(),
            customer_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    // Another tenant does not see this customer's account.
    let other = h
        .client
        .get_exposure(pb::GetExposureRequest {
            tenant_id: "tenant-b".into(),
            customer_id: customer.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::NotFound);

    let negative_limit = h
        .client
        .set_credit_limit(pb::SetCreditLimitRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
            credit_limit: eur("-1.00"),
            reason: "test".into(),
            actor: "analyst-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&negative_limit, "credit_limit.amount");
    assert_eq!(
        amount(&exposure(&mut h.client, &customer).await.credit_limit),
        "100.00"
    );

    // Without an account the policy blocks.
    let blocked = reserve(
        &mut h.client,
        &uuid::Uuid::now_v7().to_string(),
        "o",
        "1.00",
    )
    .await;
    assert_eq!(blocked.decision(), pb::Decision::Block);
    assert_eq!(
        blocked.reasons().collect::<Vec<_>>(),
        [pb::ReasonCode::NoCreditAccount]
    );
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_sqlite() {
    bad_input(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_postgres() {
    bad_input(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposure_reads_use_redis_and_never_go_back_in_version() {
    let Some(redis_url) = o2c_testkit::redis_url().await else {
        return;
    };
    let Some(mut h) = start(Backend::Postgres, "cache").await else {
        return;
    };
    let customer = open_with_limit(&mut h.client, "500.00").await;
    reserve(&mut h.client, &customer, "order-1", "100.00").await;
    let fresh = exposure(&mut h.client, &customer).await;

    // The cache holds the latest version.
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("o2c:credit:exposure:{TENANT}:{customer}");
    let version: i64 = redis::cmd("HGET")
        .arg(&key)
        .arg("version")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(version, fresh.version);

    // A stale writer (lower version) cannot replace it.
    let cache = o2c_credit::storage::cache::ExposureCache::new(Some(
        o2c_kit::cache::connect(&redis_url).await.unwrap(),
    ));
    let stale = o2c_credit::domain::Exposure {
        customer_id: customer.parse().unwrap(),
        currency: o2c_money::Currency::from_code("EUR").unwrap(),
        limit_minor: 50_000,
        reserved_minor: 0,
        receivable_minor: 0,
        version: fresh.version - 1,
    };
    cache.put(TENANT, &stale).await;
    assert_eq!(exposure(&mut h.client, &customer).await, fresh);

    // With the entry gone the database answers and refills the cache.
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exposure(&mut h.client, &customer).await, fresh);
    let refilled: Option<i64> = redis::cmd("HGET")
        .arg(&key)
        .arg("version")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(refilled, Some(fresh.version));
    h.served.stop().await;
}

/// How many of credit's migrations there are from `name` to the last,
/// `name` included: the steps down to before it.
fn from_migration(name: &str) -> u32 {
    use o2c_credit::storage::migrations::Migrator;
    use sea_orm_migration::MigratorTrait;
    let names: Vec<String> = Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    let at = names.iter().position(|n| n == name).unwrap();
    u32::try_from(names.len() - at).unwrap()
}

/// A database from before decisions kept the client's reference gets the
/// column from its migration, and loses it again going down.
async fn client_reference_migrates_both_ways(backend: Backend) {
    use o2c_credit::storage::migrations::Migrator;
    use sea_orm_migration::MigratorTrait;
    use sea_orm_migration::SchemaManager;
    let Some(db) = o2c_testkit::database(backend, "credit_migration").await else {
        return;
    };
    let conn = o2c_kit::db::connect_and_migrate::<Migrator>(&db.url)
        .await
        .unwrap();
    let has = |conn: sea_orm::DatabaseConnection| async move {
        SchemaManager::new(&conn)
            .has_column("credit_decisions", "client_reference")
            .await
            .unwrap()
    };
    assert!(has(conn.clone()).await);
    Migrator::down(
        &conn,
        Some(from_migration(
            "m20261205_000001_credit_decision_client_reference",
        )),
    )
    .await
    .unwrap();
    assert!(!has(conn.clone()).await);
    Migrator::up(&conn, None).await.unwrap();
    assert!(has(conn.clone()).await);
}

/// The table of checked orders is filled, when it is created, from the
/// reservations and holds already there: one row per order, from the
/// earlier of an order's hold and the reservation it was released into.
async fn checked_orders_migrate_both_ways(backend: Backend) {
    use o2c_credit::storage::entities::{checked_order, hold, reservation};
    use o2c_credit::storage::migrations::Migrator;
    use sea_orm::{ActiveModelTrait, EntityTrait, QueryOrder};
    use sea_orm_migration::MigratorTrait;
    use sea_orm_migration::SchemaManager;
    let Some(db) = o2c_testkit::database(backend, "credit_checked_migration").await else {
        return;
    };
    let conn = o2c_kit::db::connect_and_migrate::<Migrator>(&db.url)
        .await
        .unwrap();
    Migrator::down(
        &conn,
        Some(from_migration("m20261205_000002_credit_checked_orders")),
    )
    .await
    .unwrap();
    assert!(
        !SchemaManager::new(&conn)
            .has_table("credit_checked_orders")
            .await
            .unwrap()
    );
    let at = |minutes: i64| {
        chrono::DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
            .unwrap()
            .to_utc()
            + chrono::Duration::minutes(minutes)
    };
    let reservation = |order: &str, created: i64| reservation::Model {
        id: uuid::Uuid::now_v7().to_string(),
        tenant_id: TENANT.into(),
        account_id: "account-1".into(),
        customer_id: "customer-1".into(),
        order_id: order.into(),
        amount_minor: 100,
        state: "OPEN".into(),
        invoice_id: None,
        created_at: at(created),
        expires_at: at(created + 60),
        resolved_at: None,
    };
    let hold = |order: &str, created: i64| hold::Model {
        id: uuid::Uuid::now_v7().to_string(),
        tenant_id: TENANT.into(),
        account_id: "account-1".into(),
        customer_id: "customer-1".into(),
        order_id: order.into(),
        amount_minor: 100,
        reasons: "OVER_LIMIT".into(),
        state: "RELEASED".into(),
        created_at: at(created),
        resolved_at: None,
        resolved_by: None,
        resolution_reason: None,
        reservation_id: None,
    };
    // Held, then released into a reservation; reserved; held.
    hold::ActiveModel::from(hold("released", 1))
        .insert(&conn)
        .await
        .unwrap();
    reservation::ActiveModel::from(reservation("released", 5))
        .insert(&conn)
        .await
        .unwrap();
    reservation::ActiveModel::from(reservation("reserved", 2))
        .insert(&conn)
        .await
        .unwrap();
    hold::ActiveModel::from(hold("held", 3))
        .insert(&conn)
        .await
        .unwrap();
    Migrator::up(&conn, None).await.unwrap();
    let rows: Vec<(String, chrono::DateTime<chrono::Utc>)> = checked_order::Entity::find()
        .order_by_asc(checked_order::Column::OrderId)
        .all(&conn)
        .await
        .unwrap()
        .into_iter()
        .map(|row| (row.order_id, row.created_at))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("held".into(), at(3)),
            ("released".into(), at(1)),
            ("reserved".into(), at(2)),
        ]
    );
}

/// The expiry sweep's index: a database from before has the index on the
/// state alone, and gets (state, expires_at) in its place; going down
/// gives it back. On PostgreSQL the sweep's page is read from the new
/// index in its order, with no sort.
async fn sweep_index_migrates_both_ways(backend: Backend) {
    use o2c_credit::storage::migrations::{Migrator, STATE_INDEX, SWEEP_INDEX};
    use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};
    use sea_orm_migration::{MigratorTrait, SchemaManager};
    let Some(db) = o2c_testkit::database(backend, "credit_sweep_index").await else {
        return;
    };
    let conn = o2c_kit::db::connect_and_migrate::<Migrator>(&db.url)
        .await
        .unwrap();
    // (has the sweep's index, has the state-only one)
    let indexes = |conn: sea_orm::DatabaseConnection| async move {
        let manager = SchemaManager::new(&conn);
        let has = async |index| {
            manager
                .has_index("credit_reservations", index)
                .await
                .unwrap()
        };
        (has(SWEEP_INDEX).await, has(STATE_INDEX).await)
    };
    assert_eq!(indexes(conn.clone()).await, (true, false));
    if backend == Backend::Postgres {
        let txn = conn.begin().await.unwrap();
        txn.execute_unprepared("SET LOCAL enable_seqscan = off")
            .await
            .unwrap();
        let plan: Vec<String> = txn
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                "EXPLAIN SELECT * FROM credit_reservations WHERE state = 'OPEN' \
                 AND expires_at < now() ORDER BY expires_at LIMIT 100",
            ))
            .await
            .unwrap()
            .iter()
            .map(|row| row.try_get::<String>("", "QUERY PLAN").unwrap())
            .collect();
        txn.rollback().await.unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains(SWEEP_INDEX), "{plan}");
        assert!(!plan.contains("Sort"), "{plan}");
    }
    Migrator::down(
        &conn,
        Some(from_migration(
            "m20261206_000012_credit_reservation_sweep_index",
        )),
    )
    .await
    .unwrap();
    assert_eq!(indexes(conn.clone()).await, (false, true));
    Migrator::up(&conn, None).await.unwrap();
    assert_eq!(indexes(conn.clone()).await, (true, false));
}

#[tokio::test]
async fn sweep_index_migrates_both_ways_on_sqlite() {
    sweep_index_migrates_both_ways(Backend::Sqlite).await;
}

#[tokio::test]
async fn sweep_index_migrates_both_ways_on_postgres() {
    sweep_index_migrates_both_ways(Backend::Postgres).await;
}

#[tokio::test]
async fn checked_orders_migrate_both_ways_on_sqlite() {
    checked_orders_migrate_both_ways(Backend::Sqlite).await;
}

#[tokio::test]
async fn checked_orders_migrate_both_ways_on_postgres() {
    checked_orders_migrate_both_ways(Backend::Postgres).await;
}

#[tokio::test]
async fn client_reference_migrates_both_ways_on_sqlite() {
    client_reference_migrates_both_ways(Backend::Sqlite).await;
}

#[tokio::test]
async fn client_reference_migrates_both_ways_on_postgres() {
    client_reference_migrates_both_ways(Backend::Postgres).await;
}

/// The batch's read and write, on the pool that keeps each statement's
/// first plan (`kit::db::connect_fixed_plans`), stay on their indexes
/// under a plan made while every table they touch was small and freshly
/// analyzed, after the tables grew and were not analyzed again
/// (autovacuum off, or not come by yet): no statement of the batch scans
/// one of those tables, and together they read a few index entries.
/// Without `enable_seqscan = off` on that pool, the plan scanned the small
/// accounts table once for every receivable (20,010 scans).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stays_on_its_indexes_under_a_generic_plan_postgres() {
    use o2c_credit::storage::batch;
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let Some(test_db) = o2c_testkit::database(Backend::Postgres, "generic_plans").await else {
        return;
    };
    let db =
        o2c_kit::db::connect_and_migrate::<o2c_credit::storage::migrations::Migrator>(&test_db.url)
            .await
            .unwrap();
    const TABLES: [&str; 5] = [
        "credit_accounts",
        "idempotency_keys",
        "credit_reservations",
        "credit_holds",
        "credit_receivables",
    ];
    let fixed = o2c_kit::db::connect_fixed_plans(&test_db.url)
        .await
        .unwrap()
        .unwrap();
    let scope = format!("{TENANT}/credit.CheckAndReserve");
    // `n` rows in each table, named by `prefix`; account g belongs to the
    // customer `md5(prefix || g)` and has a reservation, a hold and a
    // receivable.
    let fill = |prefix: &'static str, n: u32| {
        let statements = [
            format!(
                "INSERT INTO credit_accounts (id, tenant_id, customer_id, currency_code, \
                 limit_minor, limit_source, reserved_minor, receivable_minor, \
                 group_exposure_minor, blocked, version, created_at, updated_at) \
                 SELECT md5('{prefix}a' || g)::uuid::text, '{TENANT}', md5('{prefix}' || g)::uuid::text, 'EUR', \
                 100000, 'manual', 100, 100, 0, false, 1, now(), now() \
                 FROM generate_series(1, {n}) g"
            ),
            format!(
                "INSERT INTO idempotency_keys (scope, key, request, response, created_at) \
                 SELECT '{scope}', '{prefix}-k-' || g, '\\x00', NULL, now() \
                 FROM generate_series(1, {n}) g"
            ),
            format!(
                "INSERT INTO credit_reservations (id, tenant_id, account_id, customer_id, \
                 order_id, amount_minor, state, created_at, expires_at) \
                 SELECT '{prefix}-r-' || g, '{TENANT}', md5('{prefix}a' || g)::uuid::text, \
                 md5('{prefix}' || g)::uuid::text, '{prefix}-o-' || g, 100, 'open', now(), \
                 now() + interval '1 day' FROM generate_series(1, {n}) g"
            ),
            format!(
                "INSERT INTO credit_holds (id, tenant_id, account_id, customer_id, order_id, \
                 amount_minor, reasons, state, created_at) \
                 SELECT '{prefix}-h-' || g, '{TENANT}', md5('{prefix}a' || g)::uuid::text, \
                 md5('{prefix}' || g)::uuid::text, '{prefix}-held-' || g, 100, 'OVER_LIMIT', \
                 'open', now() FROM generate_series(1, {n}) g"
            ),
            format!(
                "INSERT INTO credit_receivables (tenant_id, invoice_id, account_id, amount_minor, \
                 open_minor, due_date, dunning_level, created_at) \
                 SELECT '{TENANT}', '{prefix}-i-' || g, md5('{prefix}a' || g)::uuid::text, 100, 100, \
                 current_date + g, 0, now() FROM generate_series(1, {n}) g"
            ),
        ];
        let db = &db;
        async move {
            for statement in statements {
                db.execute_unprepared(&statement).await.unwrap();
            }
        }
    };
    fill("small", 3).await;
    for table in TABLES {
        db.execute_unprepared(&format!("ANALYZE {table}"))
            .await
            .unwrap();
    }
    // One transaction: one connection, so one prepared statement each; it
    // sees what `db` commits meanwhile.
    let txn = fixed.begin().await.unwrap();
    let customer: o2c_money::ids::CustomerId = db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT md5('small1')::uuid::text AS id",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<String>("", "id")
        .unwrap()
        .parse()
        .unwrap();
    // Reads the first small account with its key, orders and due date,
    // and writes it back as read (guarded by its version).
    let batch = || async {
        let (accounts, found) = batch::read_all(
            &txn,
            TENANT,
            &[customer],
            &scope,
            &["small-k-1"],
            &["small-o-1", "small-held-1"],
        )
        .await
        .unwrap();
        assert_eq!(accounts.len(), 1);
        assert_eq!(found.recorded.len(), 1);
        assert_eq!(found.checked.len(), 2);
        assert_eq!(found.oldest_due.len(), 1);
        let account = &accounts[&customer];
        let version = account.exposure.version;
        batch::write_all(
            &txn,
            &[(version, account)],
            chrono::Utc::now(),
            batch::Rows::default(),
            Vec::new(),
        )
        .await
        .unwrap();
    };
    batch().await;
    fill("big", 20_000).await;
    // Sequential scans of the tables, and index entries read, in this
    // transaction so far.
    let counted = || async {
        let names = TABLES.map(|t| format!("'{t}'")).join(", ");
        let row = txn
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                format!(
                    "SELECT \
                     (SELECT COALESCE(SUM(pg_stat_get_xact_numscans(c.oid)), 0) \
                      FROM pg_class c WHERE c.relname IN ({names}))::bigint AS scans, \
                     (SELECT COALESCE(SUM(pg_stat_get_xact_tuples_returned(i.indexrelid)), 0) \
                      FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
                      WHERE c.relname IN ({names}))::bigint AS entries"
                ),
            ))
            .await
            .unwrap()
            .unwrap();
        (
            row.try_get::<i64>("", "scans").unwrap(),
            row.try_get::<i64>("", "entries").unwrap(),
        )
    };
    let (scans, entries) = counted().await;
    batch().await;
    let (scans_now, entries_now) = counted().await;
    assert_eq!(
        scans_now - scans,
        0,
        "the batch scanned a table of 20,003 rows"
    );
    assert!(
        entries_now - entries < 100,
        "the batch read {} index entries",
        entries_now - entries
    );
    txn.rollback().await.unwrap();
}

/// A batch's first read finds its keys through the index however the
/// table grew since the statement was first run on a connection, and since
/// it was last analyzed. With PostgreSQL's default plan caching, `scope =
/// $1 AND key IN (…)` run a few times while the table was small kept a
/// generic plan that searched the index by scope alone and filtered every
/// row of it: each credit check read the whole table
/// (`kit::db::PLAN_CACHE_MODE`). With statistics taken before the scope
/// had keys, even a custom plan did that while the index began with the
/// scope (`kit::idempotency::KeyFirst`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_read_stays_on_the_index_as_its_table_grows_postgres() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let Some(test_db) = o2c_testkit::database(Backend::Postgres, "plans").await else {
        return;
    };
    let db =
        o2c_kit::db::connect_and_migrate::<o2c_credit::storage::migrations::Migrator>(&test_db.url)
            .await
            .unwrap();
    let scope = "t1/credit.CheckAndReserve";
    // One transaction: one connection, so one prepared statement.
    let txn = db.begin().await.unwrap();
    let add_keys = |prefix: &str, n: u32| {
        let insert = format!(
            "INSERT INTO idempotency_keys (scope, key, request, response, created_at) \
             SELECT '{scope}', '{prefix}-' || g, '\\x00', NULL, now() \
             FROM generate_series(1, {n}) g"
        );
        let txn = &txn;
        async move { txn.execute_unprepared(&insert).await.unwrap() }
    };
    // Statistics taken while the table held only another scope's keys (a
    // new tenant's first checks): with the scope first in the index, the
    // planner then searched by scope alone and filtered every key of it.
    let other = "INSERT INTO idempotency_keys (scope, key, request, response, created_at) \
         SELECT 't0/credit.OpenCreditAccount', 'open-' || g, '\\x00', NULL, now() \
         FROM generate_series(1, 2000) g";
    txn.execute_unprepared(other).await.unwrap();
    txn.execute_unprepared("ANALYZE idempotency_keys")
        .await
        .unwrap();
    add_keys("early", 20).await;
    let customer: o2c_money::ids::CustomerId =
        "0193a4b2-7c1d-7e3f-8a9b-0c1d2e3f4a5b".parse().unwrap();
    let read = || async {
        o2c_credit::storage::batch::read_all(
            &txn,
            TENANT,
            &[customer],
            scope,
            &["early-1", "early-2"],
            &["order-1", "order-2"],
        )
        .await
        .unwrap()
        .1
    };
    for _ in 0..10 {
        assert_eq!(read().await.recorded.len(), 2);
    }
    add_keys("later", 50_000).await;
    let entries_read = || async {
        let row = txn
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT pg_stat_get_xact_tuples_returned('\"pk-idempotency_keys\"'::regclass) AS n",
            ))
            .await
            .unwrap()
            .unwrap();
        row.try_get::<i64>("", "n").unwrap()
    };
    let before = entries_read().await;
    assert_eq!(read().await.recorded.len(), 2);
    let read_now = entries_read().await - before;
    assert!(
        read_now < 100,
        "one read of two keys took {read_now} index entries of a 50,020-row table"
    );
    txn.rollback().await.unwrap();
}
