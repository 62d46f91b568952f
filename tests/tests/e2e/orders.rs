//! Placing orders: a retry is the same order, a different request under
//! the same key is refused, and a gateway that has no row for an order
//! (the replica that placed it stopped before its journal wrote the row)
//! rebuilds it from the credit decision and works on from there.

use o2c_proto::gateway::v1 as pb;
use o2c_proto::gateway::v1::gateway_service_client::GatewayServiceClient;
use o2c_testkit::{Backend, assert_invalid};

use super::{Running, amount, as_tenant, eur, exposure, issuer, key, onboard, run_suite};

/// Another gateway on the same services, with a database of its own.
async fn bare_gateway(
    s: &Running,
    backend: Backend,
) -> (o2c_testkit::Served, o2c_testkit::TestDatabase) {
    let db = o2c_testkit::database(backend, "gateway_bare")
        .await
        .unwrap();
    let mut service = o2c_kit::settings::ServiceSettings::local("gateway", 0);
    service.database_url = db.url.clone();
    let a = &s.suite.addresses;
    let upstreams = o2c_gateway::Upstreams {
        customer_url: format!("http://{}", a.customer),
        credit_url: format!("http://{}", a.credit),
        invoicing_url: format!("http://{}", a.invoicing),
        payments_url: format!("http://{}", a.payments),
        crm_sync_url: format!("http://{}", a.crm_sync),
        reconcile_interval_ms: 0,
        auth: o2c_gateway::auth::AuthSettings {
            jwt_issuers: vec![issuer()],
            ..Default::default()
        },
        ..Default::default()
    };
    let routes = o2c_gateway::build(&service, &upstreams, None)
        .await
        .unwrap();
    (
        o2c_testkit::serve(o2c_gateway::SERVICE_NAME, routes).await,
        db,
    )
}

async fn placing_orders(backend: Backend) {
    let Some(mut s) = run_suite(backend).await else {
        return;
    };
    let customer = onboard(&mut s.gateway, "100.00").await;
    let place = |key: &str, reference: &str, value: &str| pb::PlaceOrderRequest {
        idempotency_key: key.into(),
        customer_id: customer.clone(),
        client_reference: reference.into(),
        amount: eur(value),
    };
    let first_key = key();
    let placed = s
        .gateway
        .place_order(as_tenant(place(&first_key, "PO-1", "30.00")))
        .await
        .unwrap()
        .into_inner();
    let order = placed.order.clone().unwrap();
    assert_eq!(order.status(), pb::OrderStatus::Approved);

    // A retry is answered with the same order, and reserves nothing more.
    let again = s
        .gateway
        .place_order(as_tenant(place(&first_key, "PO-1", "30.00")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.order, placed.order);
    assert_eq!(
        amount(&exposure(&mut s.gateway, &customer).await.reserved),
        "30.00"
    );

    // The same key with another amount or reference is refused.
    for (reference, value) in [("PO-1", "31.00"), ("PO-2", "30.00")] {
        let refused = s
            .gateway
            .place_order(as_tenant(place(&first_key, reference, value)))
            .await
            .unwrap_err();
        assert_invalid(&refused, "idempotency_key");
    }
    assert_eq!(
        amount(&exposure(&mut s.gateway, &customer).await.reserved),
        "30.00"
    );

    // Over the limit: held.
    let held = s
        .gateway
        .place_order(as_tenant(place(&key(), "PO-3", "90.00")))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(held.status(), pb::OrderStatus::Held);

    // A gateway without rows for either order reads both as placed.
    let (bare, _db) = bare_gateway(&s, backend).await;
    let mut bare = GatewayServiceClient::new(bare.channel().await);
    let read = |order: &pb::Order| {
        as_tenant(pb::GetOrderRequest {
            order_id: order.order_id.clone(),
        })
    };
    let rebuilt = bare.get_order(read(&order)).await.unwrap().into_inner();
    assert_eq!(rebuilt.order.as_ref(), Some(&order));
    let rebuilt = bare.get_order(read(&held)).await.unwrap().into_inner();
    assert_eq!(rebuilt.order.as_ref(), Some(&held));

    // And works on from there: the held order is released, the approved
    // one cancelled, each changing credit as it should.
    let hold = bare
        .get_credit_profile(as_tenant(pb::GetCreditProfileRequest {
            customer_id: customer.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .open_holds
        .remove(0);
    let released = bare
        .release_hold(as_tenant(pb::ReleaseHoldRequest {
            idempotency_key: key(),
            hold_id: hold.hold_id,
            reason: "known customer".into(),
            raise_limit_to: eur("150.00"),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.order.unwrap().status(), pb::OrderStatus::Approved);
    let cancelled = bare
        .cancel_order(as_tenant(pb::CancelOrderRequest {
            idempotency_key: key(),
            order_id: order.order_id.clone(),
            reason: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(cancelled.status(), pb::OrderStatus::Cancelled);
    assert_eq!(
        amount(&exposure(&mut bare, &customer).await.reserved),
        "90.00"
    );

    // Reconciliation through yet another empty gateway rebuilds an
    // approved order it has no row for, and finds it consistent.
    let other = onboard(&mut s.gateway, "50.00").await;
    s.gateway
        .place_order(as_tenant(pb::PlaceOrderRequest {
            idempotency_key: key(),
            customer_id: other.clone(),
            client_reference: "PO-4".into(),
            amount: eur("20.00"),
        }))
        .await
        .unwrap();
    let (third, _third_db) = bare_gateway(&s, backend).await;
    let mut third = GatewayServiceClient::new(third.channel().await);
    super::assert_reconciled(&mut third, &other).await;

    // An order credit never decided on is not found.
    let unknown = bare
        .get_order(as_tenant(pb::GetOrderRequest {
            order_id: o2c_gateway::domain::order_id_for(super::TENANT, &key()).to_string(),
        }))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placing_orders_on_sqlite() {
    placing_orders(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placing_orders_on_postgres() {
    placing_orders(Backend::Postgres).await;
}

/// Places order `n` of 5.00 (reference "PO-n") under `key`, in a task
/// of its own.
fn spawn_order(
    gateway: &GatewayServiceClient<tonic::transport::Channel>,
    key: &str,
    customer: &str,
    n: usize,
) -> tokio::task::JoinHandle<pb::Order> {
    let mut gateway = gateway.clone();
    let request = pb::PlaceOrderRequest {
        idempotency_key: key.to_owned(),
        customer_id: customer.to_owned(),
        client_reference: format!("PO-{n}"),
        amount: eur("5.00"),
    };
    tokio::spawn(async move {
        gateway
            .place_order(as_tenant(request))
            .await
            .unwrap()
            .into_inner()
            .order
            .unwrap()
    })
}

/// Many orders of one customer at once, as a busy client places them: the
/// gateway sends the checks that arrive while one is with credit in one
/// call (`gateway::grpc::checks`), and every order still gets its own
/// decision, exactly up to the limit, readable as placed; a retry of each
/// is the same order.
async fn concurrent_orders(backend: Backend) {
    let Some(mut s) = run_suite(backend).await else {
        return;
    };
    let customer = onboard(&mut s.gateway, "100.00").await;
    let orders = 30;
    let keys: Vec<String> = (0..orders).map(|_| key()).collect();
    let place = |gateway: &GatewayServiceClient<tonic::transport::Channel>, n: usize| {
        spawn_order(gateway, &keys[n], &customer, n)
    };
    let calls: Vec<_> = (0..orders).map(|n| place(&s.gateway, n)).collect();
    let mut placed = Vec::new();
    for call in calls {
        placed.push(call.await.unwrap());
    }
    let approved = placed
        .iter()
        .filter(|o| o.status() == pb::OrderStatus::Approved)
        .count();
    let held = placed
        .iter()
        .filter(|o| o.status() == pb::OrderStatus::Held)
        .count();
    assert_eq!((approved, held), (20, 10), "exactly up to the limit");
    assert_eq!(
        amount(&exposure(&mut s.gateway, &customer).await.reserved),
        "100.00"
    );
    for (n, order) in placed.iter().enumerate() {
        assert_eq!(order.client_reference, format!("PO-{n}"));
        let read = s
            .gateway
            .get_order(as_tenant(pb::GetOrderRequest {
                order_id: order.order_id.clone(),
            }))
            .await
            .unwrap()
            .into_inner()
            .order;
        assert_eq!(read.as_ref(), Some(order));
    }
    // Retried at once, every order is answered as it was placed.
    let calls: Vec<_> = (0..orders).map(|n| place(&s.gateway, n)).collect();
    for (call, order) in calls.into_iter().zip(&placed) {
        assert_eq!(&call.await.unwrap(), order);
    }
    assert_eq!(
        amount(&exposure(&mut s.gateway, &customer).await.reserved),
        "100.00"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_orders_on_sqlite() {
    concurrent_orders(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_orders_on_postgres() {
    concurrent_orders(Backend::Postgres).await;
}

/// The checks of orders that arrive while one is with credit wait in the
/// gateway and go to credit in one call, each answered as its own. Made
/// certain here: the first order's check waits on its account's row, held
/// by another transaction, until every other order waits in the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_that_arrive_while_a_check_is_away_go_to_credit_together_on_postgres() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let Some(mut s) = run_suite(Backend::Postgres).await else {
        return;
    };
    let customer = onboard(&mut s.gateway, "100.00").await;
    let credit_db = sea_orm::Database::connect(&s._databases[2].url)
        .await
        .unwrap();
    let holder = credit_db.begin().await.unwrap();
    holder
        .execute_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            format!("SELECT 1 FROM credit_accounts WHERE customer_id = '{customer}' FOR UPDATE"),
        ))
        .await
        .unwrap();
    let counts = s.suite.gateway_checks.counts();
    let before = (counts.alone(), counts.batches(), counts.batched());
    let place = |n: usize| spawn_order(&s.gateway, &key(), &customer, n);
    let mut calls = vec![place(0)];
    o2c_testkit::eventually(std::time::Duration::from_secs(20), || async {
        (lock_waiters(&credit_db).await >= 1).then_some(())
    })
    .await
    .expect("the first order's check waits on the account's row");
    calls.extend((1..30).map(place));
    o2c_testkit::eventually(std::time::Duration::from_secs(20), || async {
        (s.suite.gateway_checks.waiting() == 29).then_some(())
    })
    .await
    .expect("the other orders' checks wait in the gateway");
    holder.commit().await.unwrap();
    let mut placed = Vec::new();
    for call in calls {
        placed.push(call.await.unwrap());
    }
    assert_eq!(
        (
            counts.alone() - before.0,
            counts.batches() - before.1,
            counts.batched() - before.2
        ),
        (1, 1, 29),
        "one check alone, then the 29 that waited in one call"
    );
    let approved = placed
        .iter()
        .filter(|o| o.status() == pb::OrderStatus::Approved)
        .count();
    assert_eq!(approved, 20, "exactly up to the limit");
    for (n, order) in placed.iter().enumerate() {
        assert_eq!(order.client_reference, format!("PO-{n}"));
    }
    assert_eq!(
        amount(&exposure(&mut s.gateway, &customer).await.reserved),
        "100.00"
    );
}

/// The number of sessions of the database at `db` waiting for a lock.
async fn lock_waiters(db: &sea_orm::DatabaseConnection) -> i64 {
    use sea_orm::ConnectionTrait;
    db.query_one_raw(sea_orm::Statement::from_string(
        sea_orm::DbBackend::Postgres,
        "SELECT COUNT(*) AS n FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get::<i64>("", "n")
    .unwrap()
}

/// On PostgreSQL the gateway's journal commits asynchronously, so a crash
/// of the database can lose an order's row after a change read it (here:
/// deleted while the cancel waits on credit). The change rebuilds the row
/// from the credit decision and lands on it, instead of answering
/// NOT_FOUND for an order the client was told about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_lost_while_an_order_changes_is_rebuilt_on_postgres() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let Some(mut s) = run_suite(Backend::Postgres).await else {
        return;
    };
    let customer = onboard(&mut s.gateway, "100.00").await;
    let order = s
        .gateway
        .place_order(as_tenant(pb::PlaceOrderRequest {
            idempotency_key: key(),
            customer_id: customer.clone(),
            client_reference: "PO-LOST".into(),
            amount: eur("30.00"),
        }))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(order.status(), pb::OrderStatus::Approved);
    let gateway_db = sea_orm::Database::connect(&s._databases[0].url)
        .await
        .unwrap();
    let credit_db = sea_orm::Database::connect(&s._databases[2].url)
        .await
        .unwrap();
    let id = order.order_id.clone();
    // The journal has written the row.
    let written = o2c_testkit::eventually(std::time::Duration::from_secs(10), || {
        let (db, id) = (&gateway_db, &id);
        async move {
            db.query_one_raw(sea_orm::Statement::from_sql_and_values(
                sea_orm::DbBackend::Postgres,
                "SELECT 1 AS one FROM orders WHERE id = $1",
                [id.clone().into()],
            ))
            .await
            .unwrap()
        }
    })
    .await;
    assert!(written.is_some(), "the journal wrote the order's row");
    // The reservation's row is locked, so the cancel waits in credit after
    // it read the order.
    let lock = credit_db.begin().await.unwrap();
    lock.execute_raw(sea_orm::Statement::from_sql_and_values(
        sea_orm::DbBackend::Postgres,
        "SELECT id FROM credit_reservations WHERE order_id = $1 FOR UPDATE",
        [id.clone().into()],
    ))
    .await
    .unwrap();
    let mut gateway = s.gateway.clone();
    let cancel = tokio::spawn({
        let id = id.clone();
        async move {
            gateway
                .cancel_order(as_tenant(pb::CancelOrderRequest {
                    idempotency_key: key(),
                    order_id: id,
                    reason: "lost row".into(),
                }))
                .await
        }
    });
    let waiting = o2c_testkit::eventually(std::time::Duration::from_secs(10), || {
        let db = &credit_db;
        async move { (lock_waiters(db).await > 0).then_some(()) }
    })
    .await;
    assert!(waiting.is_some(), "the cancel waits for the reservation");
    // The row goes, as in a crash that lost the journal's last commits.
    let deleted = gateway_db
        .execute_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "DELETE FROM orders WHERE id = $1",
            [id.clone().into()],
        ))
        .await
        .unwrap();
    assert_eq!(deleted.rows_affected(), 1);
    lock.rollback().await.unwrap();

    let cancelled = cancel.await.unwrap().unwrap().into_inner().order.unwrap();
    assert_eq!(cancelled.status(), pb::OrderStatus::Cancelled);
    let read = s
        .gateway
        .get_order(as_tenant(pb::GetOrderRequest { order_id: id }))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(read.status(), pb::OrderStatus::Cancelled);
    assert_eq!(
        amount(&exposure(&mut s.gateway, &customer).await.reserved),
        "0.00"
    );
}
