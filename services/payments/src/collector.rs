//! The scheduler of automated collections.
//!
//! Each pass: charges the sessions whose attempt is due through the
//! processor (idempotent by session and attempt), records the payment
//! allocated to the invoice in the same transaction as the attempt, then
//! applies collected payments to the invoice and the credit ledger (with
//! keys derived from the session, so a pass interrupted anywhere is
//! finished by the next without duplicates), and reports final failures
//! to credit as alerts.

use std::sync::Arc;

use o2c_kit::ApiError;
use o2c_kit::auth::CallContext;
use o2c_kit::client::TracedChannel;
use o2c_kit::clock::Clock;
use o2c_kit::proto_money;
use o2c_money::ids::{CustomerId, PaymentId};
use o2c_money::{Currency, Money};
use o2c_proto::credit::v1 as credit_pb;
use o2c_proto::credit::v1::credit_service_client::CreditServiceClient;
use o2c_proto::invoicing::v1 as invoicing_pb;
use o2c_proto::invoicing::v1::invoicing_service_client::InvoicingServiceClient;
use sea_orm::{DatabaseConnection, TransactionTrait};
use tonic::Code;

use crate::domain::processor::{Charge, ChargeOutcome, Processor};
use crate::domain::{self, Allocation};
use crate::storage::collection::{self as c, Session};
use crate::storage::{self, Method, NewPayment};

/// Sessions handled per pass and per state.
pub const BATCH: u64 = 200;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub attempted: usize,
    pub collected: usize,
    pub applied: usize,
    pub failed: usize,
    pub reported: usize,
}

#[derive(Clone)]
pub struct Collector {
    pub(crate) db: DatabaseConnection,
    pub(crate) events: crate::grpc::PaymentEvents,
    pub(crate) processor: Arc<dyn Processor>,
    pub(crate) invoicing: InvoicingServiceClient<TracedChannel>,
    pub(crate) credit: CreditServiceClient<TracedChannel>,
    pub(crate) retry_schedule_ms: Vec<u64>,
    pub(crate) clock: Clock,
}

fn money(session: &Session) -> Result<Money, ApiError> {
    let currency = Currency::from_code(&session.currency_code)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Money::from_minor_units(session.amount_minor, currency)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

impl Collector {
    /// One pass over due, collected and failed sessions.
    pub async fn run_once(&self) -> Result<Pass, ApiError> {
        let mut pass = Pass::default();
        let now = (self.clock)();
        for session in c::due(&self.db, now, BATCH).await? {
            pass.attempted += 1;
            match self.attempt(&session).await? {
                Some(true) => {
                    pass.collected += 1;
                    o2c_kit::metrics::collection("collected");
                }
                Some(false) => o2c_kit::metrics::collection("declined"),
                None => {
                    pass.failed += 1;
                    o2c_kit::metrics::collection("failed");
                }
            }
        }
        for session in c::in_state(&self.db, c::COLLECTED, BATCH).await? {
            let context = CallContext::for_tenant(&session.tenant_id, "collector");
            match o2c_kit::auth::scope(context, self.apply(&session)).await {
                Ok(()) => pass.applied += 1,
                Err(error) => {
                    tracing::warn!(session = %session.id, %error, "applying a collection failed; next pass retries")
                }
            }
        }
        for session in c::unreported_failures(&self.db, BATCH).await? {
            let context = CallContext::for_tenant(&session.tenant_id, "collector");
            match o2c_kit::auth::scope(context, self.report(&session)).await {
                Ok(()) => pass.reported += 1,
                Err(error) => {
                    tracing::warn!(session = %session.id, %error, "reporting a failed collection failed; next pass retries")
                }
            }
        }
        Ok(pass)
    }

    /// Charges the next attempt: Some(true) collected, Some(false) to be
    /// retried, None failed for good.
    async fn attempt(&self, session: &Session) -> Result<Option<bool>, ApiError> {
        let now = (self.clock)();
        let number = session.attempts + 1;
        let mandate = c::get_mandate(&self.db, &session.tenant_id, &session.mandate_id).await?;
        if mandate.status != c::MANDATE_ACTIVE {
            let txn = self.db.begin().await?;
            c::record_attempt(
                &txn,
                session,
                number,
                Some("mandate revoked"),
                c::FAILED,
                None,
                None,
                now,
            )
            .await?;
            txn.commit().await?;
            return Ok(None);
        }
        let amount = money(session)?;
        let outcome = self
            .processor
            .charge(Charge {
                idempotency_key: format!("{}:{number}", session.id),
                token: mandate.processor_token.clone(),
                amount,
                attempt: u32::try_from(number).unwrap_or(u32::MAX),
            })
            .await;
        let txn = self.db.begin().await?;
        let result = match outcome {
            ChargeOutcome::Succeeded(reference) => {
                let invoice_id = session.invoice_id.parse().map_err(|_| {
                    ApiError::Internal(format!("session {} has an invalid invoice", session.id))
                })?;
                let customer_id: CustomerId = session.customer_id.parse().map_err(|_| {
                    ApiError::Internal(format!("session {} has an invalid customer", session.id))
                })?;
                let payment = storage::insert(
                    &txn,
                    &NewPayment {
                        id: PaymentId::new(),
                        tenant_id: session.tenant_id.clone(),
                        customer_id,
                        amount,
                        unapplied: Money::zero(amount.currency()),
                        method: if mandate.method == Method::Card.code() {
                            Method::Card
                        } else {
                            Method::DirectDebit
                        },
                        reference: format!("collection {} ({reference})", session.id),
                        allocations: vec![Allocation { invoice_id, amount }],
                    },
                )
                .await?;
                self.events.changed(&txn, &payment, now).await?;
                c::record_attempt(
                    &txn,
                    session,
                    number,
                    None,
                    c::COLLECTED,
                    None,
                    Some(payment.id),
                    now,
                )
                .await?;
                tracing::info!(session = %session.id, attempt = number, "collected");
                Some(true)
            }
            ChargeOutcome::Declined(reason) => {
                let attempts_so_far = usize::try_from(number).unwrap_or(usize::MAX);
                match domain::next_attempt_delay(&self.retry_schedule_ms, attempts_so_far) {
                    Some(delay_ms) => {
                        let next = now
                            + chrono::Duration::milliseconds(
                                i64::try_from(delay_ms).unwrap_or(i64::MAX),
                            );
                        c::record_attempt(
                            &txn,
                            session,
                            number,
                            Some(&reason),
                            c::RETRYING,
                            Some(next),
                            None,
                            now,
                        )
                        .await?;
                        tracing::info!(session = %session.id, attempt = number, %reason, "declined; will retry");
                        Some(false)
                    }
                    None => {
                        c::record_attempt(
                            &txn,
                            session,
                            number,
                            Some(&reason),
                            c::FAILED,
                            None,
                            None,
                            now,
                        )
                        .await?;
                        tracing::warn!(session = %session.id, attempt = number, %reason, "collection failed for good");
                        None
                    }
                }
            }
        };
        txn.commit().await?;
        Ok(result)
    }

    /// Applies a collected payment to its invoice and the credit ledger.
    async fn apply(&self, session: &Session) -> Result<(), ApiError> {
        let payment_id = session.payment_id.clone().ok_or_else(|| {
            ApiError::Internal(format!("collected session {} has no payment", session.id))
        })?;
        let amount = money(session)?;
        let applied = self
            .invoicing
            .clone()
            .apply_payment(invoicing_pb::ApplyPaymentRequest {
                idempotency_key: format!("collect:{}:apply", session.id),
                tenant_id: session.tenant_id.clone(),
                invoice_id: session.invoice_id.clone(),
                payment_id: payment_id.clone(),
                amount: Some(proto_money::to_proto(&amount)),
            })
            .await;
        let invoice = match applied {
            Ok(response) => response.into_inner().invoice,
            // The invoice was settled otherwise meanwhile: the money stays
            // with the customer as unapplied cash.
            Err(status) if matches!(status.code(), Code::FailedPrecondition | Code::NotFound) => {
                let txn = self.db.begin().await?;
                if c::unallocate(&txn, &payment_id, &session.invoice_id, amount).await? {
                    let id = payment_id.parse().map_err(|_| {
                        ApiError::Internal(format!("session {} has an invalid payment", session.id))
                    })?;
                    let payment = storage::get(&txn, &session.tenant_id, id).await?;
                    self.events.changed(&txn, &payment, (self.clock)()).await?;
                }
                txn.commit().await?;
                None
            }
            Err(status) => return Err(o2c_kit::error::from_upstream("invoicing", status)),
        };
        if let Some(invoice) = invoice {
            // The invoice's own event brings credit up to date as well;
            // this call only makes it immediate.
            let result = self
                .credit
                .clone()
                .sync_receivable(credit_pb::SyncReceivableRequest {
                    tenant_id: session.tenant_id.clone(),
                    invoice: Some(invoice),
                })
                .await;
            if let Err(status) = result {
                return Err(o2c_kit::error::from_upstream("credit", status));
            }
        }
        c::set_state(&self.db, session, c::COLLECTED, c::SUCCEEDED).await?;
        Ok(())
    }

    /// Raises the credit alert for a session that failed for good.
    async fn report(&self, session: &Session) -> Result<(), ApiError> {
        let result = self
            .credit
            .clone()
            .report_collection_failure(credit_pb::ReportCollectionFailureRequest {
                idempotency_key: format!("collect:{}:failed", session.id),
                tenant_id: session.tenant_id.clone(),
                customer_id: session.customer_id.clone(),
                invoice_id: session.invoice_id.clone(),
                session_id: session.id.clone(),
                reason: session
                    .last_failure
                    .clone()
                    .unwrap_or_else(|| "declined".into()),
            })
            .await;
        match result {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => {
                tracing::warn!(session = %session.id, "no credit account to alert on");
            }
            Err(status) => return Err(o2c_kit::error::from_upstream("credit", status)),
        }
        c::mark_reported(&self.db, session).await
    }
}
