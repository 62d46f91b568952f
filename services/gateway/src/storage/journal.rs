//! Write-behind of placed orders.
//!
//! A placed order is decided, and made durable, by the credit service: its
//! decision (with the order's customer, amount and client reference) is
//! committed before credit answers. The gateway's own row for the order is
//! a copy that its later workflow (amend, cancel, invoice, holds) works on,
//! so PlaceOrder does not wait for it: it hands the row to the [`Journal`],
//! whose writer inserts what queued within [`LINGER`] in one statement.
//!
//! - A row already there is left as it is (`ON CONFLICT DO NOTHING`): a
//!   retried call, or a row rebuilt from credit first, never overwrites
//!   what happened to the order since.
//! - Anyone about to read an order that is not there yet calls
//!   [`Journal::flush`] and reads again; an order that is still missing
//!   (another replica placed it, or this one stopped before writing) is
//!   rebuilt from its credit decision by the caller.
//! - On PostgreSQL it writes through a pool of its own whose commits are
//!   asynchronous ([`o2c_kit::db::connect_async_commit`]): what it writes is
//!   already durable in credit, so a crash costs at most a rebuild, and the
//!   gateway's writes neither wait for the disk nor queue with credit's
//!   commits for it. Each write is one statement: one round trip.
//! - A write that keeps failing is given up after [`ATTEMPTS`] tries and
//!   logged: those orders, too, are rebuilt from credit when next read.

use std::time::Duration;

use sea_orm::DatabaseConnection;
use tokio::sync::{mpsc, oneshot};

use super::entities::order;
use o2c_kit::ApiError;

/// Rows waiting to be written before PlaceOrder waits for room.
pub const CAPACITY: usize = 4096;
/// Most rows written by one statement.
pub const MAX_BATCH: usize = 256;
/// Tries of one write before its rows are left to be rebuilt.
pub const ATTEMPTS: u32 = 5;
/// Pause after the first failed try; each next one doubles.
const BACKOFF: Duration = Duration::from_millis(50);
/// How long the writer waits for more rows before writing what it has
/// (a flush writes at once): at a few orders a second, one statement
/// carries several instead of each costing the database its own.
pub const LINGER: Duration = Duration::from_millis(10);

enum Entry {
    Row(Box<order::Model>),
    Flush(oneshot::Sender<()>),
}

/// Hands placed orders to a writer task; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    sender: mpsc::Sender<Entry>,
}

impl Journal {
    /// Starts the writer on `db` (on PostgreSQL, a pool with asynchronous
    /// commits). It stops when every clone is dropped, after writing what
    /// was queued.
    pub fn start(db: DatabaseConnection) -> Self {
        let (sender, receiver) = mpsc::channel(CAPACITY);
        tokio::spawn(write(db, receiver));
        Self { sender }
    }

    /// Queues `row`; waits only when [`CAPACITY`] rows are waiting already.
    pub async fn record(&self, row: order::Model) -> Result<(), ApiError> {
        self.sender
            .send(Entry::Row(Box::new(row)))
            .await
            .map_err(|_| ApiError::Unavailable("the order journal has stopped".into()))
    }

    /// Returns once every row queued before this call was written (or given
    /// up).
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.sender.send(Entry::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }
}

async fn write(db: DatabaseConnection, mut receiver: mpsc::Receiver<Entry>) {
    let mut rows = Vec::with_capacity(MAX_BATCH);
    let mut flushed = Vec::new();
    while let Some(first) = receiver.recv().await {
        // Rows that follow within LINGER go into the same statement; a
        // flush ends the wait.
        let deadline = tokio::time::Instant::now() + LINGER;
        let mut next = Some(first);
        while let Some(entry) = next.take() {
            match entry {
                Entry::Row(row) => rows.push(*row),
                Entry::Flush(done) => flushed.push(done),
            }
            if rows.len() < MAX_BATCH && flushed.is_empty() {
                next = tokio::time::timeout_at(deadline, receiver.recv())
                    .await
                    .ok()
                    .flatten();
            }
        }
        if !rows.is_empty() {
            insert(&db, std::mem::take(&mut rows)).await;
        }
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
    }
}

async fn insert(db: &DatabaseConnection, rows: Vec<order::Model>) {
    let mut pause = BACKOFF;
    for attempt in 1..=ATTEMPTS {
        match super::insert_if_absent(db, rows.clone()).await {
            Ok(_) => return,
            Err(error) if attempt < ATTEMPTS => {
                tracing::warn!(%error, attempt, rows = rows.len(), "writing placed orders failed; retrying");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            Err(error) => {
                let ids: Vec<&str> = rows.iter().map(|row| row.id.as_str()).collect();
                tracing::error!(
                    %error,
                    orders = ?ids,
                    "gave up writing placed orders; they are rebuilt from their credit decisions when next read"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::OrderStatus;
    use crate::storage::{self, Order};
    use o2c_money::ids::{CustomerId, OrderId};

    fn placed(status: OrderStatus) -> Order {
        Order {
            id: OrderId::new(),
            customer_id: CustomerId::new(),
            client_reference: "PO-1".into(),
            amount: o2c_money::Money::parse("12.50", "EUR").unwrap(),
            status,
            reasons: Vec::new(),
            reservation_id: None,
            hold_id: None,
            invoice_id: None,
            created_at: chrono::Utc::now(),
        }
    }

    #[tokio::test]
    async fn a_flush_waits_for_what_was_queued_and_a_row_there_is_kept() {
        let db =
            o2c_kit::db::connect_and_migrate::<storage::migrations::Migrator>("sqlite::memory:")
                .await
                .unwrap();
        let journal = Journal::start(db.clone());
        let orders: Vec<Order> = (0..600).map(|_| placed(OrderStatus::Approved)).collect();
        for order in &orders {
            journal.record(storage::row("t", "k", order)).await.unwrap();
        }
        journal.flush().await;
        for order in &orders {
            let stored = storage::get(&db, "t", order.id).await.unwrap();
            assert_eq!(stored.status, OrderStatus::Approved);
            assert_eq!(stored.amount, order.amount);
        }
        // A later copy of a row (a retried call) changes nothing.
        let mut retried = orders[0].clone();
        retried.status = OrderStatus::Held;
        journal
            .record(storage::row("t", "k", &retried))
            .await
            .unwrap();
        journal.flush().await;
        let stored = storage::get(&db, "t", orders[0].id).await.unwrap();
        assert_eq!(stored.status, OrderStatus::Approved);
    }
}
