//! The gRPC face of the invoicing service: the only module that knows
//! prost types.

use chrono::NaiveDate;
use o2c_kit::clock::Clock;
use o2c_kit::fields::{self, Violations};
use o2c_kit::idempotency::{self, Begun};
use o2c_kit::{ApiError, proto_money};
use o2c_money::Money;
use o2c_money::ids::{CustomerId, InvoiceId, PaymentId};
use o2c_proto::events::v1 as events_pb;
use o2c_proto::invoicing::v1 as pb;
use o2c_proto::invoicing::v1::invoicing_service_server::InvoicingService;
use o2c_proto::payments::v1 as payments_pb;
use prost::Message;
use sea_orm::{DatabaseConnection, DatabaseTransaction, TransactionTrait};
use tonic::{Request, Response, Status};

use crate::domain::{self, Due, InvoiceError, Line, PaymentTerms, Status as State};
use crate::storage::{self, Invoice, NewInvoice};

/// Longest order id and line description.
pub const MAX_ORDER_ID_LENGTH: usize = 100;
pub const MAX_DESCRIPTION_LENGTH: usize = 500;

/// Serves `o2c.invoicing.v1.InvoicingService`.
#[derive(Clone)]
pub struct InvoicingApi {
    db: DatabaseConnection,
    clock: Clock,
    /// Largest single payout of account credit per currency (minor units);
    /// currencies not listed cannot be paid out here.
    payout_limits: std::sync::Arc<o2c_kit::settings::CurrencyLimits>,
    /// The configured event subscribers (see [`INVOICE_TAKERS`]).
    subscribers: std::sync::Arc<Vec<String>>,
}

/// Services that take `InvoiceChanged`.
pub const INVOICE_TAKERS: &[&str] = &["credit", "crm-sync"];
/// Services that take `AllocationRefused`.
pub const REFUSAL_TAKERS: &[&str] = &["payments"];

impl InvoicingApi {
    pub fn new(
        db: DatabaseConnection,
        clock: Clock,
        payout_limits: o2c_kit::settings::CurrencyLimits,
        subscribers: Vec<String>,
    ) -> Self {
        Self {
            db,
            clock,
            payout_limits: std::sync::Arc::new(payout_limits),
            subscribers: std::sync::Arc::new(subscribers),
        }
    }

    /// Records `InvoiceChanged` in the transaction of the change.
    async fn changed(
        &self,
        conn: &impl sea_orm::ConnectionTrait,
        invoice: &pb::Invoice,
    ) -> Result<(), ApiError> {
        let event = events_pb::Event {
            tenant_id: invoice.tenant_id.clone(),
            aggregate_type: "invoice".into(),
            aggregate_id: invoice.invoice_id.clone(),
            body: Some(events_pb::event::Body::InvoiceChanged(
                events_pb::InvoiceChanged {
                    invoice: Some(invoice.clone()),
                },
            )),
            ..Default::default()
        };
        let to = o2c_kit::outbox::route(&self.subscribers, INVOICE_TAKERS);
        o2c_kit::outbox::record(conn, &to, event, self.now()).await
    }

    /// Applies one allocation of a payment's event: the payment's own
    /// effect, or a refusal sent back to payments.
    async fn apply_allocation(
        &self,
        txn: &DatabaseTransaction,
        tenant: &str,
        payment: &payments_pb::Payment,
        allocation: &payments_pb::Allocation,
    ) -> Result<(), ApiError> {
        let payment_id = payment.payment_id.as_str();
        // The discount window is judged on the day the money arrived, not
        // the day this event is delivered.
        let received = chrono::DateTime::parse_from_rfc3339(&payment.received_at)
            .map(|t| t.date_naive())
            .unwrap_or_else(|_| self.today());
        let parsed = fields::id::<InvoiceId>("invoice_id", &allocation.invoice_id).and_then(|id| {
            proto_money::parse_positive("amount", allocation.amount.as_ref()).map(|m| (id, m))
        });
        let refusal = match parsed {
            Ok((id, amount)) => match storage::get(txn, tenant, id).await {
                Ok(invoice) if invoice.customer_id.to_string() != payment.customer_id => {
                    format!("invoice {id} is not an invoice of the payment's customer")
                }
                Ok(_) => {
                    // A savepoint, so a refused application leaves nothing.
                    let attempt = txn.begin().await?;
                    match storage::apply_payment(&attempt, tenant, id, payment_id, amount, received)
                        .await
                    {
                        Ok((invoice, _)) => {
                            let invoice = to_proto(&invoice, self.today())?;
                            self.changed(&attempt, &invoice).await?;
                            attempt.commit().await?;
                            return Ok(());
                        }
                        // Applied already with another amount: invoicing
                        // keeps what it applied, and the payment must not
                        // get the money back as well. Loud, not blocking.
                        Err(ApiError::AlreadyExists(message)) => {
                            attempt.rollback().await?;
                            tracing::error!(payment = %payment_id, invoice = %id, %message, "allocation differs from the application on record; left as applied");
                            return Ok(());
                        }
                        Err(
                            error
                            @ (ApiError::FailedPrecondition(_) | ApiError::InvalidArgument(_)),
                        ) => {
                            attempt.rollback().await?;
                            error.to_string()
                        }
                        Err(error) => return Err(error),
                    }
                }
                Err(error @ ApiError::NotFound(_)) => error.to_string(),
                Err(error) => return Err(error),
            },
            Err(error) => error.to_string(),
        };
        tracing::warn!(payment = %payment_id, invoice = %allocation.invoice_id, %refusal, "allocation refused");
        let event = events_pb::Event {
            tenant_id: tenant.to_owned(),
            aggregate_type: "payment".into(),
            aggregate_id: payment_id.to_owned(),
            body: Some(events_pb::event::Body::AllocationRefused(
                events_pb::AllocationRefused {
                    payment_id: payment_id.to_owned(),
                    invoice_id: allocation.invoice_id.clone(),
                    amount: allocation.amount.clone(),
                    reason: refusal,
                },
            )),
            ..Default::default()
        };
        let to = o2c_kit::outbox::route(&self.subscribers, REFUSAL_TAKERS);
        o2c_kit::outbox::record(txn, &to, event, self.now()).await
    }

    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        (self.clock)()
    }

    fn today(&self) -> NaiveDate {
        self.now().date_naive()
    }
}

fn missing() -> ApiError {
    ApiError::Internal("validated fields missing".into())
}

/// Maps a domain refusal onto the request field it concerns.
fn field_error(field: &str, error: InvoiceError) -> ApiError {
    let message = error.to_string();
    match error {
        InvoiceError::Quantity
        | InvoiceError::TaxRate
        | InvoiceError::NetDays
        | InvoiceError::Discount => ApiError::invalid(field, message),
        InvoiceError::WrongState(_) => ApiError::FailedPrecondition(message),
        InvoiceError::Money(_) => ApiError::invalid(field, message),
        InvoiceError::OrderAlreadyInvoiced(_) | InvoiceError::PaymentAlreadyApplied(_) => {
            ApiError::AlreadyExists(message)
        }
        InvoiceError::PaymentExceedsOpen { .. } => ApiError::FailedPrecondition(message),
    }
}

fn terms_from_proto(terms: &pb::PaymentTerms) -> Result<PaymentTerms, ApiError> {
    let due = match pb::PaymentTermsKind::try_from(terms.kind) {
        Ok(pb::PaymentTermsKind::DueOnReceipt) => Due::OnReceipt,
        Ok(pb::PaymentTermsKind::Net) => Due::Net(
            domain::net_days(terms.net_days)
                .map_err(|e| field_error("payment_terms.net_days", e))?,
        ),
        Ok(pb::PaymentTermsKind::EndOfMonthPlus) => Due::EndOfMonthPlus(
            domain::net_days(terms.net_days)
                .map_err(|e| field_error("payment_terms.net_days", e))?,
        ),
        _ => {
            return Err(ApiError::invalid(
                "payment_terms.kind",
                "DUE_ON_RECEIPT, NET or END_OF_MONTH_PLUS",
            ));
        }
    };
    let discount = if terms.discount_percent.trim().is_empty() && terms.discount_days == 0 {
        None
    } else {
        Some(
            domain::discount(&terms.discount_percent, terms.discount_days)
                .map_err(|e| field_error("payment_terms.discount_percent", e))?,
        )
    };
    Ok(PaymentTerms { due, discount })
}

fn validate_issue(
    request: &pb::IssueInvoiceRequest,
    today: NaiveDate,
) -> Result<NewInvoice, ApiError> {
    let mut v = Violations::default();
    let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
    let customer = v.check(fields::id::<CustomerId>(
        "customer_id",
        &request.customer_id,
    ));
    let order = v.check(fields::optional_text(
        "order_id",
        &request.order_id,
        MAX_ORDER_ID_LENGTH,
    ));
    let currency = v.check(proto_money::parse_currency(
        "currency_code",
        &request.currency_code,
    ));
    v.check(idempotency::validate_key(&request.idempotency_key));
    if request.lines.is_empty() || request.lines.len() > domain::MAX_LINES {
        v.check::<()>(Err(ApiError::invalid(
            "lines",
            format!("1 to {} lines", domain::MAX_LINES),
        )));
    }
    let mut lines = Vec::new();
    for (index, line) in request.lines.iter().enumerate() {
        let at = |name: &str| format!("lines[{index}].{name}");
        let description = v.check(fields::text(
            &at("description"),
            &line.description,
            MAX_DESCRIPTION_LENGTH,
        ));
        let quantity = v.check(
            domain::parse_quantity(&line.quantity).map_err(|e| field_error(&at("quantity"), e)),
        );
        let price = v.check(proto_money::parse(
            &at("unit_price"),
            line.unit_price.as_ref(),
        ));
        if let Some(price) = &price {
            if price.is_negative() {
                v.check::<()>(Err(ApiError::invalid(
                    at("unit_price.amount"),
                    "must not be negative",
                )));
            }
            if let Some(currency) = currency
                && price.currency() != currency
            {
                v.check::<()>(Err(ApiError::invalid(
                    at("unit_price.currency_code"),
                    "must be the invoice currency",
                )));
            }
        }
        let rate = v.check(
            domain::parse_tax_rate(&line.tax_rate_percent)
                .map_err(|e| field_error(&at("tax_rate_percent"), e)),
        );
        if let (Some(description), Some(quantity), Some(price), Some(rate)) =
            (description, quantity, price, rate)
            && let Some(priced) = v.check(
                Line::price(description, quantity, price, rate)
                    .map_err(|e| field_error(&at("unit_price"), e)),
            )
        {
            lines.push(priced);
        }
    }
    let terms = match &request.payment_terms {
        None => v.check::<PaymentTerms>(Err(ApiError::invalid("payment_terms", "required"))),
        Some(terms) => v.check(terms_from_proto(terms)),
    };
    let issue_date = if request.issue_date.is_empty() {
        Some(today)
    } else {
        v.check(
            NaiveDate::parse_from_str(&request.issue_date, "%Y-%m-%d").map_err(|_| {
                ApiError::invalid("issue_date", "an ISO 8601 date such as 2026-12-04")
            }),
        )
    };
    v.finish()?;
    let (
        Some(tenant_id),
        Some(customer_id),
        Some(order),
        Some(currency),
        Some(terms),
        Some(issue_date),
    ) = (tenant, customer, order, currency, terms, issue_date)
    else {
        return Err(missing());
    };
    let total = domain::total(currency, &lines).map_err(|e| field_error("lines", e))?;
    if !total.is_positive() {
        return Err(ApiError::invalid(
            "lines",
            "the invoice total must be greater than zero",
        ));
    }
    Ok(NewInvoice {
        id: InvoiceId::new(),
        tenant_id,
        customer_id,
        order_id: (!order.is_empty()).then_some(order),
        currency,
        lines,
        total,
        issue_date,
        terms,
        draft: request.draft,
    })
}

fn status_to_proto(status: State) -> pb::InvoiceStatus {
    match status {
        State::Draft => pb::InvoiceStatus::Draft,
        State::Open => pb::InvoiceStatus::Open,
        State::PartiallyPaid => pb::InvoiceStatus::PartiallyPaid,
        State::Paid => pb::InvoiceStatus::Paid,
        State::Cancelled => pb::InvoiceStatus::Cancelled,
        State::WrittenOff => pb::InvoiceStatus::WrittenOff,
    }
}

fn status_from_proto(status: i32) -> Result<Option<State>, ApiError> {
    Ok(match pb::InvoiceStatus::try_from(status) {
        Ok(pb::InvoiceStatus::Unspecified) => None,
        Ok(pb::InvoiceStatus::Draft) => Some(State::Draft),
        Ok(pb::InvoiceStatus::Open) => Some(State::Open),
        Ok(pb::InvoiceStatus::PartiallyPaid) => Some(State::PartiallyPaid),
        Ok(pb::InvoiceStatus::Paid) => Some(State::Paid),
        Ok(pb::InvoiceStatus::Cancelled) => Some(State::Cancelled),
        Ok(pb::InvoiceStatus::WrittenOff) => Some(State::WrittenOff),
        Err(_) => return Err(ApiError::invalid("status", "unknown invoice status")),
    })
}

fn date(d: NaiveDate) -> String {
    d.format("%Y-%m-%d").to_string()
}

pub(crate) fn to_proto(invoice: &Invoice, today: NaiveDate) -> Result<pb::Invoice, ApiError> {
    let (kind, net_days) = match invoice.terms.due {
        Due::OnReceipt => (pb::PaymentTermsKind::DueOnReceipt, 0),
        Due::Net(days) => (pb::PaymentTermsKind::Net, days),
        Due::EndOfMonthPlus(days) => (pb::PaymentTermsKind::EndOfMonthPlus, days),
    };
    let terms = pb::PaymentTerms {
        kind: kind as i32,
        net_days: i32::try_from(net_days).unwrap_or(i32::MAX),
        discount_percent: invoice
            .terms
            .discount
            .map(|d| d.percent.to_string())
            .unwrap_or_default(),
        discount_days: invoice
            .terms
            .discount
            .map(|d| i32::try_from(d.days).unwrap_or(i32::MAX))
            .unwrap_or_default(),
    };
    let open = invoice.open()?;
    let past_due = domain::days_past_due(invoice.due_date, today);
    let overdue = invoice.status.is_open() && past_due > 0;
    let discount_amount = invoice
        .discount_available(today)?
        .unwrap_or(Money::zero(invoice.currency));
    Ok(pb::Invoice {
        invoice_id: invoice.id.to_string(),
        tenant_id: invoice.tenant_id.clone(),
        customer_id: invoice.customer_id.to_string(),
        order_id: invoice.order_id.clone().unwrap_or_default(),
        currency_code: invoice.currency.code().to_owned(),
        lines: invoice
            .lines
            .iter()
            .map(|l| pb::InvoiceLine {
                description: l.description.clone(),
                quantity: l.quantity.to_string(),
                unit_price: Some(proto_money::to_proto(&l.unit_price)),
                tax_rate_percent: l.tax_rate_percent.to_string(),
                line_total: Some(proto_money::to_proto(&l.total)),
            })
            .collect(),
        total: Some(proto_money::to_proto(&invoice.total)),
        amount_paid: Some(proto_money::to_proto(&invoice.paid)),
        amount_open: Some(proto_money::to_proto(&open)),
        status: status_to_proto(invoice.status) as i32,
        issue_date: date(invoice.issue_date),
        due_date: date(invoice.due_date),
        payment_terms: Some(terms),
        discount_date: invoice
            .terms
            .discount_date(invoice.issue_date)
            .map(date)
            .unwrap_or_default(),
        discount_amount: Some(proto_money::to_proto(&discount_amount)),
        amount_credited: Some(proto_money::to_proto(&invoice.credited)),
        amount_written_off: Some(proto_money::to_proto(&invoice.written_off)),
        discount_taken: Some(proto_money::to_proto(&invoice.discount_taken)),
        overdue,
        days_past_due: if overdue {
            i32::try_from(past_due).unwrap_or(i32::MAX)
        } else {
            0
        },
    })
}

#[tonic::async_trait]
impl InvoicingService for InvoicingApi {
    async fn issue_invoice(
        &self,
        request: Request<pb::IssueInvoiceRequest>,
    ) -> Result<Response<pb::IssueInvoiceResponse>, Status> {
        let request = request.into_inner();
        let new = validate_issue(&request, self.today())?;
        let scope = format!("{}/invoicing.IssueInvoice", new.tenant_id);
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match idempotency::begin(&self.db, &scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let invoice = to_proto(&storage::insert(&txn, &new).await?, self.today())?;
        self.changed(&txn, &invoice).await?;
        let response = pb::IssueInvoiceResponse {
            invoice: Some(invoice),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        Ok(Response::new(response))
    }

    async fn get_invoice(
        &self,
        request: Request<pb::GetInvoiceRequest>,
    ) -> Result<Response<pb::GetInvoiceResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let id = v.check(fields::id::<InvoiceId>("invoice_id", &request.invoice_id));
        v.finish()?;
        let (Some(tenant), Some(id)) = (tenant, id) else {
            return Err(missing().into());
        };
        let invoice = storage::get(&self.db, &tenant, id).await?;
        Ok(Response::new(pb::GetInvoiceResponse {
            invoice: Some(to_proto(&invoice, self.today())?),
        }))
    }

    async fn apply_payment(
        &self,
        request: Request<pb::ApplyPaymentRequest>,
    ) -> Result<Response<pb::ApplyPaymentResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let id = v.check(fields::id::<InvoiceId>("invoice_id", &request.invoice_id));
        let payment = v.check(fields::id::<PaymentId>("payment_id", &request.payment_id));
        let amount = v.check(proto_money::parse_positive(
            "amount",
            request.amount.as_ref(),
        ));
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(id), Some(payment), Some(amount)) = (tenant, id, payment, amount)
        else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/invoicing.ApplyPayment");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let today = self.today();
        let mut tries = 0;
        let (txn, (invoice, discount)) = loop {
            let txn = match idempotency::begin(&self.db, &scope, key, &bytes).await? {
                Begun::Replay(response) => return Ok(Response::new(response)),
                Begun::Fresh(txn) => txn,
            };
            match storage::apply_payment(&txn, &tenant, id, &payment.to_string(), amount, today)
                .await
            {
                Ok(applied) => break (txn, applied),
                // The payment's event applied it at the same moment. Its
                // transaction has committed by the time ours is refused,
                // so trying again finds that application and answers it.
                Err(ApiError::Aborted(_)) if tries < 2 => {
                    tries += 1;
                    txn.rollback().await.map_err(ApiError::from)?;
                }
                Err(error) => return Err(error.into()),
            }
        };
        let invoice = to_proto(&invoice, today)?;
        self.changed(&txn, &invoice).await?;
        let response = pb::ApplyPaymentResponse {
            invoice: Some(invoice),
            discount_taken: Some(proto_money::to_proto(&discount)),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        Ok(Response::new(response))
    }

    async fn finalize_invoice(
        &self,
        request: Request<pb::FinalizeInvoiceRequest>,
    ) -> Result<Response<pb::FinalizeInvoiceResponse>, Status> {
        let request = request.into_inner();
        let (tenant, id) = tenant_and_invoice(
            &request.tenant_id,
            &request.invoice_id,
            &request.idempotency_key,
        )?;
        let scope = format!("{tenant}/invoicing.FinalizeInvoice");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match idempotency::begin(&self.db, &scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let today = self.today();
        let invoice = to_proto(&storage::finalize(&txn, &tenant, id, today).await?, today)?;
        self.changed(&txn, &invoice).await?;
        let response = pb::FinalizeInvoiceResponse {
            invoice: Some(invoice),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        Ok(Response::new(response))
    }

    async fn cancel_invoice(
        &self,
        request: Request<pb::CancelInvoiceRequest>,
    ) -> Result<Response<pb::CancelInvoiceResponse>, Status> {
        let request = request.into_inner();
        let (tenant, id) = tenant_and_invoice(
            &request.tenant_id,
            &request.invoice_id,
            &request.idempotency_key,
        )?;
        fields::text("reason", &request.reason, MAX_DESCRIPTION_LENGTH)?;
        let scope = format!("{tenant}/invoicing.CancelInvoice");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match idempotency::begin(&self.db, &scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let (invoice, released) = storage::cancel(&txn, &tenant, id).await?;
        tracing::info!(invoice = %id, reason = %request.reason, "invoice cancelled");
        let invoice = to_proto(&invoice, self.today())?;
        self.changed(&txn, &invoice).await?;
        let response = pb::CancelInvoiceResponse {
            invoice: Some(invoice),
            released: Some(proto_money::to_proto(&released)),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        Ok(Response::new(response))
    }

    async fn write_off_invoice(
        &self,
        request: Request<pb::WriteOffInvoiceRequest>,
    ) -> Result<Response<pb::WriteOffInvoiceResponse>, Status> {
        let request = request.into_inner();
        let (tenant, id) = tenant_and_invoice(
            &request.tenant_id,
            &request.invoice_id,
            &request.idempotency_key,
        )?;
        fields::text("reason", &request.reason, MAX_DESCRIPTION_LENGTH)?;
        let scope = format!("{tenant}/invoicing.WriteOffInvoice");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match idempotency::begin(&self.db, &scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let (invoice, written_off) = storage::write_off(&txn, &tenant, id).await?;
        tracing::info!(invoice = %id, reason = %request.reason, "invoice written off");
        let invoice = to_proto(&invoice, self.today())?;
        self.changed(&txn, &invoice).await?;
        let response = pb::WriteOffInvoiceResponse {
            invoice: Some(invoice),
            written_off: Some(proto_money::to_proto(&written_off)),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        Ok(Response::new(response))
    }

    async fn issue_credit_note(
        &self,
        request: Request<pb::IssueCreditNoteRequest>,
    ) -> Result<Response<pb::IssueCreditNoteResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        let invoice = if request.invoice_id.is_empty() {
            Some(None)
        } else {
            v.check(fields::id::<InvoiceId>("invoice_id", &request.invoice_id).map(Some))
        };
        let amount = v.check(proto_money::parse_positive(
            "amount",
            request.amount.as_ref(),
        ));
        let reason = v.check(fields::text(
            "reason",
            &request.reason,
            MAX_DESCRIPTION_LENGTH,
        ));
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(customer), Some(invoice), Some(amount), Some(reason)) =
            (tenant, customer, invoice, amount, reason)
        else {
            return Err(missing().into());
        };
        let scope = format!("{tenant}/invoicing.IssueCreditNote");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match idempotency::begin(&self.db, &scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let now = self.now();
        let (note, invoice) =
            storage::issue_credit_note(&txn, &tenant, customer, invoice, amount, &reason, now)
                .await?;
        let money = |minor: i64| {
            Money::from_minor_units(minor, amount.currency())
                .map(|m| proto_money::to_proto(&m))
                .map_err(|e| ApiError::Internal(e.to_string()))
        };
        let response = pb::IssueCreditNoteResponse {
            credit_note: Some(pb::CreditNote {
                credit_note_id: note.id.clone(),
                customer_id: note.customer_id.clone(),
                invoice_id: note.invoice_id.clone().unwrap_or_default(),
                amount: Some(money(note.amount_minor)?),
                applied_to_invoice: Some(money(note.applied_minor)?),
                account_credit: Some(money(note.account_credit_minor)?),
                reason: note.reason.clone(),
                issued_at: note
                    .issued_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            }),
            invoice: invoice
                .as_ref()
                .map(|i| to_proto(i, now.date_naive()))
                .transpose()?,
        };
        if let Some(invoice) = &response.invoice {
            self.changed(&txn, invoice).await?;
        }
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        Ok(Response::new(response))
    }

    async fn list_invoices(
        &self,
        request: Request<pb::ListInvoicesRequest>,
    ) -> Result<Response<pb::ListInvoicesResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = if request.customer_id.is_empty() {
            Some(None)
        } else {
            v.check(fields::id::<CustomerId>("customer_id", &request.customer_id).map(Some))
        };
        let status = v.check(status_from_proto(request.status));
        let size = v.check(fields::page_size("page_size", request.page_size));
        let offset = if request.page_token.is_empty() {
            Some(0)
        } else {
            v.check(
                request
                    .page_token
                    .parse::<u64>()
                    .map_err(|_| ApiError::invalid("page_token", "not a token from this list")),
            )
        };
        v.finish()?;
        let (Some(tenant), Some(customer_id), Some(status), Some(size), Some(offset)) =
            (tenant, customer, status, size, offset)
        else {
            return Err(missing().into());
        };
        let today = self.today();
        let filter = storage::InvoiceFilter {
            customer_id,
            status,
            open_only: request.open_only,
            due_before: request.overdue_only.then_some(today),
        };
        let page = storage::list(&self.db, &tenant, &filter, offset, size).await?;
        let next_page_token = if page.len() as u64 == size {
            (offset + size).to_string()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListInvoicesResponse {
            invoices: page
                .iter()
                .map(|i| to_proto(i, today))
                .collect::<Result<_, _>>()?,
            next_page_token,
        }))
    }

    async fn get_aging(
        &self,
        request: Request<pb::GetAgingRequest>,
    ) -> Result<Response<pb::GetAgingResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = if request.customer_id.is_empty() {
            Some(None)
        } else {
            v.check(fields::id::<CustomerId>("customer_id", &request.customer_id).map(Some))
        };
        v.finish()?;
        let (Some(tenant), Some(customer)) = (tenant, customer) else {
            return Err(missing().into());
        };
        let today = self.today();
        let rows = storage::open_invoices(&self.db, &tenant, customer).await?;
        // Per currency: five buckets of (minor units, count).
        let mut by_currency: std::collections::BTreeMap<String, [(i64, i32); 5]> =
            std::collections::BTreeMap::new();
        for row in &rows {
            let bucket = domain::Bucket::of(domain::days_past_due(row.due_date, today));
            let index = domain::Bucket::ALL
                .iter()
                .position(|b| *b == bucket)
                .unwrap_or(0);
            let entry = by_currency.entry(row.currency_code.clone()).or_default();
            entry[index].0 += storage::open_minor(row);
            entry[index].1 += 1;
        }
        let names = ["current", "1-30", "31-60", "61-90", "90+"];
        let mut currencies = Vec::new();
        for (code, buckets) in by_currency {
            let currency = o2c_money::Currency::from_code(&code)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            let money = |minor: i64| {
                Money::from_minor_units(minor, currency)
                    .map(|m| proto_money::to_proto(&m))
                    .map_err(|e| ApiError::Internal(e.to_string()))
            };
            currencies.push(pb::CurrencyAging {
                currency_code: code.clone(),
                buckets: buckets
                    .iter()
                    .zip(names)
                    .map(|((minor, count), name)| {
                        Ok(pb::AgingBucket {
                            bucket: name.to_owned(),
                            amount: Some(money(*minor)?),
                            invoices: *count,
                        })
                    })
                    .collect::<Result<_, ApiError>>()?,
                total: Some(money(buckets.iter().map(|b| b.0).sum())?),
            });
        }
        Ok(Response::new(pb::GetAgingResponse {
            currencies,
            as_of: date(today),
        }))
    }

    async fn get_account_credit(
        &self,
        request: Request<pb::GetAccountCreditRequest>,
    ) -> Result<Response<pb::GetAccountCreditResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer = v.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        v.finish()?;
        let (Some(tenant), Some(customer)) = (tenant, customer) else {
            return Err(missing().into());
        };
        let mut balances = Vec::new();
        for (code, minor) in storage::account_credit(&self.db, &tenant, customer).await? {
            let currency = o2c_money::Currency::from_code(&code)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            let money = Money::from_minor_units(minor, currency)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            balances.push(proto_money::to_proto(&money));
        }
        Ok(Response::new(pb::GetAccountCreditResponse { balances }))
    }

    async fn pay_out_account_credit(
        &self,
        request: Request<pb::PayOutAccountCreditRequest>,
    ) -> Result<Response<pb::PayOutAccountCreditResponse>, Status> {
        let request = request.into_inner();
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
        let reason = v.check(fields::text(
            "reason",
            &request.reason,
            MAX_DESCRIPTION_LENGTH,
        ));
        let actor = v.check(fields::text("actor", &request.actor, 100));
        v.check(idempotency::validate_key(&request.idempotency_key));
        v.finish()?;
        let (Some(tenant), Some(customer), Some(amount), Some(reason), Some(actor)) =
            (tenant, customer, amount, reason, actor)
        else {
            return Err(missing().into());
        };
        if !self.payout_limits.allows(&amount) {
            return Err(ApiError::FailedPrecondition(format!(
                "payouts of {amount} are above the configured limit for {}",
                amount.currency()
            ))
            .into());
        }
        let scope = format!("{tenant}/invoicing.PayOutAccountCredit");
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match idempotency::begin(&self.db, &scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let (payout_id, left) =
            storage::pay_out(&txn, &tenant, customer, amount, &reason, &actor, self.now()).await?;
        tracing::info!(customer = %customer, payout = %payout_id, actor = %actor, "account credit paid out");
        let response = pb::PayOutAccountCreditResponse {
            payout_id,
            balance: Some(proto_money::to_proto(&left)),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        Ok(Response::new(response))
    }
}

fn tenant_and_invoice(
    tenant: &str,
    invoice: &str,
    key: &str,
) -> Result<(String, InvoiceId), ApiError> {
    let mut v = Violations::default();
    let tenant = v.check(fields::tenant_id("tenant_id", tenant));
    let id = v.check(fields::id::<InvoiceId>("invoice_id", invoice));
    v.check(idempotency::validate_key(key));
    v.finish()?;
    match (tenant, id) {
        (Some(tenant), Some(id)) => Ok((tenant, id)),
        _ => Err(missing()),
    }
}

/// Invoicing's consumer of payments' events: each allocation of a payment
/// is applied to its invoice exactly once (the gateway may have applied it
/// already, which the application finds); one that cannot be applied goes
/// back to payments as `AllocationRefused`.
#[tonic::async_trait]
impl o2c_kit::outbox::Consumer for InvoicingApi {
    const NAME: &'static str = "invoicing";

    type Applied = ();

    async fn apply(
        &self,
        txn: &DatabaseTransaction,
        event: &events_pb::Event,
    ) -> Result<(), ApiError> {
        let Some(events_pb::event::Body::PaymentChanged(changed)) = &event.body else {
            return Ok(());
        };
        let Some(payment) = &changed.payment else {
            return Err(ApiError::Internal(format!(
                "payments event {} has no payment",
                event.event_id
            )));
        };
        for allocation in &payment.allocations {
            self.apply_allocation(txn, &event.tenant_id, payment, allocation)
                .await?;
        }
        Ok(())
    }
}
