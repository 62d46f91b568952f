//! The credit policy end to end: every reason, the no-over-commit race,
//! holds, limit approvals, alerts, amendments, expiry, scoring, groups and
//! a cache that dies.

use std::time::Duration;

use o2c_proto::credit::v1 as pb;
use o2c_proto::credit::v1::credit_service_client::CreditServiceClient;
use o2c_testkit::{Backend, Seeded, assert_invalid};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

use super::{
    TENANT, amount, assert_consistent, eur, exposure, key, open_with_limit, reserve, start,
    start_with,
};

const ANALYST: &str = "analyst-1";
const SUPERVISOR: &str = "supervisor-1";

fn minor_to_eur(minor: i64) -> String {
    format!("{}.{:02}", minor / 100, minor % 100)
}

async fn set_limit(
    client: &mut CreditServiceClient<Channel>,
    customer: &str,
    limit: &str,
    actor: &str,
) -> pb::SetCreditLimitResponse {
    client
        .set_credit_limit(pb::SetCreditLimitRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: customer.into(),
            credit_limit: eur(limit),
            reason: "test".into(),
            actor: actor.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn open(
    client: &mut CreditServiceClient<Channel>,
    customer: &str,
    parent: &str,
) -> Result<pb::CreditAccount, tonic::Status> {
    client
        .open_credit_account(pb::OpenCreditAccountRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: customer.into(),
            currency_code: "EUR".into(),
            parent_customer_id: parent.into(),
        })
        .await
        .map(|r| r.into_inner().credit_account.unwrap())
}

fn reasons(d: &pb::CreditDecision) -> Vec<pb::ReasonCode> {
    d.reasons().collect()
}

/// 1,000 concurrent reservations of one amount against a limit of 100 ×
/// the amount approve exactly 100; with the limit lowered to 50 × during
/// the race, never more than the limit in force allowed.
async fn race(backend: Backend, seed: u64, lower_during_race: bool) {
    let Some(mut h) = start(backend, &format!("race{seed}")).await else {
        return;
    };
    let mut rng = Seeded(seed);
    let amount_minor = 100 + i64::try_from(rng.next_u64() % 50_000).unwrap();
    let limit_minor = 100 * amount_minor;
    println!(
        "seed {seed}: amount {amount_minor} minor units, lower during race: {lower_during_race}"
    );
    let customer = open_with_limit(&mut h.client, &minor_to_eur(limit_minor)).await;
    let lower_after = usize::try_from(rng.next_u64() % 600).unwrap() + 100;
    let mut tasks = Vec::new();
    for i in 0..1_000 {
        if lower_during_race && i == lower_after {
            let mut client = h.client.clone();
            let customer = customer.clone();
            let lowered = minor_to_eur(50 * amount_minor);
            tasks.push(tokio::spawn(async move {
                set_limit(&mut client, &customer, &lowered, ANALYST).await;
                None
            }));
        }
        let mut client = h.client.clone();
        let customer = customer.clone();
        let value = minor_to_eur(amount_minor);
        tasks.push(tokio::spawn(async move {
            Some(reserve(&mut client, &customer, &format!("order-{i}"), &value).await)
        }));
    }
    let mut approved = 0i64;
    for task in tasks {
        if let Some(decision) = task.await.unwrap()
            && decision.decision() == pb::Decision::Approve
        {
            approved += 1;
        }
    }
    let e = assert_consistent(&mut h.client, &customer).await;
    assert_eq!(
        amount(&e.reserved),
        minor_to_eur(approved * amount_minor),
        "seed {seed}"
    );
    if lower_during_race {
        assert!(approved <= 100, "seed {seed}: {approved} approvals");
        // Every approval fitted the limit it was decided under.
        let decisions = h
            .client
            .list_decisions(pb::ListDecisionsRequest {
                tenant_id: TENANT.into(),
                customer_id: customer.clone(),
                page_size: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .decisions;
        for d in decisions
            .iter()
            .filter(|d| d.decision() == pb::Decision::Approve)
        {
            let inputs: serde_json::Value = serde_json::from_str(&d.inputs).unwrap();
            let used = inputs["reserved_minor"].as_i64().unwrap()
                + inputs["receivable_minor"].as_i64().unwrap();
            assert!(
                used + amount_minor <= inputs["limit_minor"].as_i64().unwrap(),
                "seed {seed}: {inputs}"
            );
        }
        // Under the lowered limit nothing more is approved until exposure
        // falls below it.
        let after = reserve(
            &mut h.client,
            &customer,
            "late-order",
            &minor_to_eur(amount_minor),
        )
        .await;
        assert_eq!(
            after.decision() == pb::Decision::Approve,
            approved < 50,
            "seed {seed}"
        );
    } else {
        assert_eq!(approved, 100, "seed {seed}");
        assert_eq!(amount(&e.available), "0.00");
    }
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_over_commit_with_1000_concurrent_reservations_sqlite() {
    for seed in [7, 1_234, 99_991] {
        race(Backend::Sqlite, seed, false).await;
    }
    race(Backend::Sqlite, 42, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_over_commit_with_1000_concurrent_reservations_postgres() {
    for seed in [7, 1_234, 99_991] {
        race(Backend::Postgres, seed, false).await;
    }
    race(Backend::Postgres, 42, true).await;
}

/// Checks for one customer arriving together are decided in shared
/// transactions (group commit); each is still answered on its own. Thirty
/// orders of 1.00 against a limit of 15.00, sent at once with retries of
/// ten of them (same key), second checks of ten orders under new keys, and
/// five checks in the wrong currency: exactly fifteen approvals and fifteen
/// holds, every retry answered with its original's decision, every second
/// check of an order refused, every wrong currency refused, and the
/// exposure equal to the approvals.
/// What one check of an order was answered: its kind and its decision or
/// error code.
type Answered = (&'static str, Result<pb::CreditDecision, Code>);

async fn batch_answers_each_check_on_its_own(backend: Backend) {
    let Some(mut h) = start(backend, "batch").await else {
        return;
    };
    let customer = open_with_limit(&mut h.client, "15.00").await;
    let request = |key: String, order: String, currency: &str| pb::CheckAndReserveRequest {
        idempotency_key: key,
        tenant_id: TENANT.into(),
        customer_id: customer.clone(),
        order_id: order,
        amount: Some(o2c_proto::common::v1::Money {
            amount: "1.00".into(),
            currency_code: currency.into(),
        }),
        client_reference: String::new(),
    };
    let mut requests = Vec::new();
    for i in 0..30 {
        requests.push((
            "first",
            i,
            request(format!("k-{i}"), format!("o-{i}"), "EUR"),
        ));
    }
    for i in 0..10 {
        requests.push((
            "retry",
            i,
            request(format!("k-{i}"), format!("o-{i}"), "EUR"),
        ));
        requests.push((
            "again",
            i,
            request(format!("again-{i}"), format!("o-{i}"), "EUR"),
        ));
    }
    for i in 0..5 {
        requests.push((
            "usd",
            i,
            request(format!("usd-{i}"), format!("usd-{i}"), "USD"),
        ));
    }
    let before = h.batches.decided();
    let timed = h.batches.timings();
    // Interleaved, so retries and second checks share batches with their
    // originals.
    let mut rng = Seeded(20261205);
    for i in (1..requests.len()).rev() {
        let j = usize::try_from(rng.next_u64() % (i as u64 + 1)).unwrap();
        requests.swap(i, j);
    }
    let mut tasks = Vec::new();
    for (kind, i, request) in requests {
        let mut client = h.client.clone();
        tasks.push(tokio::spawn(async move {
            let answer = client
                .check_and_reserve(request)
                .await
                .map(|r| r.into_inner().decision.unwrap());
            (kind, i, answer)
        }));
    }
    let mut by_order: std::collections::HashMap<usize, Vec<Answered>> =
        std::collections::HashMap::new();
    for task in tasks {
        let (kind, i, answer) = task.await.unwrap();
        let answer = answer.map_err(|status| status.code());
        if kind == "usd" {
            assert_eq!(answer.unwrap_err(), Code::InvalidArgument, "usd-{i}");
            continue;
        }
        by_order.entry(i).or_default().push((kind, answer));
    }
    let (mut approved, mut held) = (0, 0);
    for (i, answers) in &by_order {
        // One decision per order, whichever of its checks made it; every
        // other answer is that decision (a retry) or ALREADY_EXISTS.
        let decisions: std::collections::BTreeSet<String> = answers
            .iter()
            .filter_map(|(_, a)| a.as_ref().ok().map(|d| d.decision_id.clone()))
            .collect();
        assert_eq!(decisions.len(), 1, "order o-{i}: {answers:?}");
        for (kind, answer) in answers {
            if let Err(code) = answer {
                assert_eq!(*code, Code::AlreadyExists, "order o-{i}, {kind}");
            }
        }
        // The same check under the same key is answered the same, in
        // whichever order the two arrived, in one batch or two.
        let under_key: Vec<&Result<pb::CreditDecision, Code>> = answers
            .iter()
            .filter(|(kind, _)| *kind != "again")
            .map(|(_, answer)| answer)
            .collect();
        assert!(
            under_key.windows(2).all(|pair| pair[0] == pair[1]),
            "order o-{i}: {answers:?}"
        );
        let decision = answers.iter().find_map(|(_, a)| a.as_ref().ok()).unwrap();
        match decision.decision() {
            pb::Decision::Approve => approved += 1,
            pb::Decision::Hold => held += 1,
            other => panic!("order o-{i}: {other:?}"),
        }
    }
    assert_eq!((approved, held), (15, 15));
    // One customer outside any group: every check decided set-wise.
    let after = h.batches.decided();
    assert_eq!((after.0 - before.0, after.1 - before.1), (55, 0));
    // Their batches' steps were timed: each check's wait once, and every
    // step of every batch that got that far. On SQLite each batch begins a
    // transaction, and a batch of refusals alone rolls back, so commits
    // are at most the writes, and at least one; on PostgreSQL the write
    // commits itself.
    let t = h.batches.timings().since(&timed);
    let [queued, begin, read, decide, write, commit, _answer] = t.counts;
    assert_eq!(queued, 55, "{t:?}");
    // A batch is counted by its read, or by being decided on the accounts
    // its lane remembered (PostgreSQL only); one of those whose write
    // collided (a key or an order seen before) was decided again after a
    // read, so decided twice and written once.
    assert!((1..=55).contains(&t.batches()), "{t:?}");
    assert_eq!(write, read + t.reads_skipped, "{t:?}");
    assert!(decide >= write, "{t:?}");
    if matches!(backend, Backend::Sqlite) {
        assert_eq!((t.reads_skipped, decide), (0, write), "{t:?}");
    }
    if matches!(backend, Backend::Sqlite) {
        assert_eq!(begin, read, "{t:?}");
        assert!((1..=write).contains(&commit), "{t:?}");
    } else {
        assert_eq!((begin, commit), (0, 0), "{t:?}");
    }
    let e = assert_consistent(&mut h.client, &customer).await;
    assert_eq!(amount(&e.reserved), "15.00");
    assert_eq!(amount(&e.available), "0.00");
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_answers_each_check_on_its_own_sqlite() {
    batch_answers_each_check_on_its_own(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_answers_each_check_on_its_own_postgres() {
    batch_answers_each_check_on_its_own(Backend::Postgres).await;
}

/// A batch whose write fails loses nothing. One order of forty is marked
/// as checked beforehand, without a reservation or hold, so the write of
/// the batch that holds it fails on its row and writes nothing: that
/// batch's checks are decided one by one, where the marked order is
/// refused ABORTED and every other is decided. Against a limit of 20.00,
/// exactly twenty of the other 39 orders of 1.00 are approved, the
/// exposure is theirs, and every check sent again under its key is
/// answered with its first decision.
async fn a_failed_write_loses_nothing(backend: Backend) {
    use o2c_credit::storage::entities::checked_order;
    use sea_orm::ActiveModelTrait;
    let Some(mut h) = start(backend, "failed_write").await else {
        return;
    };
    let customer = open_with_limit(&mut h.client, "20.00").await;
    let db = o2c_kit::db::connect(&h.db.url).await.unwrap();
    checked_order::ActiveModel::from(o2c_credit::storage::checked_order_row(
        TENANT,
        "o-5",
        chrono::Utc::now(),
    ))
    .insert(&db)
    .await
    .unwrap();
    let request = |i: usize| pb::CheckAndReserveRequest {
        idempotency_key: format!("k-{i}"),
        tenant_id: TENANT.into(),
        customer_id: customer.clone(),
        order_id: format!("o-{i}"),
        amount: eur("1.00"),
        client_reference: String::new(),
    };
    let before = h.batches.decided();
    let send = |client: &CreditServiceClient<Channel>| {
        (0..40)
            .map(|i| {
                let (mut client, request) = (client.clone(), request(i));
                tokio::spawn(async move {
                    let answer = client.check_and_reserve(request).await;
                    (i, answer.map(|r| r.into_inner().decision.unwrap()))
                })
            })
            .collect::<Vec<_>>()
    };
    let mut first = std::collections::BTreeMap::new();
    for task in send(&h.client) {
        let (i, answer) = task.await.unwrap();
        match answer {
            Ok(decision) => {
                first.insert(i, decision);
            }
            Err(status) => {
                assert_eq!((i, status.code()), (5, Code::Aborted), "{status:?}");
            }
        }
    }
    assert_eq!(first.len(), 39, "every other order decided");
    let approved = first
        .values()
        .filter(|d| d.decision() == pb::Decision::Approve)
        .count();
    assert_eq!(approved, 20);
    let after = h.batches.decided();
    assert!(after.1 > before.1, "the failed batch went one by one");
    let e = assert_consistent(&mut h.client, &customer).await;
    assert_eq!(amount(&e.reserved), "20.00");
    for task in send(&h.client) {
        let (i, answer) = task.await.unwrap();
        match first.get(&i) {
            Some(decision) => assert_eq!(&answer.unwrap(), decision, "o-{i}"),
            None => assert_eq!(answer.unwrap_err().code(), Code::Aborted),
        }
    }
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_loses_nothing_sqlite() {
    a_failed_write_loses_nothing(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_loses_nothing_postgres() {
    a_failed_write_loses_nothing(Backend::Postgres).await;
}

/// Two replicas of the service on one database check orders of the same
/// three customers at once, every order at both (under two keys), each
/// order of 1.00 against a limit of 10.00. A replica's set-wise write
/// fails when the other changed one of its accounts or checked one of its
/// orders since it read them, and its checks are then decided one by one.
/// Each order is decided once, exactly ten per customer are approved, the
/// other check of each order is refused as a second check, and each
/// ledger adds up. (A check caught between the two replicas' one-by-one
/// transactions is answered ABORTED, and retried as a client would.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_decide_each_order_once_postgres() {
    let Some(mut a) = start(Backend::Postgres, "replicas").await else {
        return;
    };
    let mut service = o2c_kit::settings::ServiceSettings::local("credit", 0);
    service.database_url = a.db.url.clone();
    let redis = o2c_testkit::redis_url().await;
    let built = o2c_credit::build_with(
        &service,
        redis.as_deref(),
        &o2c_credit::CreditSettings::default(),
        a.clock.clock(),
    )
    .await
    .unwrap();
    let served_b = o2c_testkit::serve(o2c_credit::SERVICE_NAME, built.routes).await;
    let b = CreditServiceClient::new(served_b.channel().await);
    let mut customers = Vec::new();
    for _ in 0..3 {
        customers.push(open_with_limit(&mut a.client, "10.00").await);
    }
    let before = (a.batches.decided(), built.batches.decided());
    let mut tasks = Vec::new();
    for i in 0..30 {
        for (c, customer) in customers.iter().enumerate() {
            for (replica, client) in [("a", &a.client), ("b", &b)] {
                let mut client = client.clone();
                let request = pb::CheckAndReserveRequest {
                    idempotency_key: format!("{replica}-{c}-{i}"),
                    tenant_id: TENANT.into(),
                    customer_id: customer.clone(),
                    order_id: format!("o-{c}-{i}"),
                    amount: eur("1.00"),
                    client_reference: String::new(),
                };
                tasks.push(tokio::spawn(async move {
                    for _ in 0..20 {
                        match client.check_and_reserve(request.clone()).await {
                            Err(status) if status.code() == Code::Aborted => {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            answer => {
                                return (c, i, answer.map(|r| r.into_inner().decision.unwrap()));
                            }
                        }
                    }
                    panic!("o-{c}-{i} was refused ABORTED twenty times");
                }));
            }
        }
    }
    let mut decisions: std::collections::HashMap<(usize, usize), Vec<pb::CreditDecision>> =
        std::collections::HashMap::new();
    for task in tasks {
        let (c, i, answer) = task.await.unwrap();
        match answer {
            Ok(decision) => decisions.entry((c, i)).or_default().push(decision),
            Err(status) => assert_eq!(status.code(), Code::AlreadyExists, "o-{c}-{i}: {status:?}"),
        }
    }
    let mut approved = [0; 3];
    for c in 0..3 {
        for i in 0..30 {
            let made = decisions.get(&(c, i)).map_or(0, Vec::len);
            assert_eq!(made, 1, "order o-{c}-{i} was decided {made} times");
            if decisions[&(c, i)][0].decision() == pb::Decision::Approve {
                approved[c] += 1;
            }
        }
    }
    assert_eq!(approved, [10, 10, 10]);
    for customer in &customers {
        let e = assert_consistent(&mut a.client, customer).await;
        assert_eq!(amount(&e.reserved), "10.00");
    }
    // How often the replicas' writes met (not asserted: it depends on how
    // the two interleave).
    let after = (a.batches.decided(), built.batches.decided());
    let (together, one_by_one) = (
        after.0.0 - before.0.0 + after.1.0 - before.1.0,
        after.0.1 - before.0.1 + after.1.1 - before.1.1,
    );
    eprintln!("two replicas: {together} checks decided set-wise, {one_by_one} one by one");
    served_b.stop().await;
    a.served.stop().await;
}

/// The write of a set-wise batch checks every account's version. On
/// PostgreSQL it is one statement outside any transaction: against a stale
/// version it fails and leaves nothing of what it would have inserted. On
/// SQLite (a statement per table) it fails, and the caller's transaction
/// rolls back. Against the version read, the account and the other rows
/// are written together.
async fn a_batch_write_checks_versions(backend: Backend) {
    use o2c_credit::storage::batch;
    use sea_orm::TransactionTrait;
    let Some(mut h) = start(backend, "batch_write").await else {
        return;
    };
    let customer = open_with_limit(&mut h.client, "50.00").await;
    let id: o2c_money::ids::CustomerId = customer.parse().unwrap();
    let db = o2c_kit::db::connect(&h.db.url).await.unwrap();
    let postgres = db.get_database_backend() == sea_orm::DbBackend::Postgres;
    let scope = "t1/batch-write";
    let record = |key: &'static str| {
        o2c_kit::idempotency::insert_all(
            scope,
            &[(key, b"request".as_slice(), b"response".to_vec())],
        )
        .into_iter()
        .collect::<Vec<_>>()
    };
    let read = async || {
        let (accounts, _) = batch::read_all(&db, TENANT, &[id], scope, &[], &[])
            .await
            .unwrap();
        accounts[&id].clone()
    };
    // A batch that only held orders on the account writes it as read,
    // guarded all the same.
    for (key, stale, reserves) in [
        ("stale", true, true),
        ("held", true, false),
        ("fresh", false, true),
        ("kept", false, false),
    ] {
        let mut account = read().await;
        let version = account.exposure.version;
        if reserves {
            account.exposure.reserved_minor += 700;
            account.exposure.version += 1;
        }
        let guard = if stale { version - 1 } else { version };
        let changed = [(guard, &account)];
        let written = if postgres {
            batch::write_all(
                &db,
                &changed,
                chrono::Utc::now(),
                batch::Rows::default(),
                record(key),
            )
            .await
        } else {
            let txn = db.begin().await.unwrap();
            let written = batch::write_all(
                &txn,
                &changed,
                chrono::Utc::now(),
                batch::Rows::default(),
                record(key),
            )
            .await;
            if written.is_ok() {
                txn.commit().await.unwrap();
            } else {
                txn.rollback().await.unwrap();
            }
            written
        };
        assert_eq!(written.is_err(), stale, "{key}: {written:?}");
    }
    assert_eq!(read().await.exposure.reserved_minor, 700);
    let recorded =
        o2c_kit::idempotency::recorded_in(&db, scope, &["stale", "held", "fresh", "kept"])
            .await
            .unwrap();
    assert!(recorded.contains_key("fresh"));
    assert!(recorded.contains_key("kept"));
    assert!(!recorded.contains_key("stale"));
    assert!(!recorded.contains_key("held"));
}

/// A check decided one by one that changes no row (a hold, a block) holds
/// only on the account as it was read: once another transaction changed
/// the account (a payment), `still_as_read` says no and the check is
/// evaluated again; as read, it says yes.
async fn a_refusal_rests_on_the_account_as_read(backend: Backend) {
    let Some(mut h) = start(backend, "still_as_read").await else {
        return;
    };
    let customer = open_with_limit(&mut h.client, "50.00").await;
    let id: o2c_money::ids::CustomerId = customer.parse().unwrap();
    let db = o2c_kit::db::connect(&h.db.url).await.unwrap();
    let read = o2c_credit::storage::require_account(&db, TENANT, id)
        .await
        .unwrap();
    let state = o2c_credit::storage::policy_state(&db, &read).await.unwrap();
    assert!(
        o2c_credit::storage::still_as_read(&db, &read, &state)
            .await
            .unwrap()
    );
    o2c_credit::storage::adjust(&db, &read.id.to_string(), 0, -100, chrono::Utc::now())
        .await
        .unwrap();
    assert!(
        !o2c_credit::storage::still_as_read(&db, &read, &state)
            .await
            .unwrap()
    );
    let fresh = o2c_credit::storage::require_account(&db, TENANT, id)
        .await
        .unwrap();
    assert!(
        o2c_credit::storage::still_as_read(&db, &fresh, &state)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn a_refusal_rests_on_the_account_as_read_sqlite() {
    a_refusal_rests_on_the_account_as_read(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_rests_on_the_account_as_read_postgres() {
    a_refusal_rests_on_the_account_as_read(Backend::Postgres).await;
}

#[tokio::test]
async fn a_batch_write_checks_versions_sqlite() {
    a_batch_write_checks_versions(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_write_checks_versions_postgres() {
    a_batch_write_checks_versions(Backend::Postgres).await;
}

/// A batch spans customers: orders of four customers, of a group (its
/// parent and a member) and of a customer without an account, all sent at
/// once, in two lanes. Each customer's limit holds on its own, the group's
/// limit holds across parent and member, the customer without an account
/// is blocked; and the orders of customers outside groups are decided
/// set-wise while the group's and the unknown customer's go one by one.
async fn batch_spans_customers_and_groups(backend: Backend) {
    // Two lanes (on PostgreSQL; SQLite has one): the plain customers'
    // batches in both run beside the group's checks, one by one.
    let settings = o2c_credit::CreditSettings {
        check_lanes: 2,
        ..Default::default()
    };
    let Some(mut h) = start_with(backend, "batch-mixed", settings, None).await else {
        return;
    };
    let c = &mut h.client;
    let mut plain = Vec::new();
    for _ in 0..4 {
        plain.push(open_with_limit(c, "3.00").await);
    }
    let parent = open_with_limit(c, "4.00").await;
    let member = uuid::Uuid::now_v7().to_string();
    open(c, &member, &parent).await.unwrap();
    set_limit(c, &member, "10.00", ANALYST).await;
    let unknown = uuid::Uuid::now_v7().to_string();
    let mut orders = Vec::new();
    for customer in &plain {
        for i in 0..5 {
            orders.push((customer.clone(), format!("{customer}-{i}")));
        }
    }
    for i in 0..6 {
        orders.push((member.clone(), format!("member-{i}")));
    }
    for i in 0..2 {
        orders.push((parent.clone(), format!("parent-{i}")));
        orders.push((unknown.clone(), format!("unknown-{i}")));
    }
    let mut rng = Seeded(20261206);
    for i in (1..orders.len()).rev() {
        let j = usize::try_from(rng.next_u64() % (i as u64 + 1)).unwrap();
        orders.swap(i, j);
    }
    let before = h.batches.decided();
    let mut tasks = Vec::new();
    for (customer, order) in orders {
        let mut client = h.client.clone();
        tasks.push(tokio::spawn(async move {
            let decision = reserve(&mut client, &customer, &order, "1.00").await;
            (customer, decision)
        }));
    }
    let mut approved: std::collections::HashMap<String, usize> = Default::default();
    for task in tasks {
        let (customer, decision) = task.await.unwrap();
        match decision.decision() {
            pb::Decision::Approve => *approved.entry(customer).or_default() += 1,
            pb::Decision::Hold => {
                let expected = if customer == member || customer == parent {
                    pb::ReasonCode::GroupLimitExceeded
                } else {
                    pb::ReasonCode::OverLimit
                };
                assert!(reasons(&decision).contains(&expected), "{decision:?}");
            }
            pb::Decision::Block => {
                assert_eq!(customer, unknown, "{decision:?}");
                assert_eq!(reasons(&decision), [pb::ReasonCode::NoCreditAccount]);
            }
            other => panic!("{other:?}"),
        }
    }
    for customer in &plain {
        assert_eq!(approved.get(customer), Some(&3), "{customer}");
        let e = assert_consistent(&mut h.client, customer).await;
        assert_eq!(amount(&e.reserved), "3.00");
    }
    let in_group = approved.get(&member).unwrap_or(&0) + approved.get(&parent).unwrap_or(&0);
    assert_eq!(in_group, 4);
    let group = h
        .client
        .get_group_exposure(pb::GetGroupExposureRequest {
            tenant_id: TENANT.into(),
            customer_id: parent.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amount(&group.total), "4.00");
    assert!(group.consistent);
    assert!(!approved.contains_key(&unknown));
    // The 20 orders of the four customers set-wise; the member's 6, the
    // parent's 2 (its row changes with every reservation of its member) and
    // the unknown customer's 2 one by one.
    let after = h.batches.decided();
    let (together, one_by_one) = (after.0 - before.0, after.1 - before.1);
    assert_eq!((together, one_by_one), (20, 10));
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_spans_customers_and_groups_sqlite() {
    batch_spans_customers_and_groups(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_spans_customers_and_groups_postgres() {
    batch_spans_customers_and_groups(Backend::Postgres).await;
}

/// Arrival order holds across the set-wise and the one-by-one path. A
/// group member's order that arrived first gets the group's headroom
/// before its parent's later order (both decided one by one), and it gets
/// its idempotency key before a later check of a customer outside any
/// group under the same key, though that one is decided set-wise, in the
/// same batch: the later check is refused as a reused key. The batch is
/// made deterministic by holding the lane's runner on a row locked from
/// outside while the three checks queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_keeps_arrival_order_across_paths_postgres() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let Some(mut h) = start(Backend::Postgres, "batch-order").await else {
        return;
    };
    let c = &mut h.client;
    let blocker = open_with_limit(c, "10.00").await;
    let plain = open_with_limit(c, "100.00").await;
    let parent = open_with_limit(c, "100.00").await;
    let member = uuid::Uuid::now_v7().to_string();
    open(c, &member, &parent).await.unwrap();
    set_limit(c, &member, "100.00", ANALYST).await;
    let outside = sea_orm::Database::connect(&h.db.url).await.unwrap();
    let lock = outside.begin().await.unwrap();
    lock.execute_unprepared(&format!(
        "SELECT id FROM credit_accounts WHERE customer_id = '{blocker}' FOR UPDATE"
    ))
    .await
    .unwrap();
    let send = |customer: &str, order: &str, amount: &str, key: &str| {
        let mut client = h.client.clone();
        let request = pb::CheckAndReserveRequest {
            idempotency_key: key.into(),
            tenant_id: TENANT.into(),
            customer_id: customer.into(),
            order_id: order.into(),
            amount: eur(amount),
            client_reference: String::new(),
        };
        tokio::spawn(async move {
            client
                .check_and_reserve(request)
                .await
                .map(|r| r.into_inner().decision.unwrap())
        })
    };
    let wait_for = |want: (usize, usize)| {
        let batches = std::sync::Arc::clone(&h.batches);
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while batches.load() != want {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{:?}",
                    batches.load()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let blocked = {
        let mut client = h.client.clone();
        let blocker = blocker.clone();
        tokio::spawn(async move { reserve(&mut client, &blocker, "b-1", "1.00").await })
    };
    // The runner took the blocker's check and waits for its row.
    wait_for((1, 0)).await;
    let first = send(&member, "m-1", "80.00", "shared");
    wait_for((1, 1)).await;
    let second = send(&parent, "p-1", "80.00", &key());
    wait_for((1, 2)).await;
    let third = send(&plain, "o-1", "1.00", "shared");
    wait_for((1, 3)).await;
    lock.rollback().await.unwrap();
    assert_eq!(blocked.await.unwrap().decision(), pb::Decision::Approve);
    let first = first.await.unwrap().unwrap();
    let second = second.await.unwrap().unwrap();
    assert_eq!(first.decision(), pb::Decision::Approve, "{first:?}");
    assert_eq!(second.decision(), pb::Decision::Hold, "{second:?}");
    assert_eq!(reasons(&second), [pb::ReasonCode::GroupLimitExceeded]);
    let third = third.await.unwrap().unwrap_err();
    assert_eq!(third.code(), Code::InvalidArgument, "{third:?}");
    h.served.stop().await;
}

/// A check decided one by one whose account changes between its read
/// and its write is evaluated again on the account as it now is
/// (`storage::check::evaluate_and_reserve`). The parent of a group (whose
/// checks go one by one) is over its limit as the check reads it; a
/// raise of that limit, uncommitted in another transaction, holds the row
/// that the held verdict locks to confirm it. Once the raise commits, the
/// confirmation fails and the check, read again, is approved. Without the
/// second evaluation it would be held on the old limit, or refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_whose_account_changed_under_it_is_evaluated_again_postgres() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let Some(mut h) = start(Backend::Postgres, "reevaluate").await else {
        return;
    };
    let c = &mut h.client;
    let parent = open_with_limit(c, "100.00").await;
    let member = uuid::Uuid::now_v7().to_string();
    open(c, &member, &parent).await.unwrap();
    let first = reserve(c, &parent, "o-1", "95.00").await;
    assert_eq!(first.decision(), pb::Decision::Approve, "{first:?}");
    let outside = sea_orm::Database::connect(&h.db.url).await.unwrap();
    let raise = outside.begin().await.unwrap();
    let raised = raise
        .execute_unprepared(&format!(
            "UPDATE credit_accounts SET limit_minor = 20000, version = version + 1 \
             WHERE customer_id = '{parent}'"
        ))
        .await
        .unwrap();
    assert_eq!(raised.rows_affected(), 1);
    let before = h.batches.decided();
    let check = {
        let mut client = h.client.clone();
        let parent = parent.clone();
        tokio::spawn(async move { reserve(&mut client, &parent, "o-2", "10.00").await })
    };
    // The check read the committed account (95.00 of 100.00 taken), found
    // 10.00 over the limit, and waits for the row to confirm that.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting = outside
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT count(*) AS waiting FROM pg_locks l \
                 JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE NOT l.granted AND a.datname = current_database()",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i64>("", "waiting")
            .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(!check.is_finished(), "the check did not wait for the row");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the check never waited for the row"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    raise.commit().await.unwrap();
    let second = check.await.unwrap();
    assert_eq!(second.decision(), pb::Decision::Approve, "{second:?}");
    let after = h.batches.decided();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (0, 1),
        "decided one by one"
    );
    let e = assert_consistent(&mut h.client, &parent).await;
    assert_eq!(amount(&e.reserved), "105.00");
    assert_eq!(amount(&e.credit_limit), "200.00");
    h.served.stop().await;
}

async fn every_reason(backend: Backend) {
    let Some(mut h) = start(backend, "reasons").await else {
        return;
    };
    let c = &mut h.client;
    let customer = open_with_limit(c, "1000.00").await;

    // An invoice due 40 days ago (policy: 30) makes items overdue.
    let first = reserve(c, &customer, "o-1", "100.00").await;
    let due = (h.clock.today() - chrono::Duration::days(40))
        .format("%Y-%m-%d")
        .to_string();
    let converted = super::sync(
        c,
        super::invoice(
            &customer,
            "o-1",
            &uuid::Uuid::now_v7().to_string(),
            "100.00",
            "100.00",
            &due,
        ),
    )
    .await;
    assert_eq!(
        converted.converted.unwrap().reservation_id,
        first.reservation_id
    );
    let overdue = reserve(c, &customer, "o-2", "10.00").await;
    assert_eq!(overdue.decision(), pb::Decision::Hold);
    assert_eq!(reasons(&overdue), [pb::ReasonCode::OverdueItems]);
    assert!(!overdue.hold_id.is_empty());

    // Limit valid until today; tomorrow it has expired.
    c.set_credit_limit(pb::SetCreditLimitRequest {
        idempotency_key: key(),
        tenant_id: TENANT.into(),
        customer_id: customer.clone(),
        credit_limit: eur("1000.00"),
        reason: "annual review".into(),
        actor: ANALYST.into(),
        valid_until: h.clock.today().format("%Y-%m-%d").to_string(),
        next_review_date: String::new(),
    })
    .await
    .unwrap();
    h.clock.advance(chrono::Duration::days(1));
    c.set_account_controls(pb::SetAccountControlsRequest {
        idempotency_key: key(),
        tenant_id: TENANT.into(),
        customer_id: customer.clone(),
        blocked: true,
        max_order_value: eur("500.00"),
        reason: "collections".into(),
        actor: ANALYST.into(),
    })
    .await
    .unwrap();
    let blocked = reserve(c, &customer, "o-3", "2000.00").await;
    assert_eq!(blocked.decision(), pb::Decision::Block);
    assert_eq!(
        reasons(&blocked),
        [
            pb::ReasonCode::AccountBlocked,
            pb::ReasonCode::LimitExpired,
            pb::ReasonCode::OverdueItems,
            pb::ReasonCode::MaxOrderValue,
            pb::ReasonCode::OverLimit,
        ]
    );
    assert!(
        blocked.hold_id.is_empty(),
        "a block is not queued for analysts"
    );

    // Each decision is documented with its inputs and policy version and
    // listable per order and per customer.
    let for_order = c
        .list_decisions(pb::ListDecisionsRequest {
            tenant_id: TENANT.into(),
            order_id: "o-3".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .decisions;
    assert_eq!(for_order.len(), 1);
    let inputs: serde_json::Value = serde_json::from_str(&for_order[0].inputs).unwrap();
    assert_eq!(inputs["blocked"], true);
    assert_eq!(inputs["max_order_minor"], 50_000);
    assert!(for_order[0].policy_version.starts_with("credit-policy/"));
    let for_customer = c
        .list_decisions(pb::ListDecisionsRequest {
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(for_customer.decisions.len(), 2);
    assert_eq!(for_customer.decisions[0].order_id, "o-3", "newest first");
    assert!(!for_customer.next_page_token.is_empty());
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reason_sqlite() {
    every_reason(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reason_postgres() {
    every_reason(Backend::Postgres).await;
}

async fn group_limits(backend: Backend) {
    let Some(mut h) = start(backend, "group").await else {
        return;
    };
    let c = &mut h.client;
    let parent = open_with_limit(c, "1000.00").await;
    let (a, b) = (
        uuid::Uuid::now_v7().to_string(),
        uuid::Uuid::now_v7().to_string(),
    );
    for child in [&a, &b] {
        open(c, child, &parent).await.unwrap();
        set_limit(c, child, "800.00", ANALYST).await;
    }
    assert_eq!(
        reserve(c, &a, "a-1", "600.00").await.decision(),
        pb::Decision::Approve
    );
    let over = reserve(c, &b, "b-1", "500.00").await;
    assert_eq!(over.decision(), pb::Decision::Hold);
    assert_eq!(reasons(&over), [pb::ReasonCode::GroupLimitExceeded]);
    assert_eq!(
        reserve(c, &b, "b-2", "400.00").await.decision(),
        pb::Decision::Approve
    );
    // The parent's own orders count against the group too.
    let own = reserve(c, &parent, "p-1", "1.00").await;
    assert_eq!(reasons(&own), [pb::ReasonCode::GroupLimitExceeded]);
    let group = c
        .get_group_exposure(pb::GetGroupExposureRequest {
            tenant_id: TENANT.into(),
            customer_id: parent.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amount(&group.total), "1000.00");
    assert_eq!(group.members.len(), 3);
    assert!(group.consistent);
    // Groups are one level deep, in one currency.
    let grandchild = open(c, &uuid::Uuid::now_v7().to_string(), &a)
        .await
        .unwrap_err();
    assert_invalid(&grandchild, "parent_customer_id");
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_limits_sqlite() {
    group_limits(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_limits_postgres() {
    group_limits(Backend::Postgres).await;
}

async fn holds_and_alerts(backend: Backend) {
    let Some(mut h) = start(backend, "holds").await else {
        return;
    };
    let mut stream = h
        .client
        .stream_alerts(pb::StreamAlertsRequest {
            tenant_id: TENANT.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let c = &mut h.client;
    let customer = open_with_limit(c, "1000.00").await;
    assert_eq!(
        reserve(c, &customer, "o-1", "850.00").await.decision(),
        pb::Decision::Approve
    );
    let held = reserve(c, &customer, "o-2", "300.00").await;
    let rejected = reserve(c, &customer, "o-3", "400.00").await;
    assert_eq!(held.decision(), pb::Decision::Hold);

    // Live: the 80 % crossing, then the two holds.
    let mut live = Vec::new();
    while live.len() < 3 {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("alert before the deadline")
            .unwrap()
            .unwrap();
        live.push(next.alert.unwrap());
    }
    assert_eq!(live[0].kind(), pb::AlertKind::ExposureThreshold);
    assert_eq!(live[0].threshold_percent, 80);
    assert_eq!(live[1].kind(), pb::AlertKind::HoldCreated);
    assert_eq!(live[1].order_id, "o-2");

    let queue = c
        .list_holds(pb::ListHoldsRequest {
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
            reason: pb::ReasonCode::OverLimit as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .holds;
    assert_eq!(
        queue
            .iter()
            .map(|h| h.order_id.as_str())
            .collect::<Vec<_>>(),
        ["o-2", "o-3"],
        "oldest first"
    );

    // Releasing re-runs the check: still over the limit, so it stays.
    let still = c
        .release_hold(pb::ReleaseHoldRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            hold_id: held.hold_id.clone(),
            actor: ANALYST.into(),
            reason: "customer called".into(),
            raise_limit_to: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.decision.unwrap().decision(), pb::Decision::Hold);
    assert_eq!(still.hold.unwrap().state(), pb::HoldState::Open);
    // With a raise within authority it passes.
    let released = c
        .release_hold(pb::ReleaseHoldRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            hold_id: held.hold_id.clone(),
            actor: ANALYST.into(),
            reason: "raise approved by sales".into(),
            raise_limit_to: eur("1200.00"),
        })
        .await
        .unwrap()
        .into_inner();
    let hold = released.hold.unwrap();
    assert_eq!(hold.state(), pb::HoldState::Released);
    assert!(!hold.reservation_id.is_empty());
    assert_eq!(hold.resolved_by, ANALYST);
    // A raise above the analyst's authority is refused.
    let too_much = c
        .release_hold(pb::ReleaseHoldRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            hold_id: rejected.hold_id.clone(),
            actor: ANALYST.into(),
            reason: "big raise".into(),
            raise_limit_to: eur("500000.00"),
        })
        .await
        .unwrap_err();
    assert_eq!(too_much.code(), Code::FailedPrecondition);
    let gone = c
        .reject_hold(pb::RejectHoldRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            hold_id: rejected.hold_id.clone(),
            actor: ANALYST.into(),
            reason: "customer insolvent".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap();
    assert_eq!(gone.state(), pb::HoldState::Rejected);

    // A payment makes room: the batch re-check releases what now passes.
    let another = reserve(c, &customer, "o-4", "100.00").await;
    assert_eq!(another.decision(), pb::Decision::Hold);
    // 1,150.00 of 1,200.00 is used.
    let o1 = reserve(c, &customer, "o-1b", "60.00").await;
    assert_eq!(o1.decision(), pb::Decision::Hold);
    c.release_reservation(pb::ReleaseReservationRequest {
        idempotency_key: key(),
        tenant_id: TENANT.into(),
        reservation_id: hold.reservation_id.clone(),
        reason: "order cancelled".into(),
    })
    .await
    .unwrap();
    let rechecked = c
        .recheck_holds(pb::RecheckHoldsRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let orders: Vec<_> = rechecked
        .released
        .iter()
        .map(|h| h.order_id.as_str())
        .collect();
    assert_eq!(orders, ["o-4", "o-1b"]);
    assert_eq!(rechecked.still_held, 0);

    // Listed, newest first, and acknowledgeable.
    let alerts = c
        .list_alerts(pb::ListAlertsRequest {
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
            unacknowledged_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .alerts;
    assert!(alerts.len() >= 5, "{alerts:?}");
    let acked = c
        .acknowledge_alert(pb::AcknowledgeAlertRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            alert_id: alerts[0].alert_id.clone(),
            actor: ANALYST.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .alert
        .unwrap();
    assert!(acked.acknowledged);
    let unacked = c
        .list_alerts(pb::ListAlertsRequest {
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
            unacknowledged_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .alerts;
    assert_eq!(unacked.len(), alerts.len() - 1);
    assert_consistent(c, &customer).await;
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_and_alerts_sqlite() {
    holds_and_alerts(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_and_alerts_postgres() {
    holds_and_alerts(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_alert_consumer_never_slows_checks() {
    let Some(mut h) = start(Backend::Sqlite, "stall").await else {
        return;
    };
    // Opened and never read.
    let _stalled = h
        .client
        .stream_alerts(pb::StreamAlertsRequest {
            tenant_id: TENANT.into(),
        })
        .await
        .unwrap();
    let customer = open_with_limit(&mut h.client, "0.00").await;
    for i in 0..100 {
        // Every one is held and raises an alert nobody reads.
        let d = reserve(&mut h.client, &customer, &format!("o-{i}"), "1.00").await;
        assert_eq!(d.decision(), pb::Decision::Hold);
    }
    // A consumer that falls behind is told how many it missed.
    let mut late = h
        .client
        .stream_alerts(pb::StreamAlertsRequest {
            tenant_id: TENANT.into(),
        })
        .await
        .unwrap()
        .into_inner();
    reserve(&mut h.client, &customer, "last", "1.00").await;
    let next = tokio::time::timeout(Duration::from_secs(10), late.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.alert.unwrap().order_id, "last");
    h.served.stop().await;
}

async fn limit_approvals(backend: Backend) {
    let Some(mut h) = start(backend, "approvals").await else {
        return;
    };
    let c = &mut h.client;
    let customer = open_with_limit(c, "50000.00").await;
    let requested = set_limit(c, &customer, "250000.00", ANALYST).await;
    let change = requested.change.unwrap();
    assert_eq!(change.status(), pb::LimitChangeStatus::PendingApproval);
    assert_eq!(
        amount(&exposure(c, &customer).await.credit_limit),
        "50000.00",
        "not applied yet"
    );
    let same_user = c
        .decide_limit_change(pb::DecideLimitChangeRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            limit_change_id: change.limit_change_id.clone(),
            approve: true,
            reason: "ok".into(),
            actor: ANALYST.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(same_user.code(), Code::FailedPrecondition);
    let approved = c
        .decide_limit_change(pb::DecideLimitChangeRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            limit_change_id: change.limit_change_id.clone(),
            approve: true,
            reason: "financials reviewed".into(),
            actor: SUPERVISOR.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        approved.change.unwrap().status(),
        pb::LimitChangeStatus::Applied
    );
    assert_eq!(
        amount(&exposure(c, &customer).await.credit_limit),
        "250000.00"
    );
    // A rejected request changes nothing but the audit.
    let second = set_limit(c, &customer, "900000.00", ANALYST)
        .await
        .change
        .unwrap();
    let rejected = c
        .decide_limit_change(pb::DecideLimitChangeRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            limit_change_id: second.limit_change_id.clone(),
            approve: false,
            reason: "not justified".into(),
            actor: SUPERVISOR.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rejected.change.unwrap().status(),
        pb::LimitChangeStatus::Rejected
    );
    assert_eq!(
        amount(&exposure(c, &customer).await.credit_limit),
        "250000.00"
    );
    // Lowering never needs a second user.
    let lowered = set_limit(c, &customer, "1000.00", ANALYST).await;
    assert_eq!(
        lowered.change.unwrap().status(),
        pb::LimitChangeStatus::Applied
    );
    let audit = c
        .list_limit_changes(pb::ListLimitChangesRequest {
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .changes;
    let trail: Vec<_> = audit
        .iter()
        .map(|c| {
            (
                amount(&c.before).to_owned(),
                amount(&c.after).to_owned(),
                c.requested_by.clone(),
                c.decided_by.clone(),
            )
        })
        .collect();
    assert_eq!(
        trail,
        [
            (
                "250000.00".into(),
                "1000.00".into(),
                ANALYST.to_owned(),
                ANALYST.to_owned()
            ),
            (
                "250000.00".into(),
                "900000.00".into(),
                ANALYST.to_owned(),
                SUPERVISOR.to_owned()
            ),
            (
                "50000.00".into(),
                "250000.00".into(),
                ANALYST.to_owned(),
                SUPERVISOR.to_owned()
            ),
            (
                "0.00".into(),
                "50000.00".into(),
                ANALYST.to_owned(),
                ANALYST.to_owned()
            ),
        ]
    );
    assert!(
        audit
            .iter()
            .all(|c| !c.reason.is_empty() && !c.requested_at.is_empty())
    );
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_approvals_sqlite() {
    limit_approvals(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_approvals_postgres() {
    limit_approvals(Backend::Postgres).await;
}

async fn amendments_and_expiry(backend: Backend) {
    let settings = o2c_credit::CreditSettings {
        reservation_ttl_ms: 3_600_000,
        ..Default::default()
    };
    let Some(mut h) = start_with(backend, "amend", settings, None).await else {
        return;
    };
    let c = &mut h.client;
    let customer = open_with_limit(c, "1000.00").await;
    let first = reserve(c, &customer, "o-1", "400.00").await;
    let amend = |value: &str| pb::AmendReservationRequest {
        idempotency_key: key(),
        tenant_id: TENANT.into(),
        reservation_id: first.reservation_id.clone(),
        new_amount: eur(value),
    };
    let up = c
        .amend_reservation(amend("900.00"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(up.decision.unwrap().decision(), pb::Decision::Approve);
    let too_far = c
        .amend_reservation(amend("1000.01"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(too_far.decision.unwrap().decision(), pb::Decision::Hold);
    assert_eq!(
        amount(&too_far.reservation.unwrap().amount),
        "900.00",
        "unchanged"
    );
    let down = c
        .amend_reservation(amend("300.00"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(amount(&down.reservation.unwrap().amount), "300.00");
    assert_eq!(amount(&exposure(c, &customer).await.reserved), "300.00");

    // A review date within the notice period and an expiring limit raise
    // one alert each; an unresolved reservation expires.
    c.set_credit_limit(pb::SetCreditLimitRequest {
        idempotency_key: key(),
        tenant_id: TENANT.into(),
        customer_id: customer.clone(),
        credit_limit: eur("1000.00"),
        reason: "review".into(),
        actor: ANALYST.into(),
        valid_until: h.clock.today().format("%Y-%m-%d").to_string(),
        next_review_date: (h.clock.today() + chrono::Duration::days(7))
            .format("%Y-%m-%d")
            .to_string(),
    })
    .await
    .unwrap();
    h.clock.advance(chrono::Duration::days(2));
    let (expired, alerts) = h.maintenance.run_once().await.unwrap();
    assert_eq!((expired, alerts), (1, 2));
    assert_eq!(
        h.maintenance.run_once().await.unwrap(),
        (0, 0),
        "each alert once"
    );
    let e = assert_consistent(&mut h.client, &customer).await;
    assert_eq!(amount(&e.reserved), "0.00");
    let gone = h
        .client
        .amend_reservation(pb::AmendReservationRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            reservation_id: first.reservation_id.clone(),
            new_amount: eur("1.00"),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::FailedPrecondition);
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amendments_and_expiry_sqlite() {
    amendments_and_expiry(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amendments_and_expiry_postgres() {
    amendments_and_expiry(Backend::Postgres).await;
}

async fn risk_scoring(backend: Backend) {
    let Some(mut h) = start(backend, "risk").await else {
        return;
    };
    let c = &mut h.client;
    let customer = open_with_limit(c, "1000.00").await;
    let facts = c
        .update_risk_facts(pb::UpdateRiskFactsRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
            relationship_since: "2019-03-01".into(),
            annual_volume: eur("400000.00"),
            disputes: 1,
            write_offs: 0,
            broken_promises: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .score
        .unwrap();
    let mut last = facts.score;
    for (days_to_pay, beyond) in [(30, 0), (28, -2), (25, -5), (26, -4)] {
        let score = c
            .record_payment_behaviour(pb::RecordPaymentBehaviourRequest {
                idempotency_key: key(),
                tenant_id: TENANT.into(),
                customer_id: customer.clone(),
                invoice_id: uuid::Uuid::now_v7().to_string(),
                days_to_pay,
                days_beyond_terms: beyond,
            })
            .await
            .unwrap()
            .into_inner()
            .score
            .unwrap();
        last = score.score;
    }
    assert!(
        last > facts.score,
        "punctual payments raise the score ({} -> {last})",
        facts.score
    );
    let explained = c
        .explain_score(pb::ExplainScoreRequest {
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .score
        .unwrap();
    assert_eq!(explained.score, last);
    assert_eq!(
        explained.score,
        50 + explained.factors.iter().map(|f| f.points).sum::<i32>()
    );
    assert_eq!(explained.risk_class(), pb::RiskClass::A);
    // Class A: 25 % of annual volume = 100,000.00, within authority.
    let applied = c
        .score_customer(pb::ScoreCustomerRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
            apply_limit: true,
            actor: ANALYST.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let change = applied.change.unwrap();
    assert_eq!(change.status(), pb::LimitChangeStatus::Applied);
    assert_eq!(change.source(), pb::LimitSource::Calculated);
    let account = c
        .get_credit_account(pb::GetCreditAccountRequest {
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .credit_account
        .unwrap();
    let limit = account.credit_limit.clone().unwrap();
    assert_eq!(amount(&limit.amount), "100000.00");
    assert_eq!(limit.source(), pb::LimitSource::Calculated);
    assert_eq!(account.risk_class(), pb::RiskClass::A);
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn risk_scoring_sqlite() {
    risk_scoring(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn risk_scoring_postgres() {
    risk_scoring(Backend::Postgres).await;
}

/// A Redis of our own, so it can die mid-test.
struct OwnRedis {
    child: std::process::Child,
    url: String,
}

async fn own_redis() -> Option<OwnRedis> {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
        listener.local_addr().ok()?.port()
    };
    let child = match std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(error) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "redis-server is required when CI=true: {error}"
            );
            eprintln!("SKIPPED: redis-server not installed ({error})");
            return None;
        }
    };
    let url = format!("redis://127.0.0.1:{port}");
    let ready = o2c_testkit::eventually(Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            let client = redis::Client::open(url.as_str()).ok()?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .ok()
        }
    })
    .await;
    assert!(ready.is_some(), "our redis-server did not come up");
    Some(OwnRedis { child, url })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_dead_reads_fall_back_and_nothing_fails() {
    let Some(mut redis) = own_redis().await else {
        return;
    };
    let Some(mut h) = start_with(
        Backend::Sqlite,
        "redis-dies",
        Default::default(),
        Some(redis.url.clone()),
    )
    .await
    else {
        return;
    };
    let customer = open_with_limit(&mut h.client, "1000.00").await;
    reserve(&mut h.client, &customer, "o-1", "100.00").await;
    let cached = exposure(&mut h.client, &customer).await;
    redis.child.kill().unwrap();
    redis.child.wait().unwrap();
    // Reads and decisions go on against the database.
    assert_eq!(exposure(&mut h.client, &customer).await, cached);
    let next = reserve(&mut h.client, &customer, "o-2", "100.00").await;
    assert_eq!(next.decision(), pb::Decision::Approve);
    assert_eq!(
        amount(&exposure(&mut h.client, &customer).await.reserved),
        "200.00"
    );
    assert_consistent(&mut h.client, &customer).await;
    h.served.stop().await;
}

async fn desk_bad_input(backend: Backend) {
    let Some(mut h) = start(backend, "desk-bad").await else {
        return;
    };
    let c = &mut h.client;
    let customer = open_with_limit(c, "100.00").await;
    let held = reserve(c, &customer, "o-1", "500.00").await;
    let release = pb::ReleaseHoldRequest {
        idempotency_key: key(),
        tenant_id: TENANT.into(),
        hold_id: held.hold_id.clone(),
        actor: ANALYST.into(),
        reason: "check".into(),
        raise_limit_to: None,
    };
    for (field, request) in [
        (
            "hold_id",
            pb::ReleaseHoldRequest {
                hold_id: "h-1".into(),
                ..release.clone()
            },
        ),
        (
            "actor",
            pb::ReleaseHoldRequest {
                actor: String::new(),
                ..release.clone()
            },
        ),
        (
            "reason",
            pb::ReleaseHoldRequest {
                reason: " ".into(),
                ..release.clone()
            },
        ),
        (
            "raise_limit_to.amount",
            pb::ReleaseHoldRequest {
                raise_limit_to: eur("-1.00"),
                ..release.clone()
            },
        ),
        (
            "raise_limit_to.currency_code",
            pb::ReleaseHoldRequest {
                raise_limit_to: Some(o2c_proto::common::v1::Money {
                    amount: "900".into(),
                    currency_code: "USD".into(),
                }),
                ..release.clone()
            },
        ),
    ] {
        assert_invalid(&c.release_hold(request).await.unwrap_err(), field);
    }
    let unknown = pb::ReleaseHoldRequest {
        hold_id: uuid::Uuid::now_v7().to_string(),
        ..release.clone()
    };
    assert_eq!(
        c.release_hold(unknown).await.unwrap_err().code(),
        Code::NotFound
    );
    // Refused requests changed nothing: the limit and the hold are as before.
    assert_eq!(amount(&exposure(c, &customer).await.credit_limit), "100.00");
    let holds = c
        .list_holds(pb::ListHoldsRequest {
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .holds;
    assert_eq!(holds.len(), 1);

    let controls = c
        .set_account_controls(pb::SetAccountControlsRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
            blocked: true,
            max_order_value: eur("0"),
            reason: "x".into(),
            actor: ANALYST.into(),
        })
        .await
        .unwrap_err();
    assert_invalid(&controls, "max_order_value.amount");
    let facts = c
        .update_risk_facts(pb::UpdateRiskFactsRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
            relationship_since: "last year".into(),
            disputes: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&facts, "relationship_since");
    assert_invalid(&facts, "disputes");
    let page = c
        .list_holds(pb::ListHoldsRequest {
            tenant_id: TENANT.into(),
            page_size: 1_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&page, "page_size");
    let limit = c
        .set_credit_limit(pb::SetCreditLimitRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
            credit_limit: eur("10.00"),
            reason: "x".into(),
            actor: String::new(),
            valid_until: "31.12.2027".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&limit, "actor");
    assert_invalid(&limit, "valid_until");
    let decide = c
        .decide_limit_change(pb::DecideLimitChangeRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            limit_change_id: uuid::Uuid::now_v7().to_string(),
            approve: true,
            reason: "x".into(),
            actor: SUPERVISOR.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(decide.code(), Code::NotFound);
    let explain = c
        .explain_score(pb::ExplainScoreRequest {
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(explain.code(), Code::NotFound, "no score yet");
    assert_eq!(amount(&exposure(c, &customer).await.credit_limit), "100.00");
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desk_bad_input_sqlite() {
    desk_bad_input(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desk_bad_input_postgres() {
    desk_bad_input(Backend::Postgres).await;
}

async fn dunning(backend: Backend) {
    let Some(mut h) = start(backend, "dunning").await else {
        return;
    };
    let customer = open_with_limit(&mut h.client, "10000.00").await;
    let first = reserve(&mut h.client, &customer, "o-1", "100.00").await;
    let invoice = uuid::Uuid::now_v7().to_string();
    let due = (h.clock.today() - chrono::Duration::days(20))
        .format("%Y-%m-%d")
        .to_string();
    let issued = (h.clock.today() - chrono::Duration::days(50))
        .format("%Y-%m-%d")
        .to_string();
    let snapshot = |open: &str| {
        let mut snapshot = super::invoice(&customer, "o-1", &invoice, "100.00", open, &due);
        snapshot.issue_date = issued.clone();
        snapshot
    };
    let converted = super::sync(&mut h.client, snapshot("100.00")).await;
    assert_eq!(
        converted.converted.unwrap().reservation_id,
        first.reservation_id
    );
    let dunning_alerts = |h: &mut super::Harness| {
        let mut client = h.client.clone();
        let customer = customer.clone();
        async move {
            client
                .list_alerts(pb::ListAlertsRequest {
                    tenant_id: TENANT.into(),
                    customer_id: customer,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .alerts
                .into_iter()
                .filter(|a| a.kind() == pb::AlertKind::Dunning)
                .map(|a| a.threshold_percent)
                .collect::<Vec<_>>()
        }
    };
    // 20 days: the second reminder; orders still pass.
    h.maintenance.run_once().await.unwrap();
    assert_eq!(dunning_alerts(&mut h).await, [2]);
    h.maintenance.run_once().await.unwrap();
    assert_eq!(dunning_alerts(&mut h).await, [2], "each level once");
    assert_eq!(
        reserve(&mut h.client, &customer, "o-2", "1.00")
            .await
            .decision(),
        pb::Decision::Approve
    );
    // 35 days: hold.
    h.clock.advance(chrono::Duration::days(15));
    h.maintenance.run_once().await.unwrap();
    assert_eq!(dunning_alerts(&mut h).await, [3, 2]);
    let held = reserve(&mut h.client, &customer, "o-3", "1.00").await;
    assert_eq!(reasons(&held), [pb::ReasonCode::OverdueItems]);
    // 65 days: block.
    h.clock.advance(chrono::Duration::days(30));
    h.maintenance.run_once().await.unwrap();
    let blocked = reserve(&mut h.client, &customer, "o-4", "1.00").await;
    assert_eq!(blocked.decision(), pb::Decision::Block);
    assert_eq!(
        reasons(&blocked),
        [pb::ReasonCode::OverdueItems, pb::ReasonCode::DunningBlock]
    );
    // Paid: the ladder no longer applies.
    super::sync(&mut h.client, snapshot("0.00")).await;
    // Paid in full 65 days late, 95 days after issue: a payment fact the
    // scorecard now explains.
    let explained = h
        .client
        .explain_score(pb::ExplainScoreRequest {
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .score
        .unwrap();
    let factor = |name: &str| {
        explained
            .factors
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value.clone())
    };
    assert_eq!(factor("days_beyond_terms").as_deref(), Some("65.0"));
    assert_eq!(factor("average_days_to_pay").as_deref(), Some("95.0"));
    assert_eq!(
        reserve(&mut h.client, &customer, "o-5", "1.00")
            .await
            .decision(),
        pb::Decision::Approve
    );
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dunning_sqlite() {
    dunning(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dunning_postgres() {
    dunning(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_in_the_outbox_while_a_subscriber_is_down() {
    let down = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let settings = o2c_credit::CreditSettings {
        event_subscribers: [("crm-sync".to_owned(), down)].into_iter().collect(),
        ..Default::default()
    };
    let Some(mut h) = start_with(Backend::Sqlite, "outbox", settings, None).await else {
        return;
    };
    let customer = open_with_limit(&mut h.client, "100.00").await;
    reserve(&mut h.client, &customer, "o-1", "10.00").await;
    // Opened, limit set, reserved: three changes, three events.
    assert_eq!(h.relay.pending("crm-sync").await.unwrap(), 3);
    assert_eq!(h.relay.run_once().await.unwrap(), 0, "nothing delivered");
    assert_eq!(
        h.relay.pending("crm-sync").await.unwrap(),
        3,
        "nothing lost"
    );
    // Backing off: an immediate second pass does not hammer the subscriber.
    assert_eq!(h.relay.run_once().await.unwrap(), 0);
    assert_eq!(h.relay.pending("crm-sync").await.unwrap(), 3);
    h.served.stop().await;
}

/// On PostgreSQL a lane decides a batch on the accounts its last write
/// left, without a read, when it remembers every one of them. A change
/// made elsewhere (a lower limit) fails that batch's write, which is then
/// read and decided again on the account as it is; a retried key collides
/// and is read and replayed.
async fn a_change_behind_the_lanes_memory_is_decided_on(backend: Backend) {
    let Some(mut h) = start(backend, "remembered").await else {
        return;
    };
    let customer = open_with_limit(&mut h.client, "100.00").await;
    let request = |key: &str, order: &str, amount: &str| pb::CheckAndReserveRequest {
        idempotency_key: key.into(),
        tenant_id: TENANT.into(),
        customer_id: customer.clone(),
        order_id: order.into(),
        amount: eur(amount),
        client_reference: String::new(),
    };
    let client = h.client.clone();
    let check = |key: &str, order: &str, amount: &str| {
        let (mut client, request) = (client.clone(), request(key, order, amount));
        async move {
            client
                .check_and_reserve(request)
                .await
                .unwrap()
                .into_inner()
                .decision
                .unwrap()
        }
    };
    let first = check("k-1", "o-1", "60.00").await;
    assert_eq!(first.decision(), pb::Decision::Approve);
    let before = h.batches.timings();
    let second = check("k-2", "o-2", "10.00").await;
    assert_eq!(second.decision(), pb::Decision::Approve);
    let skipped = h.batches.timings().since(&before).reads_skipped;
    match backend {
        Backend::Postgres => assert_eq!(skipped, 1, "decided without a read"),
        Backend::Sqlite => assert_eq!(skipped, 0),
    }
    // Elsewhere, the limit falls under what is reserved (70.00).
    set_limit(&mut h.client, &customer, "50.00", ANALYST).await;
    let third = check("k-3", "o-3", "5.00").await;
    assert_ne!(third.decision(), pb::Decision::Approve, "{third:?}");
    assert!(
        reasons(&third).contains(&pb::ReasonCode::OverLimit),
        "{third:?}"
    );
    // A retry of an earlier key replays its decision.
    let again = check("k-2", "o-2", "10.00").await;
    assert_eq!(again, second);
    let fourth = check("k-4", "o-4", "1.00").await;
    assert_ne!(fourth.decision(), pb::Decision::Approve, "{fourth:?}");
    // A second check of an order in another currency is refused as a
    // second check, as a read finds it, not for its currency.
    let mut in_usd = request("k-usd", "o-1", "1.00");
    in_usd.amount = Some(o2c_proto::common::v1::Money {
        amount: "1.00".into(),
        currency_code: "USD".into(),
    });
    let refused = h.client.check_and_reserve(in_usd).await.unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
    // Blocked: a block inserts no row another check of an order collides
    // with, so a block decided on memory is decided again after a read,
    // where a second check of a reserved order is refused as one.
    h.client
        .set_account_controls(pb::SetAccountControlsRequest {
            idempotency_key: key(),
            tenant_id: TENANT.into(),
            customer_id: customer.clone(),
            blocked: true,
            max_order_value: None,
            reason: "test".into(),
            actor: ANALYST.into(),
        })
        .await
        .unwrap();
    let fifth = check("k-5", "o-5", "1.00").await;
    assert_eq!(fifth.decision(), pb::Decision::Block, "{fifth:?}");
    for (key, order) in [("k-6", "o-1"), ("k-7", "o-3")] {
        let second = h
            .client
            .check_and_reserve(request(key, order, "1.00"))
            .await
            .unwrap_err();
        assert_eq!(second.code(), Code::AlreadyExists, "{order}: {second:?}");
    }
    let e = assert_consistent(&mut h.client, &customer).await;
    assert_eq!(amount(&e.reserved), "70.00");
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_behind_the_lanes_memory_is_decided_on_sqlite() {
    a_change_behind_the_lanes_memory_is_decided_on(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_behind_the_lanes_memory_is_decided_on_postgres() {
    a_change_behind_the_lanes_memory_is_decided_on(Backend::Postgres).await;
}

/// A customer the lane remembers becomes the parent of a group: its next
/// order is read and decided one by one, as a parent's are, and the group
/// limit holds across parent and member.
async fn a_new_parent_leaves_the_lanes_memory(backend: Backend) {
    let Some(mut h) = start(backend, "new_parent").await else {
        return;
    };
    let parent = open_with_limit(&mut h.client, "10.00").await;
    for order in ["p-1", "p-2"] {
        let decision = reserve(&mut h.client, &parent, order, "3.00").await;
        assert_eq!(decision.decision(), pb::Decision::Approve);
    }
    let member = uuid::Uuid::now_v7().to_string();
    open(&mut h.client, &member, &parent).await.unwrap();
    set_limit(&mut h.client, &member, "5.00", ANALYST).await;
    let before = h.batches.decided();
    let third = reserve(&mut h.client, &parent, "p-3", "3.00").await;
    assert_eq!(third.decision(), pb::Decision::Approve, "{third:?}");
    let after = h.batches.decided();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (0, 1),
        "one by one"
    );
    // The group's limit is the parent's: 9.00 of 10.00 is taken (the
    // member's own limit, 5.00, would allow 2.00).
    let over = reserve(&mut h.client, &member, "m-1", "2.00").await;
    assert_ne!(over.decision(), pb::Decision::Approve, "{over:?}");
    let fits = reserve(&mut h.client, &member, "m-2", "1.00").await;
    assert_eq!(fits.decision(), pb::Decision::Approve, "{fits:?}");
    assert_consistent(&mut h.client, &parent).await;
    h.served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_parent_leaves_the_lanes_memory_sqlite() {
    a_new_parent_leaves_the_lanes_memory(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_parent_leaves_the_lanes_memory_postgres() {
    a_new_parent_leaves_the_lanes_memory(Backend::Postgres).await;
}
