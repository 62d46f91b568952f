//! The gRPC face of the payments service: the only module that knows prost
//! types.

use o2c_kit::fields::{self, Violations};
use o2c_kit::idempotency::{self, Begun};
use o2c_kit::{ApiError, proto_money};
use o2c_money::ids::{CustomerId, InvoiceId, PaymentId};
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
    /// Largest single refund without further approval, per currency code
    /// (minor units); currencies not listed cannot be refunded here.
    refund_limits: std::sync::Arc<std::collections::HashMap<&'static str, i64>>,
}

impl PaymentsApi {
    pub fn new(
        db: DatabaseConnection,
        refund_limits: std::collections::HashMap<&'static str, i64>,
    ) -> Self {
        Self {
            db,
            refund_limits: std::sync::Arc::new(refund_limits),
        }
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
        let limit = self
            .refund_limits
            .get(amount.currency().code())
            .copied()
            .unwrap_or(0);
        if amount.minor_units() > limit {
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
        let response = pb::RefundPaymentResponse {
            refund: Some(refund_to_proto(&refund, payment.amount.currency())),
            payment: Some(to_proto(&payment)),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        Ok(Response::new(response))
    }
}
