//! The gRPC face of the payments service: the only module that knows prost
//! types.

use o2c_kit::fields::{self, Violations};
use o2c_kit::idempotency::{self, Begun};
use o2c_kit::{ApiError, proto_money};
use o2c_money::ids::{CustomerId, InvoiceId, PaymentId};
use o2c_proto::events::v1 as events_pb;
use o2c_proto::payments::v1 as pb;
use o2c_proto::payments::v1::payments_service_server::PaymentsService;
use prost::Message;
use sea_orm::DatabaseConnection;
use tonic::{Request, Response, Status};

use crate::domain::{self, Allocation, PaymentError};
use crate::storage::{self, Method, NewPayment, Payment};

/// Serves `o2c.payments.v1.PaymentsService`.
#[derive(Clone)]
pub struct PaymentsApi {
    db: DatabaseConnection,
    clock: o2c_kit::clock::Clock,
    /// Largest single refund without further approval, per currency code
    /// (minor units); currencies not listed cannot be refunded here.
    refund_limits: std::sync::Arc<o2c_kit::settings::CurrencyLimits>,
    events: PaymentEvents,
}

impl PaymentsApi {
    pub fn new(
        db: DatabaseConnection,
        refund_limits: o2c_kit::settings::CurrencyLimits,
        clock: o2c_kit::clock::Clock,
        events: PaymentEvents,
    ) -> Self {
        Self {
            db,
            clock,
            refund_limits: std::sync::Arc::new(refund_limits),
            events,
        }
    }
}

/// Services that take `PaymentChanged`.
pub const PAYMENT_TAKERS: &[&str] = &["invoicing", "crm-sync"];

/// Records payments' events in the transaction of each change.
#[derive(Clone)]
pub struct PaymentEvents {
    subscribers: std::sync::Arc<Vec<String>>,
}

impl PaymentEvents {
    /// Events for `subscribers` (the relay's configured names).
    pub fn new(subscribers: Vec<String>) -> Self {
        Self {
            subscribers: std::sync::Arc::new(o2c_kit::outbox::route(&subscribers, PAYMENT_TAKERS)),
        }
    }

    /// Records `PaymentChanged` for `payment` as it now stands.
    pub async fn changed(
        &self,
        conn: &impl sea_orm::ConnectionTrait,
        payment: &Payment,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), ApiError> {
        let event = events_pb::Event {
            tenant_id: payment.tenant_id.clone(),
            aggregate_type: "payment".into(),
            aggregate_id: payment.id.to_string(),
            body: Some(events_pb::event::Body::PaymentChanged(
                events_pb::PaymentChanged {
                    payment: Some(minimal(payment)),
                },
            )),
            ..Default::default()
        };
        o2c_kit::outbox::record(conn, &self.subscribers, event, now).await
    }
}

/// The payment as events carry it: no subscriber needs the payer's
/// reference text or who ordered a refund and why, so they stay here.
fn minimal(payment: &Payment) -> pb::Payment {
    let mut message = to_proto(payment);
    message.reference.clear();
    for refund in &mut message.refunds {
        refund.reason.clear();
        refund.actor.clear();
    }
    message
}

/// Payments' consumer of invoicing's events: an allocation invoicing could
/// not apply returns to the payment's unapplied cash, exactly once.
#[tonic::async_trait]
impl o2c_kit::outbox::Consumer for PaymentsApi {
    const NAME: &'static str = "payments";

    type Applied = ();

    async fn apply(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        event: &events_pb::Event,
    ) -> Result<(), ApiError> {
        let Some(events_pb::event::Body::AllocationRefused(refused)) = &event.body else {
            return Ok(());
        };
        let Ok(payment_id) = refused.payment_id.parse::<PaymentId>() else {
            return Err(ApiError::Internal(format!(
                "invoicing event {} names an invalid payment",
                event.event_id
            )));
        };
        let expected = proto_money::parse("amount", refused.amount.as_ref())
            .map_err(|e| ApiError::Internal(format!("invoicing event {}: {e}", event.event_id)))?;
        if storage::collection::unallocate(txn, &refused.payment_id, &refused.invoice_id, expected)
            .await?
        {
            tracing::warn!(payment = %payment_id, invoice = %refused.invoice_id, reason = %refused.reason, "allocation refused by invoicing; returned to unapplied cash");
            let payment = storage::get(txn, &event.tenant_id, payment_id).await?;
            self.events.changed(txn, &payment, (self.clock)()).await?;
        }
        Ok(())
    }
}

fn missing() -> ApiError {
    ApiError::Internal("validated fields missing".into())
}

fn payment_error(error: PaymentError) -> ApiError {
    let message = error.to_string();
    match error {
        PaymentError::DuplicateInvoice(_) | PaymentError::OverAllocated { .. } => {
            ApiError::invalid("allocations", message)
        }
        PaymentError::Currency => ApiError::invalid("allocations", message),
        PaymentError::CardNumber => ApiError::invalid("reference", message),
        PaymentError::Money(_) => ApiError::invalid("allocations", message),
    }
}

fn validate(request: &pb::RecordPaymentRequest) -> Result<NewPayment, ApiError> {
    let mut v = Violations::default();
    let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
    let customer = v.check(fields::id::<CustomerId>(
        "customer_id",
        &request.customer_id,
    ));
    let amount = v.check(proto_money::parse_positive(
        "amount",
        request.amount.as_ref(),
    ));
    v.check(idempotency::validate_key(&request.idempotency_key));
    let method = match pb::PaymentMethod::try_from(request.method) {
        Ok(pb::PaymentMethod::BankTransfer) => Some(Method::BankTransfer),
        Ok(pb::PaymentMethod::Card) => Some(Method::Card),
        Ok(pb::PaymentMethod::DirectDebit) => Some(Method::DirectDebit),
        _ => v.check(Err(ApiError::invalid(
            "method",
            "BANK_TRANSFER, CARD or DIRECT_DEBIT",
        ))),
    };
    let reference = v.check(fields::optional_text(
        "reference",
        &request.reference,
        domain::MAX_REFERENCE_LENGTH,
    ));
    if domain::contains_card_number(&request.reference) {
        v.check::<()>(Err(payment_error(PaymentError::CardNumber)));
    }
    if request.allocations.len() > domain::MAX_ALLOCATIONS {
        v.check::<()>(Err(ApiError::invalid(
            "allocations",
            format!("at most {}", domain::MAX_ALLOCATIONS),
        )));
    }
    let mut allocations = Vec::new();
    for (index, allocation) in request.allocations.iter().enumerate() {
        let invoice = v.check(fields::id::<InvoiceId>(
            &format!("allocations[{index}].invoice_id"),
            &allocation.invoice_id,
        ));
        let value = v.check(proto_money::parse_positive(
            &format!("allocations[{index}].amount"),
            allocation.amount.as_ref(),
        ));
        if let (Some(invoice_id), Some(amount)) = (invoice, value) {
            allocations.push(Allocation { invoice_id, amount });
        }
    }
    v.finish()?;
    let (Some(tenant_id), Some(customer_id), Some(amount), Some(method), Some(reference)) =
        (tenant, customer, amount, method, reference)
    else {
        return Err(missing());
    };
    let unapplied = domain::unapplied(amount, &allocations).map_err(payment_error)?;
    Ok(NewPayment {
        id: PaymentId::new(),
        tenant_id,
        customer_id,
        amount,
        unapplied,
        method,
        reference,
        allocations,
    })
}

fn to_proto(payment: &Payment) -> pb::Payment {
    let method = match payment.method {
        Method::BankTransfer => pb::PaymentMethod::BankTransfer,
        Method::Card => pb::PaymentMethod::Card,
        Method::DirectDebit => pb::PaymentMethod::DirectDebit,
    };
    pb::Payment {
        payment_id: payment.id.to_string(),
        tenant_id: payment.tenant_id.clone(),
        customer_id: payment.customer_id.to_string(),
        amount: Some(proto_money::to_proto(&payment.amount)),
        method: method as i32,
        reference: payment.reference.clone(),
        allocations: payment
            .allocations
            .iter()
            .map(|a| pb::Allocation {
                invoice_id: a.invoice_id.to_string(),
                amount: Some(proto_money::to_proto(&a.amount)),
            })
            .collect(),
        unapplied: Some(proto_money::to_proto(&payment.unapplied)),
        received_at: payment
            .received_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        refunds: payment
            .refunds
            .iter()
            .map(|r| refund_to_proto(r, payment.amount.currency()))
            .collect(),
    }
}

fn refund_to_proto(refund: &storage::Refund, currency: o2c_money::Currency) -> pb::Refund {
    pb::Refund {
        refund_id: refund.id.clone(),
        payment_id: refund.payment_id.clone(),
        amount: o2c_money::Money::from_minor_units(refund.amount_minor, currency)
            .ok()
            .map(|m| proto_money::to_proto(&m)),
        reason: refund.reason.clone(),
        actor: refund.actor.clone(),
        refunded_at: refund
            .refunded_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    }
}

#[tonic::async_trait]
impl PaymentsService for PaymentsApi {
    async fn record_payment(
        &self,
        request: Request<pb::RecordPaymentRequest>,
    ) -> Result<Response<pb::RecordPaymentResponse>, Status> {
        let request = request.into_inner();
        let new = validate(&request)?;
        let scope = format!("{}/payments.RecordPayment", new.tenant_id);
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match idempotency::begin(&self.db, &scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let payment = storage::insert(&txn, &new).await?;
        self.events.changed(&txn, &payment, (self.clock)()).await?;
        let response = pb::RecordPaymentResponse {
            payment: Some(to_proto(&payment)),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        Ok(Response::new(response))
    }

    async fn get_payment(
        &self,
        request: Request<pb::GetPaymentRequest>,
    ) -> Result<Response<pb::GetPaymentResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let id = v.check(fields::id::<PaymentId>("payment_id", &request.payment_id));
        v.finish()?;
        let (Some(tenant), Some(id)) = (tenant, id) else {
            return Err(missing().into());
        };
        let payment = storage::get(&self.db, &tenant, id).await?;
        Ok(Response::new(pb::GetPaymentResponse {
            payment: Some(to_proto(&payment)),
        }))
    }

    async fn apply_unapplied_cash(
        &self,
        request: Request<pb::ApplyUnappliedCashRequest>,
    ) -> Result<Response<pb::ApplyUnappliedCashResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let id = v.check(fields::id::<PaymentId>("payment_id", &request.payment_id));
        if request.allocations.is_empty() || request.allocations.len() > domain::MAX_ALLOCATIONS {
            v.check::<()>(Err(ApiError::invalid(
                "allocations",
                format!("1 to {}", domain::MAX_ALLOCATIONS),
            )));
        }
        let mut allocations = Vec::new();
        for (index, allocation) in request.allocations.iter().enumerate() {
            let invoice = v.check(fields::id::<InvoiceId>(
                &format!("allocations[{index}].invoice_id"),
                &allocation.invoice_id,
            ));
            let value = v.check(proto_money::parse_positive(
                &format!("allocations[{index}].amount"),
                allocation.amount.as_ref(),
            ));
            if let (Some(invoice_id), Some(amount)) = (invoice, value) {
                allocations.push(Allocation { invoice_id, amount });
            }
        }
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(id)) = (tenant, id) else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/payments.ApplyUnappliedCash");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match idempotency::begin(&self.db, &scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let payment = storage::get(&txn, &tenant, id).await?;
        // Same currency, each invoice once: the same rule as at receipt.
        domain::unapplied(payment.unapplied, &allocations).map_err(payment_error)?;
        let payment = storage::apply_unapplied(&txn, &payment, &allocations).await?;
        self.events.changed(&txn, &payment, (self.clock)()).await?;
        let response = pb::ApplyUnappliedCashResponse {
            payment: Some(to_proto(&payment)),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        Ok(Response::new(response))
    }

    async fn refund_payment(
        &self,
        request: Request<pb::RefundPaymentRequest>,
    ) -> Result<Response<pb::RefundPaymentResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let id = v.check(fields::id::<PaymentId>("payment_id", &request.payment_id));
        let amount = v.check(proto_money::parse_positive(
            "amount",
            request.amount.as_ref(),
        ));
        let reason = v.check(fields::text(
            "reason",
            &request.reason,
            domain::MAX_REFERENCE_LENGTH,
        ));
        let actor = v.check(fields::text("actor", &request.actor, 100));
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(id), Some(amount), Some(reason), Some(actor)) =
            (tenant, id, amount, reason, actor)
        else {
            return Err(missing().into());
        };
        if !self.refund_limits.allows(&amount) {
            return Err(ApiError::FailedPrecondition(format!(
                "refunds of {amount} are above the configured limit for {}",
                amount.currency()
            ))
            .into());
        }
        let scope = format!("{tenant}/payments.RefundPayment");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match idempotency::begin(&self.db, &scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let payment = storage::get(&txn, &tenant, id).await?;
        if payment.amount.currency() != amount.currency() {
            return Err(
                ApiError::invalid("amount.currency_code", "must be the payment currency").into(),
            );
        }
        let (refund, payment) =
            storage::refund(&txn, &payment, amount, &reason, &actor, chrono::Utc::now()).await?;
        tracing::info!(payment = %payment.id, refund = %refund.id, actor = %actor, "refund");
        self.events.changed(&txn, &payment, (self.clock)()).await?;
        let response = pb::RefundPaymentResponse {
            refund: Some(refund_to_proto(&refund, payment.amount.currency())),
            payment: Some(to_proto(&payment)),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        Ok(Response::new(response))
    }

    async fn create_mandate(
        &self,
        request: Request<pb::CreateMandateRequest>,
    ) -> Result<Response<pb::CreateMandateResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        let method = match pb::PaymentMethod::try_from(request.method) {
            Ok(pb::PaymentMethod::DirectDebit) => Some(Method::DirectDebit),
            Ok(pb::PaymentMethod::Card) => Some(Method::Card),
            _ => v.check(Err(ApiError::invalid("method", "DIRECT_DEBIT or CARD"))),
        };
        let token = v.check(fields::text(
            "processor_token",
            &request.processor_token,
            200,
        ));
        if domain::contains_card_number(&request.processor_token) {
            v.check::<()>(Err(ApiError::invalid(
                "processor_token",
                "must be the processor's token, never a card number",
            )));
        }
        if request.last4.len() != 4 || !request.last4.bytes().all(|b| b.is_ascii_digit()) {
            v.check::<()>(Err(ApiError::invalid("last4", "exactly four digits")));
        }
        let currency = v.check(proto_money::parse_currency(
            "currency_code",
            &request.currency_code,
        ));
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(customer), Some(method), Some(token), Some(currency)) =
            (tenant, customer, method, token, currency)
        else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/payments.CreateMandate");
        // The stored request must not keep the token in clear.
        let mut pinned = request.clone();
        pinned.processor_token = idempotency::pin_secret(&tenant, &request.processor_token);
        let (key, bytes) = (&request.idempotency_key, pinned.encode_to_vec());
        let txn = match idempotency::begin(&self.db, &scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let mandate = storage::collection::insert_mandate(
            &txn,
            &storage::collection::NewMandate {
                tenant_id: &tenant,
                customer_id: &customer.to_string(),
                method: method.code(),
                token: &token,
                last4: &request.last4,
                currency: currency.code(),
            },
            (self.clock)(),
        )
        .await?;
        let response = pb::CreateMandateResponse {
            mandate: Some(mandate_to_proto(&mandate)),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        Ok(Response::new(response))
    }

    async fn revoke_mandate(
        &self,
        request: Request<pb::RevokeMandateRequest>,
    ) -> Result<Response<pb::RevokeMandateResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let id = v.check(fields::id::<uuid::Uuid>("mandate_id", &request.mandate_id));
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(id)) = (tenant, id) else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/payments.RevokeMandate");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match idempotency::begin(&self.db, &scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let mandate = storage::collection::get_mandate(&txn, &tenant, &id.to_string()).await?;
        let mandate = storage::collection::revoke_mandate(&txn, &mandate).await?;
        let response = pb::RevokeMandateResponse {
            mandate: Some(mandate_to_proto(&mandate)),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        Ok(Response::new(response))
    }

    async fn schedule_collection(
        &self,
        request: Request<pb::ScheduleCollectionRequest>,
    ) -> Result<Response<pb::ScheduleCollectionResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        let invoice = v.check(fields::id::<InvoiceId>("invoice_id", &request.invoice_id));
        let amount = v.check(proto_money::parse_positive(
            "amount",
            request.amount.as_ref(),
        ));
        let due = v.check(
            fields::optional_date("due_date", &request.due_date)
                .and_then(|d| d.ok_or_else(|| ApiError::invalid("due_date", "required"))),
        );
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(customer), Some(invoice), Some(amount), Some(due)) =
            (tenant, customer, invoice, amount, due)
        else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/payments.ScheduleCollection");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match idempotency::begin(&self.db, &scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let mandate = storage::collection::active_mandate(
            &txn,
            &tenant,
            &customer.to_string(),
            amount.currency().code(),
        )
        .await?
        .ok_or_else(|| ApiError::not_found("active mandate of customer", customer))?;
        let session = storage::collection::schedule(
            &txn,
            &mandate,
            &invoice.to_string(),
            amount,
            due,
            (self.clock)(),
        )
        .await?;
        let response = pb::ScheduleCollectionResponse {
            session: Some(session_to_proto(&session, &[])?),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        Ok(Response::new(response))
    }

    async fn get_payment_session(
        &self,
        request: Request<pb::GetPaymentSessionRequest>,
    ) -> Result<Response<pb::GetPaymentSessionResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let id = v.check(fields::id::<uuid::Uuid>("session_id", &request.session_id));
        v.finish()?;
        let (Some(tenant), Some(id)) = (tenant, id) else {
            return Err(missing().into());
        };
        let (session, attempts) =
            storage::collection::get_session(&self.db, &tenant, &id.to_string()).await?;
        Ok(Response::new(pb::GetPaymentSessionResponse {
            session: Some(session_to_proto(&session, &attempts)?),
        }))
    }

    async fn list_payment_sessions(
        &self,
        request: Request<pb::ListPaymentSessionsRequest>,
    ) -> Result<Response<pb::ListPaymentSessionsResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        let size = v.check(fields::page_size("page_size", request.page_size));
        let token = if request.page_token.is_empty() {
            Some(None)
        } else {
            v.check(
                fields::id::<uuid::Uuid>("page_token", &request.page_token)
                    .map(|t| Some(t.to_string())),
            )
        };
        v.finish()?;
        let (Some(tenant), Some(customer), Some(size), Some(token)) =
            (tenant, customer, size, token)
        else {
            return Err(missing().into());
        };
        let page = storage::collection::list_sessions(
            &self.db,
            &tenant,
            &customer.to_string(),
            token,
            size,
        )
        .await?;
        let mut sessions = Vec::new();
        for session in &page {
            let (_, attempts) =
                storage::collection::get_session(&self.db, &tenant, &session.id).await?;
            sessions.push(session_to_proto(session, &attempts)?);
        }
        let next_page_token = if page.len() as u64 == size {
            page.last().map(|s| s.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListPaymentSessionsResponse {
            sessions,
            next_page_token,
        }))
    }
}

fn mandate_to_proto(mandate: &storage::collection::Mandate) -> pb::Mandate {
    let method = match mandate.method.as_str() {
        "CARD" => pb::PaymentMethod::Card,
        "DIRECT_DEBIT" => pb::PaymentMethod::DirectDebit,
        _ => pb::PaymentMethod::Unspecified,
    };
    let status = match mandate.status.as_str() {
        storage::collection::MANDATE_ACTIVE => pb::MandateStatus::Active,
        storage::collection::MANDATE_REVOKED => pb::MandateStatus::Revoked,
        _ => pb::MandateStatus::Unspecified,
    };
    pb::Mandate {
        mandate_id: mandate.id.clone(),
        customer_id: mandate.customer_id.clone(),
        method: method as i32,
        last4: mandate.last4.clone(),
        status: status as i32,
        currency_code: mandate.currency_code.clone(),
        created_at: mandate
            .created_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    }
}

pub(crate) fn session_to_proto(
    session: &storage::collection::Session,
    attempts: &[storage::collection::Attempt],
) -> Result<pb::PaymentSession, ApiError> {
    use storage::collection as c;
    let state = match session.state.as_str() {
        c::SCHEDULED => pb::SessionState::Scheduled,
        c::RETRYING => pb::SessionState::Retrying,
        c::COLLECTED => pb::SessionState::Collected,
        c::SUCCEEDED => pb::SessionState::Succeeded,
        c::FAILED => pb::SessionState::Failed,
        _ => pb::SessionState::Unspecified,
    };
    let currency = o2c_money::Currency::from_code(&session.currency_code)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let amount = o2c_money::Money::from_minor_units(session.amount_minor, currency)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(pb::PaymentSession {
        session_id: session.id.clone(),
        customer_id: session.customer_id.clone(),
        mandate_id: session.mandate_id.clone(),
        invoice_id: session.invoice_id.clone(),
        amount: Some(proto_money::to_proto(&amount)),
        state: state as i32,
        scheduled_for: session.scheduled_for.format("%Y-%m-%d").to_string(),
        next_attempt_at: session
            .next_attempt_at
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default(),
        attempts: attempts
            .iter()
            .map(|a| pb::PaymentAttempt {
                number: a.number,
                attempted_at: a
                    .attempted_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                succeeded: a.succeeded,
                failure_reason: a.failure_reason.clone().unwrap_or_default(),
            })
            .collect(),
        payment_id: session.payment_id.clone().unwrap_or_default(),
    })
}
