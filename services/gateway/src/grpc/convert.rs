//! Conversions from the internal services' messages to the public API.

use o2c_kit::ApiError;
use o2c_proto::credit::v1 as credit_pb;
use o2c_proto::customer::v1 as customer_pb;
use o2c_proto::gateway::v1 as pb;
use o2c_proto::invoicing::v1 as invoicing_pb;

use crate::domain::OrderStatus;
use crate::storage::Order;

pub fn customer(c: customer_pb::Customer) -> pb::Customer {
    let (credit_account_id, last4) = c
        .credit_account
        .map(|link| (link.credit_account_id, link.reference_last4))
        .unwrap_or_default();
    pb::Customer {
        customer_id: c.customer_id,
        legal_name: c.legal_name,
        country_code: c.country_code,
        currency_code: c.currency_code,
        credit_account_id,
        agency_reference_last4: last4,
        created_at: c.created_at,
    }
}

pub fn exposure(e: credit_pb::Exposure) -> pb::Exposure {
    pb::Exposure {
        customer_id: e.customer_id,
        credit_limit: e.credit_limit,
        reserved: e.reserved,
        receivables: e.receivables,
        total: e.total,
        available: e.available,
    }
}

pub fn invoice(i: invoicing_pb::Invoice) -> pb::Invoice {
    let status = match invoicing_pb::InvoiceStatus::try_from(i.status) {
        Ok(invoicing_pb::InvoiceStatus::Open) => pb::InvoiceStatus::Open,
        Ok(invoicing_pb::InvoiceStatus::PartiallyPaid) => pb::InvoiceStatus::PartiallyPaid,
        Ok(invoicing_pb::InvoiceStatus::Paid) => pb::InvoiceStatus::Paid,
        Ok(invoicing_pb::InvoiceStatus::Draft) => pb::InvoiceStatus::Draft,
        Ok(invoicing_pb::InvoiceStatus::Cancelled) => pb::InvoiceStatus::Cancelled,
        Ok(invoicing_pb::InvoiceStatus::WrittenOff) => pb::InvoiceStatus::WrittenOff,
        _ => pb::InvoiceStatus::Unspecified,
    };
    pb::Invoice {
        invoice_id: i.invoice_id,
        customer_id: i.customer_id,
        order_id: i.order_id,
        total: i.total,
        amount_paid: i.amount_paid,
        amount_open: i.amount_open,
        status: status as i32,
        issue_date: i.issue_date,
        due_date: i.due_date,
        overdue: i.overdue,
        days_past_due: i.days_past_due,
        discount_date: i.discount_date,
        discount_amount: i.discount_amount,
        amount_credited: i.amount_credited,
        amount_written_off: i.amount_written_off,
    }
}

pub fn order(o: &Order) -> pb::Order {
    let status = match o.status {
        OrderStatus::Pending => pb::OrderStatus::Unspecified,
        OrderStatus::Approved => pb::OrderStatus::Approved,
        OrderStatus::Held => pb::OrderStatus::Held,
        OrderStatus::Blocked => pb::OrderStatus::Blocked,
        OrderStatus::Invoiced => pb::OrderStatus::Invoiced,
        OrderStatus::Cancelled => pb::OrderStatus::Cancelled,
        OrderStatus::Rejected => pb::OrderStatus::Rejected,
    };
    pb::Order {
        order_id: o.id.to_string(),
        customer_id: o.customer_id.to_string(),
        client_reference: o.client_reference.clone(),
        amount: Some(o2c_kit::proto_money::to_proto(&o.amount)),
        status: status as i32,
        reasons: o.reasons.clone(),
        invoice_id: o.invoice_id.clone().unwrap_or_default(),
        created_at: o
            .created_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    }
}

/// The order status and reason names a credit decision leads to.
pub fn decision(d: &credit_pb::CreditDecision) -> Result<(OrderStatus, Vec<String>), ApiError> {
    let status = match credit_pb::Decision::try_from(d.decision) {
        Ok(credit_pb::Decision::Approve) => OrderStatus::Approved,
        Ok(credit_pb::Decision::Hold) => OrderStatus::Held,
        Ok(credit_pb::Decision::Block) => OrderStatus::Blocked,
        _ => {
            return Err(ApiError::Internal(format!(
                "credit service sent decision {}",
                d.decision
            )));
        }
    };
    let reasons = d
        .reasons
        .iter()
        .map(|r| match credit_pb::ReasonCode::try_from(*r) {
            Ok(code) => code
                .as_str_name()
                .trim_start_matches("REASON_CODE_")
                .to_owned(),
            Err(_) => format!("UNKNOWN_{r}"),
        })
        .collect();
    Ok((status, reasons))
}
