//! Cross-service end-to-end tests live in `tests/`, benchmarks in
//! `benches/`; this crate holds what they share.

pub mod cpu;

/// The identity provider the tests and benchmarks trust: an HS256 issuer
/// (a test double of a real one; RS/ES keys are configured the same way
/// with a PEM).
pub mod identity {
    pub const ISSUER: &str = "https://idp.test.example";
    pub const AUDIENCE: &str = "o2c-gateway";
    pub const SECRET: &str = "test-identity-provider-secret-0123456789";

    /// The gateway's settings for this issuer (any tenant but the
    /// platform's).
    pub fn issuer() -> o2c_gateway::auth::jwt::IssuerSettings {
        o2c_gateway::auth::jwt::IssuerSettings {
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            keys: vec![o2c_gateway::auth::jwt::KeySettings {
                kid: None,
                algorithm: "HS256".into(),
                key: SECRET.into(),
            }],
            tenant_claim: "o2c_tenant".into(),
            roles_claim: "o2c_roles".into(),
            tenants: vec![],
            platform: false,
        }
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }

    /// A token of this issuer with `claims` (`sub`, `o2c_tenant`,
    /// `o2c_roles`, …) over valid defaults for `iss`, `aud`, `iat`, `nbf`
    /// and `exp` (ten minutes).
    pub fn token(claims: serde_json::Value) -> String {
        let mut all = serde_json::json!({
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": now(),
            "nbf": now() - 5,
            "exp": now() + 600,
        });
        if let (Some(all), Some(extra)) = (all.as_object_mut(), claims.as_object()) {
            for (key, value) in extra {
                all.insert(key.clone(), value.clone());
            }
        }
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &all,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap_or_default()
    }
}
