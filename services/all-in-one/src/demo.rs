//! Demo data, seeded through the gateway like any client would: one
//! customer with a linked credit account and a limit, an approved order
//! that is invoiced and partly paid, and an order held for being over the
//! limit. Idempotency keys make re-seeding on every start a no-op.

use std::net::SocketAddr;

use anyhow::Context;
use o2c_proto::common::v1::Money;
use o2c_proto::gateway::v1 as pb;
use o2c_proto::gateway::v1::admin_service_client::AdminServiceClient;
use o2c_proto::gateway::v1::gateway_service_client::GatewayServiceClient;
use tonic::Request;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

/// The tenant the demo data belongs to.
pub const DEMO_TENANT: &str = "demo";

/// What was seeded, for the start-up banner.
#[derive(Debug, Clone)]
pub struct Seeded {
    pub customer_id: String,
    pub held_order_id: String,
    pub invoice_id: String,
    /// An API key of the demo tenant (platform client and credit analyst).
    pub api_key: String,
}

fn eur(amount: &str) -> Option<Money> {
    Some(Money {
        amount: amount.into(),
        currency_code: "EUR".into(),
    })
}

fn authorized<T>(credential: &MetadataValue<Ascii>, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", credential.clone());
    request
}

/// Seeds the demo tenant through the gateway at `gateway`, with a key of
/// its own made with the admin key `admin_key`, which is revoked afterwards
/// when `revoke_admin` (a key made for this run only).
pub async fn seed(
    gateway: SocketAddr,
    admin_key: &str,
    revoke_admin: bool,
) -> anyhow::Result<Seeded> {
    let channel = Channel::from_shared(format!("http://{gateway}"))?
        .connect()
        .await
        .context("connecting to the gateway")?;
    let created = AdminServiceClient::new(channel.clone())
        .create_api_key(authorized(
            &format!("ApiKey {admin_key}").parse()?,
            pb::CreateApiKeyRequest {
                tenant_id: DEMO_TENANT.into(),
                roles: vec![
                    pb::Role::PlatformClient as i32,
                    pb::Role::CreditAnalyst as i32,
                ],
                label: "demo".into(),
            },
        ))
        .await?
        .into_inner();
    let key = created.secret;
    if revoke_admin {
        let (admin_id, _) =
            o2c_gateway::auth::keys::parse(admin_key).context("malformed admin key")?;
        AdminServiceClient::new(channel.clone())
            .revoke_api_key(authorized(
                &format!("ApiKey {admin_key}").parse()?,
                pb::RevokeApiKeyRequest {
                    key_id: admin_id.to_owned(),
                    reason: "made for one demo run".into(),
                },
            ))
            .await?;
    }
    let credential: MetadataValue<Ascii> = format!("ApiKey {key}").parse()?;
    let mut client = GatewayServiceClient::new(channel);
    let customer = client
        .create_customer(authorized(
            &credential,
            pb::CreateCustomerRequest {
                idempotency_key: "demo-customer-acme".into(),
                legal_name: "Acme Industrial GmbH".into(),
                country_code: "DE".into(),
                currency_code: "EUR".into(),
            },
        ))
        .await?
        .into_inner()
        .customer
        .context("no customer")?;
    let customer_id = customer.customer_id;
    client
        .link_credit_account(authorized(
            &credential,
            pb::LinkCreditAccountRequest {
                idempotency_key: "demo-link-acme".into(),
                customer_id: customer_id.clone(),
                agency: "dnb".into(),
                agency_reference: "DE31554017".into(),
                parent_customer_id: String::new(),
            },
        ))
        .await?;
    client
        .set_credit_limit(authorized(
            &credential,
            pb::SetCreditLimitRequest {
                idempotency_key: "demo-limit-acme".into(),
                customer_id: customer_id.clone(),
                credit_limit: eur("50000.00"),
                reason: "demo: initial limit".into(),
                valid_until: String::new(),
                next_review_date: String::new(),
            },
        ))
        .await?;
    let order = client
        .place_order(authorized(
            &credential,
            pb::PlaceOrderRequest {
                idempotency_key: "demo-order-1".into(),
                customer_id: customer_id.clone(),
                client_reference: "PO-1001".into(),
                amount: eur("12000.00"),
            },
        ))
        .await?
        .into_inner()
        .order
        .context("no order")?;
    let invoiced = client
        .invoice_order(authorized(
            &credential,
            pb::InvoiceOrderRequest {
                idempotency_key: "demo-invoice-1".into(),
                order_id: order.order_id,
                net_days: 30,
                // 2/10 net 30.
                payment_terms: Some(o2c_proto::invoicing::v1::PaymentTerms {
                    kind: o2c_proto::invoicing::v1::PaymentTermsKind::Net as i32,
                    net_days: 30,
                    discount_percent: "2".into(),
                    discount_days: 10,
                }),
            },
        ))
        .await?
        .into_inner();
    let invoice_id = invoiced.invoice.context("no invoice")?.invoice_id;
    client
        .record_payment(authorized(
            &credential,
            pb::RecordPaymentRequest {
                idempotency_key: "demo-payment-1".into(),
                customer_id: customer_id.clone(),
                amount: eur("5000.00"),
                method: pb::PaymentMethod::BankTransfer as i32,
                reference: "ACME REMITTANCE 1001".into(),
                allocations: vec![pb::PaymentAllocation {
                    invoice_id: invoice_id.clone(),
                    amount: eur("5000.00"),
                }],
            },
        ))
        .await?;
    let held = client
        .place_order(authorized(
            &credential,
            pb::PlaceOrderRequest {
                idempotency_key: "demo-order-2".into(),
                customer_id: customer_id.clone(),
                client_reference: "PO-1002".into(),
                amount: eur("60000.00"),
            },
        ))
        .await?
        .into_inner()
        .order
        .context("no order")?;
    Ok(Seeded {
        customer_id,
        held_order_id: held.order_id,
        invoice_id,
        api_key: key,
    })
}
