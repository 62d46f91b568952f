//! The gRPC face of the customer service: the only module that knows prost
//! types. Validates requests into domain values, runs them idempotently
//! against storage, and maps every error to a status.

use o2c_kit::ApiError;
use o2c_kit::fields::{self, Violations};
use o2c_kit::idempotency::{self, Begun};
use o2c_money::Currency;
use o2c_money::ids::{CreditAccountId, CustomerId};
use o2c_proto::customer::v1 as pb;
use o2c_proto::customer::v1::customer_service_server::CustomerService;
use prost::Message;
use sea_orm::DatabaseConnection;
use tonic::{Request, Response, Status};

use crate::domain::{
    self, AgencyReference, Contact, CountryCode, CreditLink, Customer, CustomerError, ExternalId,
    NewCustomer,
};
use crate::storage;

/// Serves `o2c.customer.v1.CustomerService` from its database.
#[derive(Clone)]
pub struct CustomerApi {
    db: DatabaseConnection,
    /// The configured subscribers that take `CustomerChanged`.
    subscribers: std::sync::Arc<Vec<String>>,
}

/// Services that take `CustomerChanged`.
pub const CUSTOMER_TAKERS: &[&str] = &["crm-sync"];

impl CustomerApi {
    pub fn new(db: DatabaseConnection, subscribers: Vec<String>) -> Self {
        Self {
            db,
            subscribers: std::sync::Arc::new(o2c_kit::outbox::route(&subscribers, CUSTOMER_TAKERS)),
        }
    }

    /// Records `CustomerChanged` (without contacts) in the transaction of
    /// the change.
    async fn changed(
        &self,
        conn: &impl sea_orm::ConnectionTrait,
        customer: &pb::Customer,
    ) -> Result<(), ApiError> {
        let mut customer = customer.clone();
        customer.contacts.clear();
        let event = o2c_proto::events::v1::Event {
            tenant_id: customer.tenant_id.clone(),
            aggregate_type: "customer".into(),
            aggregate_id: customer.customer_id.clone(),
            body: Some(o2c_proto::events::v1::event::Body::CustomerChanged(
                o2c_proto::events::v1::CustomerChanged {
                    customer: Some(customer),
                },
            )),
            ..Default::default()
        };
        o2c_kit::outbox::record(conn, &self.subscribers, event, chrono::Utc::now()).await
    }
}

impl From<CustomerError> for ApiError {
    fn from(error: CustomerError) -> Self {
        match error {
            CustomerError::Country => ApiError::invalid("country_code", error.to_string()),
            CustomerError::AgencyReference => {
                ApiError::invalid("agency_reference", error.to_string())
            }
            CustomerError::AlreadyLinked(_) => ApiError::FailedPrecondition(error.to_string()),
        }
    }
}

#[tonic::async_trait]
impl CustomerService for CustomerApi {
    async fn create_customer(
        &self,
        request: Request<pb::CreateCustomerRequest>,
    ) -> Result<Response<pb::CreateCustomerResponse>, Status> {
        let request = request.into_inner();
        let new = validate_create(&request)?;
        let scope = format!("{}/customer.CreateCustomer", new.tenant_id);
        let key = &request.idempotency_key;
        let bytes = request.encode_to_vec();
        let txn = match idempotency::begin(&self.db, &scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let customer = to_proto(&storage::insert(&txn, &new).await?);
        self.changed(&txn, &customer).await?;
        let response = pb::CreateCustomerResponse {
            customer: Some(customer),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        Ok(Response::new(response))
    }

    async fn get_customer(
        &self,
        request: Request<pb::GetCustomerRequest>,
    ) -> Result<Response<pb::GetCustomerResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        let tenant = violations.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let id = violations.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        violations.finish()?;
        let (Some(tenant), Some(id)) = (tenant, id) else {
            return Err(ApiError::Internal("validated fields missing".into()).into());
        };
        let customer = storage::get(&self.db, &tenant, id).await?;
        Ok(Response::new(pb::GetCustomerResponse {
            customer: Some(to_proto(&customer)),
        }))
    }

    async fn find_customer_by_external_id(
        &self,
        request: Request<pb::FindCustomerByExternalIdRequest>,
    ) -> Result<Response<pb::FindCustomerByExternalIdResponse>, Status> {
        let request = request.into_inner();
        let tenant = fields::tenant_id("tenant_id", &request.tenant_id)?;
        let external = request
            .external_id
            .as_ref()
            .ok_or_else(|| ApiError::invalid("external_id", "required"))?;
        let external = validate_external_id("external_id", external)?;
        let customer = storage::find_by_external_id(&self.db, &tenant, &external).await?;
        Ok(Response::new(pb::FindCustomerByExternalIdResponse {
            customer: Some(to_proto(&customer)),
        }))
    }

    async fn link_credit_account(
        &self,
        request: Request<pb::LinkCreditAccountRequest>,
    ) -> Result<Response<pb::LinkCreditAccountResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        let tenant = violations.check(fields::tenant_id("tenant_id", &request.tenant_id));
        let customer_id = violations.check(fields::id::<CustomerId>(
            "customer_id",
            &request.customer_id,
        ));
        let account = violations.check(fields::id::<CreditAccountId>(
            "credit_account_id",
            &request.credit_account_id,
        ));
        let agency = violations.check(fields::slug("agency", &request.agency));
        let reference = violations
            .check(AgencyReference::parse(&request.agency_reference).map_err(ApiError::from));
        violations.finish()?;
        let (Some(tenant), Some(customer_id), Some(account), Some(agency), Some(reference)) =
            (tenant, customer_id, account, agency, reference)
        else {
            return Err(ApiError::Internal("validated fields missing".into()).into());
        };
        let scope = format!("{tenant}/customer.LinkCreditAccount");
        // The stored request must not hold the reference in clear: key the
        // replay check on its fingerprint instead.
        let mut pinned = request.clone();
        pinned.agency_reference = reference.fingerprint(&tenant);
        let key = &request.idempotency_key;
        let bytes = pinned.encode_to_vec();
        let txn = match idempotency::begin(&self.db, &scope, key, &bytes).await? {
            Begun::Replay(response) => return Ok(Response::new(response)),
            Begun::Fresh(txn) => txn,
        };
        let current = storage::get(&txn, &tenant, customer_id).await?;
        domain::check_link(current.credit_link.as_ref(), account).map_err(ApiError::from)?;
        let link = CreditLink {
            credit_account_id: account,
            agency,
            reference_last4: reference.last4(),
            reference_sha256: reference.fingerprint(&tenant),
            linked_at: chrono::Utc::now(),
        };
        storage::set_credit_link(&txn, &tenant, customer_id, &link).await?;
        let customer = to_proto(&storage::get(&txn, &tenant, customer_id).await?);
        self.changed(&txn, &customer).await?;
        let response = pb::LinkCreditAccountResponse {
            customer: Some(customer),
        };
        let response = idempotency::commit(&self.db, txn, &scope, key, &bytes, response).await?;
        Ok(Response::new(response))
    }
}

fn validate_external_id(field: &str, external: &pb::ExternalId) -> Result<ExternalId, ApiError> {
    Ok(ExternalId {
        system: fields::slug(&format!("{field}.system"), &external.system)?,
        value: fields::text(&format!("{field}.value"), &external.value, 200)?,
    })
}

fn validate_create(request: &pb::CreateCustomerRequest) -> Result<NewCustomer, ApiError> {
    let mut v = Violations::default();
    let tenant = v.check(fields::tenant_id("tenant_id", &request.tenant_id));
    let key = v.check(idempotency::validate_key(&request.idempotency_key));
    let legal_name = v.check(fields::text(
        "legal_name",
        &request.legal_name,
        domain::MAX_LEGAL_NAME_LENGTH,
    ));
    let country = v.check(CountryCode::parse(&request.country_code).map_err(ApiError::from));
    let currency = v.check(if request.currency_code.is_empty() {
        Err(ApiError::invalid("currency_code", "required"))
    } else {
        Currency::from_code(&request.currency_code)
            .map_err(|e| ApiError::invalid("currency_code", e.to_string()))
    });
    if request.external_ids.len() > domain::MAX_EXTERNAL_IDS {
        v.check::<()>(Err(ApiError::invalid(
            "external_ids",
            format!("at most {}", domain::MAX_EXTERNAL_IDS),
        )));
    }
    let mut external_ids = Vec::new();
    for (index, external) in request.external_ids.iter().enumerate() {
        if let Some(e) = v.check(validate_external_id(
            &format!("external_ids[{index}]"),
            external,
        )) {
            if external_ids
                .iter()
                .any(|x: &ExternalId| x.system == e.system)
            {
                v.check::<()>(Err(ApiError::invalid(
                    format!("external_ids[{index}].system"),
                    "one id per system",
                )));
            }
            external_ids.push(e);
        }
    }
    if request.contacts.len() > domain::MAX_CONTACTS {
        v.check::<()>(Err(ApiError::invalid(
            "contacts",
            format!("at most {}", domain::MAX_CONTACTS),
        )));
    }
    let mut contacts = Vec::new();
    for (index, contact) in request.contacts.iter().enumerate() {
        let name = v.check(fields::text(
            &format!("contacts[{index}].name"),
            &contact.name,
            200,
        ));
        let email = v.check(fields::optional_text(
            &format!("contacts[{index}].email"),
            &contact.email,
            254,
        ));
        if let Some(email) = &email
            && !email.is_empty()
            && !email.contains('@')
        {
            v.check::<()>(Err(ApiError::invalid(
                format!("contacts[{index}].email"),
                "not an email address",
            )));
        }
        let phone = v.check(fields::optional_text(
            &format!("contacts[{index}].phone"),
            &contact.phone,
            40,
        ));
        if let (Some(name), Some(email), Some(phone)) = (name, email, phone) {
            contacts.push(Contact { name, email, phone });
        }
    }
    v.finish()?;
    match (tenant, key, legal_name, country, currency) {
        (Some(tenant_id), Some(()), Some(legal_name), Some(country), Some(currency)) => {
            Ok(NewCustomer {
                id: CustomerId::new(),
                tenant_id,
                legal_name,
                country,
                currency,
                external_ids,
                contacts,
            })
        }
        _ => Err(ApiError::Internal("validated fields missing".into())),
    }
}

fn to_proto(customer: &Customer) -> pb::Customer {
    pb::Customer {
        customer_id: customer.id.to_string(),
        tenant_id: customer.tenant_id.clone(),
        legal_name: customer.legal_name.clone(),
        country_code: customer.country_code.clone(),
        currency_code: customer.currency_code.clone(),
        external_ids: customer
            .external_ids
            .iter()
            .map(|e| pb::ExternalId {
                system: e.system.clone(),
                value: e.value.clone(),
            })
            .collect(),
        contacts: customer
            .contacts
            .iter()
            .map(|c| pb::Contact {
                name: c.name.clone(),
                email: c.email.clone(),
                phone: c.phone.clone(),
            })
            .collect(),
        credit_account: customer
            .credit_link
            .as_ref()
            .map(|link| pb::CreditAccountLink {
                credit_account_id: link.credit_account_id.to_string(),
                agency: link.agency.clone(),
                reference_last4: link.reference_last4.clone(),
                linked_at: link
                    .linked_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            }),
        created_at: customer
            .created_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    }
}
