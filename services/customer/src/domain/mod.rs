//! Customer rules: what a valid customer and a valid agency reference are.
//! No I/O here.

use o2c_money::Currency;
use o2c_money::ids::{CreditAccountId, CustomerId};
use sha2::{Digest, Sha256};

/// Longest legal name.
pub const MAX_LEGAL_NAME_LENGTH: usize = 200;
/// Most external ids one customer may carry.
pub const MAX_EXTERNAL_IDS: usize = 20;
/// Most contacts one customer may carry.
pub const MAX_CONTACTS: usize = 50;
/// Shortest and longest accepted agency reference.
pub const AGENCY_REFERENCE_LENGTH: std::ops::RangeInclusive<usize> = 6..=34;

/// Why a customer request is refused, by field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CustomerError {
    #[error("country_code must be an ISO 3166-1 alpha-2 code such as \"DE\"")]
    Country,
    #[error("agency_reference must be {min} to {max} letters or digits", min = AGENCY_REFERENCE_LENGTH.start(), max = AGENCY_REFERENCE_LENGTH.end())]
    AgencyReference,
    #[error("customer is already linked to credit account {0}")]
    AlreadyLinked(CreditAccountId),
}

/// An ISO 3166-1 alpha-2 country code (shape-checked: two capitals).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountryCode(String);

impl CountryCode {
    pub fn parse(code: &str) -> Result<Self, CustomerError> {
        if code.len() == 2 && code.bytes().all(|b| b.is_ascii_uppercase()) {
            Ok(Self(code.to_owned()))
        } else {
            Err(CustomerError::Country)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Contact {
    pub name: String,
    pub email: String,
    pub phone: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalId {
    pub system: String,
    pub value: String,
}

/// A validated customer ready to be stored.
#[derive(Debug, Clone)]
pub struct NewCustomer {
    pub id: CustomerId,
    pub tenant_id: String,
    pub legal_name: String,
    pub country: CountryCode,
    pub currency: Currency,
    pub external_ids: Vec<ExternalId>,
    pub contacts: Vec<Contact>,
}

/// A stored customer.
#[derive(Debug, Clone)]
pub struct Customer {
    pub id: CustomerId,
    pub tenant_id: String,
    pub legal_name: String,
    pub country_code: String,
    pub currency_code: String,
    pub external_ids: Vec<ExternalId>,
    pub contacts: Vec<Contact>,
    pub credit_link: Option<CreditLink>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// The credit account a customer is linked to, and the agency reference
/// that was verified for it (kept only as a hash and the last four
/// characters).
#[derive(Debug, Clone)]
pub struct CreditLink {
    pub credit_account_id: CreditAccountId,
    pub agency: String,
    pub reference_last4: String,
    pub reference_sha256: String,
    pub linked_at: chrono::DateTime<chrono::Utc>,
}

/// A verified agency reference. Its `Debug` never prints the value.
#[derive(Clone, PartialEq, Eq)]
pub struct AgencyReference(String);

impl std::fmt::Debug for AgencyReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgencyReference(****{})", self.last4())
    }
}

impl AgencyReference {
    /// Accepts 6 to 34 ASCII letters or digits (spaces and dashes, which
    /// people type, are removed first); letters are upper-cased.
    pub fn parse(raw: &str) -> Result<Self, CustomerError> {
        let cleaned: String = raw
            .chars()
            .filter(|c| *c != ' ' && *c != '-')
            .map(|c| c.to_ascii_uppercase())
            .collect();
        if AGENCY_REFERENCE_LENGTH.contains(&cleaned.len())
            && cleaned.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            Ok(Self(cleaned))
        } else {
            Err(CustomerError::AgencyReference)
        }
    }

    /// The last four characters, the only part ever shown again.
    pub fn last4(&self) -> String {
        self.0[self.0.len().saturating_sub(4)..].to_owned()
    }

    /// A tenant-salted SHA-256, so equal references can be matched within a
    /// tenant without storing them.
    pub fn fingerprint(&self, tenant_id: &str) -> String {
        let mut hasher = Sha256::new();
        hasher.update(tenant_id.as_bytes());
        hasher.update([0u8]);
        hasher.update(self.0.as_bytes());
        hex::encode(hasher.finalize())
    }
}

/// Whether linking `requested` to a customer currently linked to `current`
/// is allowed: a customer has one credit account; relinking the same one
/// (e.g. a new agency reference) is fine.
pub fn check_link(
    current: Option<&CreditLink>,
    requested: CreditAccountId,
) -> Result<(), CustomerError> {
    match current {
        Some(link) if link.credit_account_id != requested => {
            Err(CustomerError::AlreadyLinked(link.credit_account_id))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agency_reference_is_normalised_and_never_printed() {
        let r = AgencyReference::parse("ab-12 3456").unwrap();
        assert_eq!(r.last4(), "3456");
        assert!(!format!("{r:?}").contains("AB12"));
        assert_eq!(
            r.fingerprint("t1"),
            AgencyReference::parse("AB123456")
                .unwrap()
                .fingerprint("t1")
        );
        assert_ne!(r.fingerprint("t1"), r.fingerprint("t2"));
    }

    #[test]
    fn bad_agency_references_are_refused() {
        for raw in ["", "12345", "AB12!456", &"9".repeat(35)] {
            assert_eq!(
                AgencyReference::parse(raw),
                Err(CustomerError::AgencyReference),
                "{raw}"
            );
        }
    }

    #[test]
    fn country_codes_are_two_capitals() {
        assert!(CountryCode::parse("DE").is_ok());
        for bad in ["", "de", "DEU", "D1"] {
            assert!(CountryCode::parse(bad).is_err());
        }
    }

    #[test]
    fn a_customer_keeps_its_one_credit_account() {
        let account = CreditAccountId::new();
        let link = CreditLink {
            credit_account_id: account,
            agency: "dnb".into(),
            reference_last4: "3456".into(),
            reference_sha256: String::new(),
            linked_at: chrono::Utc::now(),
        };
        assert!(check_link(None, account).is_ok());
        assert!(check_link(Some(&link), account).is_ok());
        assert!(check_link(Some(&link), CreditAccountId::new()).is_err());
    }
}
