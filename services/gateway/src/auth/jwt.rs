//! Bearer JWTs from configured issuers.
//!
//! A token is accepted only when a configured key of its issuer verifies
//! it with that key's own algorithm (so an HS256 token cannot pass as an
//! RS256 one signed with the public key, and `alg: none` matches no key),
//! and `iss`, `aud`, `exp` and, when present, `nbf` check out.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Principal, Role};
use o2c_kit::ApiError;

/// Seconds of clock difference tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;

/// One issuer whose tokens the gateway accepts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IssuerSettings {
    /// Must equal the token's `iss`.
    pub issuer: String,
    /// Must be in the token's `aud`.
    pub audience: String,
    /// Its signing keys (several during a rotation).
    pub keys: Vec<KeySettings>,
    /// The claim naming the tenant.
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// The claim listing the roles (`platform_client`, `credit_analyst`,
    /// `crm_connector`, `admin`).
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// The tenants this issuer may speak for (empty: any tenant but the
    /// platform's). A tenant's own identity provider lists just its tenant.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// Whether this issuer speaks for the platform itself (tenant
    /// `platform`, whose ADMIN role manages every tenant's keys).
    #[serde(default)]
    pub platform: bool,
}

fn default_tenant_claim() -> String {
    "o2c_tenant".into()
}

fn default_roles_claim() -> String {
    "o2c_roles".into()
}

/// A verification key: the algorithm it is used with (the allow-list) and
/// the key itself (a PEM public key, or the shared secret for HS*).
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct KeySettings {
    /// Matched against the token header's `kid` when both are set.
    #[serde(default)]
    pub kid: Option<String>,
    /// RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, or
    /// HS256, HS384, HS512.
    pub algorithm: String,
    #[serde(skip_serializing)]
    pub key: String,
}

impl std::fmt::Debug for KeySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySettings")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .field("key", &"<redacted>")
            .finish()
    }
}

struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    decoding: DecodingKey,
    validation: Validation,
}

/// Verifies tokens of one issuer.
pub struct Verifier {
    settings: IssuerSettings,
    keys: Vec<Key>,
}

impl Verifier {
    pub fn new(settings: &IssuerSettings) -> Result<Self, String> {
        if settings.issuer.is_empty() || settings.audience.is_empty() {
            return Err("issuer and audience are required".into());
        }
        if settings.keys.is_empty() {
            return Err("at least one key is required".into());
        }
        let mut keys = Vec::new();
        for (index, key) in settings.keys.iter().enumerate() {
            let algorithm: Algorithm = key
                .algorithm
                .parse()
                .map_err(|_| format!("keys[{index}].algorithm {:?} is unknown", key.algorithm))?;
            let bad = |e: jsonwebtoken::errors::Error| format!("keys[{index}].key: {e}");
            let decoding = match algorithm {
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                    if key.key.len() < 32 {
                        return Err(format!(
                            "keys[{index}].key: an HMAC secret needs at least 32 characters"
                        ));
                    }
                    DecodingKey::from_secret(key.key.as_bytes())
                }
                Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512 => DecodingKey::from_rsa_pem(key.key.as_bytes()).map_err(bad)?,
                Algorithm::ES256 | Algorithm::ES384 => {
                    DecodingKey::from_ec_pem(key.key.as_bytes()).map_err(bad)?
                }
                Algorithm::EdDSA => DecodingKey::from_ed_pem(key.key.as_bytes()).map_err(bad)?,
            };
            let mut validation = Validation::new(algorithm);
            validation.set_issuer(&[settings.issuer.as_str()]);
            validation.set_audience(&[settings.audience.as_str()]);
            validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            validation.validate_exp = true;
            validation.validate_nbf = true;
            validation.leeway = LEEWAY_SECS;
            keys.push(Key {
                kid: key.kid.clone(),
                algorithm,
                decoding,
                validation,
            });
        }
        Ok(Self {
            settings: settings.clone(),
            keys,
        })
    }

    /// The claims of `token` if one of this issuer's keys verifies it.
    fn verify(
        &self,
        header: &jsonwebtoken::Header,
        token: &str,
    ) -> Option<Result<serde_json::Map<String, Value>, jsonwebtoken::errors::Error>> {
        let mut outcome = None;
        for key in &self.keys {
            if key.algorithm != header.alg {
                continue;
            }
            if let (Some(wanted), Some(kid)) = (&header.kid, &key.kid)
                && wanted != kid
            {
                continue;
            }
            match jsonwebtoken::decode::<serde_json::Map<String, Value>>(
                token,
                &key.decoding,
                &key.validation,
            ) {
                Ok(data) => return Some(Ok(data.claims)),
                Err(error) => outcome = Some(Err(error)),
            }
        }
        outcome
    }

    fn principal(&self, claims: &serde_json::Map<String, Value>) -> Result<Principal, ApiError> {
        let refused = |why: &str| ApiError::Unauthenticated(format!("token refused: {why}"));
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= 100)
            .ok_or_else(|| refused("sub must be 1 to 100 characters"))?;
        let tenant = claims
            .get(&self.settings.tenant_claim)
            .and_then(Value::as_str)
            .ok_or_else(|| refused("no tenant claim"))?;
        let tenant = o2c_kit::fields::tenant_id_format(&self.settings.tenant_claim, tenant)
            .map_err(|_| refused("the tenant claim is not a tenant id"))?;
        let allowed = if tenant == super::keys::PLATFORM_TENANT {
            self.settings.platform
        } else {
            self.settings.tenants.is_empty() || self.settings.tenants.contains(&tenant)
        };
        if !allowed {
            return Err(refused("this issuer does not speak for that tenant"));
        }
        let roles = claims
            .get(&self.settings.roles_claim)
            .and_then(Value::as_array)
            .map(|roles| {
                roles
                    .iter()
                    .filter_map(Value::as_str)
                    .filter_map(Role::from_code)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        Ok(Principal {
            tenant,
            subject: subject.to_owned(),
            roles,
        })
    }
}

/// The caller a bearer token names, if a configured issuer vouches for
/// it, with the token's `exp` (0 when it is not a whole number of seconds).
pub fn verify_any_until(issuers: &[Verifier], token: &str) -> Result<(Principal, u64), ApiError> {
    let refused = |why: String| ApiError::Unauthenticated(format!("token refused: {why}"));
    // `alg: none` and unknown algorithms fail here: no such Algorithm.
    let header = jsonwebtoken::decode_header(token)
        .map_err(|_| refused("not a signed JWT with a supported algorithm".into()))?;
    let mut last = None;
    for issuer in issuers {
        match issuer.verify(&header, token) {
            Some(Ok(claims)) => {
                let exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
                return issuer.principal(&claims).map(|principal| (principal, exp));
            }
            Some(Err(error)) => last = Some(error),
            None => {}
        }
    }
    Err(match last {
        Some(error) => {
            use jsonwebtoken::errors::ErrorKind;
            refused(
                match error.kind() {
                    ErrorKind::ExpiredSignature => "expired",
                    ErrorKind::ImmatureSignature => "not valid yet (nbf)",
                    ErrorKind::InvalidAudience => "wrong audience",
                    ErrorKind::InvalidIssuer => "wrong issuer",
                    ErrorKind::InvalidSignature => "bad signature",
                    ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
                    _ => "invalid",
                }
                .into(),
            )
        }
        None => refused("no configured key for its algorithm and key id".into()),
    })
}
