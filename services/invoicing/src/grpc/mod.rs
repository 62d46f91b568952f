//! The gRPC face of the invoicing service: the only module that knows
//! prost types.

use chrono::NaiveDate;
use o2c_kit::fields::{self, Violations};
use o2c_kit::idempotency::{self, Begun};
use o2c_kit::{ApiError, proto_money};
use o2c_money::ids::{CustomerId, InvoiceId, PaymentId};
use o2c_proto::invoicing::v1 as pb;
use o2c_proto::invoicing::v1::invoicing_service_server::InvoicingService;
use prost::Message;
use sea_orm::DatabaseConnection;
use tonic::{Request, Response, Status};

use crate::domain::{self, InvoiceError, Line, PaymentTerms};
use crate::storage::{self, Invoice, NewInvoice};

/// Longest order id and line description.
pub const MAX_ORDER_ID_LENGTH: usize = 100;
pub const MAX_DESCRIPTION_LENGTH: usize = 500;

/// Serves `o2c.invoicing.v1.InvoicingService`.
#[derive(Clone)]
pub struct InvoicingApi {
    db: DatabaseConnection,
}

impl InvoicingApi {
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

fn missing() -> ApiError {
    ApiError::Internal("validated fields missing".into())
}

/// Maps a domain refusal onto the request field it concerns.
fn field_error(field: &str, error: InvoiceError) -> ApiError {
    let message = error.to_string();
    match error {
        InvoiceError::Quantity | InvoiceError::TaxRate | InvoiceError::NetDays => {
            ApiError::invalid(field, message)
        }
        InvoiceError::Money(_) => ApiError::invalid(field, message),
        InvoiceError::OrderAlreadyInvoiced(_) | InvoiceError::PaymentAlreadyApplied(_) => {
            ApiError::AlreadyExists(message)
        }
        InvoiceError::PaymentExceedsOpen { .. } => ApiError::FailedPrecondition(message),
    }
}

fn validate_issue(request: &pb::IssueInvoiceRequest) -> Result<NewInvoice, ApiError> {
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
        Some(terms) => match pb::PaymentTermsKind::try_from(terms.kind) {
            Ok(pb::PaymentTermsKind::DueOnReceipt) => Some(PaymentTerms::DueOnReceipt),
            Ok(pb::PaymentTermsKind::Net) => v.check(
                PaymentTerms::net(terms.net_days)
                    .map_err(|e| field_error("payment_terms.net_days", e)),
            ),
            _ => v.check(Err(ApiError::invalid(
                "payment_terms.kind",
                "DUE_ON_RECEIPT or NET",
            ))),
        },
    };
    let issue_date = if request.issue_date.is_empty() {
        Some(chrono::Utc::now().date_naive())
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
    })
}

fn to_proto(invoice: &Invoice) -> Result<pb::Invoice, ApiError> {
    let status = match invoice.status {
        domain::Status::Open => pb::InvoiceStatus::Open,
        domain::Status::PartiallyPaid => pb::InvoiceStatus::PartiallyPaid,
        domain::Status::Paid => pb::InvoiceStatus::Paid,
    };
    let terms = match invoice.terms {
        PaymentTerms::DueOnReceipt => pb::PaymentTerms {
            kind: pb::PaymentTermsKind::DueOnReceipt as i32,
            net_days: 0,
        },
        PaymentTerms::Net(days) => pb::PaymentTerms {
            kind: pb::PaymentTermsKind::Net as i32,
            net_days: i32::try_from(days).unwrap_or(i32::MAX),
        },
    };
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
        amount_open: Some(proto_money::to_proto(&invoice.open()?)),
        status: status as i32,
        issue_date: invoice.issue_date.format("%Y-%m-%d").to_string(),
        due_date: invoice.due_date.format("%Y-%m-%d").to_string(),
        payment_terms: Some(terms),
    })
}

#[tonic::async_trait]
impl InvoicingService for InvoicingApi {
    async fn issue_invoice(
        &self,
        request: Request<pb::IssueInvoiceRequest>,
    ) -> Result<Response<pb::IssueInvoiceResponse>, Status> {
        let request = request.into_inner();
        let new = validate_issue(&request)?;
        let scope = format!("{}/invoicing.IssueInvoice", new.tenant_id);
        let (key, bytes) = (&request.idempotency_key, request.encode_to_vec());
        let txn = match idempotency::begin(&self.db, &scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let invoice = storage::insert(&txn, &new).await?;
        let response = pb::IssueInvoiceResponse {
            invoice: Some(to_proto(&invoice)?),
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
            invoice: Some(to_proto(&invoice)?),
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
        let txn = match idempotency::begin(&self.db, &scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let invoice =
            storage::apply_payment(&txn, &tenant, id, &payment.to_string(), amount).await?;
        let response = pb::ApplyPaymentResponse {
            invoice: Some(to_proto(&invoice)?),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        Ok(Response::new(response))
    }
}
