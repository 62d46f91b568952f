//! Layered settings: defaults in code, then an optional TOML file, then
//! `O2C_*` environment variables (`__` separates nested keys, so
//! `O2C_CREDIT__LISTEN_ADDR` sets `credit.listen_addr`).

use std::net::SocketAddr;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Settings could not be read or are invalid; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("reading settings: {0}")]
    Read(#[from] Box<figment::Error>),
    #[error("invalid setting {key}: {reason}")]
    Invalid { key: String, reason: String },
}

/// What every service needs to run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceSettings {
    /// Where the gRPC server listens; port 0 picks a free port.
    pub listen_addr: SocketAddr,
    /// `sqlite://path/to/file.db` (created when missing) or
    /// `postgres://user@host/db`.
    pub database_url: String,
    /// Longest time in-flight calls get to finish after a shutdown signal.
    pub shutdown_grace_ms: u64,
}

impl ServiceSettings {
    /// Defaults for a service on `port` with its SQLite file under `./data`.
    pub fn local(name: &str, port: u16) -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            database_url: format!("sqlite://data/{name}.db"),
            shutdown_grace_ms: 10_000,
        }
    }

    /// Checks what serde cannot; `prefix` is the key path used in errors.
    pub fn validate(&self, prefix: &str) -> Result<(), SettingsError> {
        let url = &self.database_url;
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(SettingsError::Invalid {
                key: format!("{prefix}database_url"),
                reason: "must start with sqlite:, postgres:// or postgresql://".into(),
            });
        }
        if self.shutdown_grace_ms > 600_000 {
            return Err(SettingsError::Invalid {
                key: format!("{prefix}shutdown_grace_ms"),
                reason: "at most 600000".into(),
            });
        }
        Ok(())
    }
}

/// A setting that must never be printed: `Debug` shows `<redacted>`, and
/// it is read (deserialized) but never written back out.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Shared by all services: observability and the optional cache.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CommonSettings {
    /// OTLP/gRPC endpoint (e.g. `http://127.0.0.1:4317`); no export when unset.
    pub otlp_endpoint: Option<String>,
    /// `redis://host:port`; no cache when unset.
    pub redis_url: Option<String>,
    /// `text` (default) or `json` log lines (JSON lines carry trace_id and
    /// span_id).
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `info,o2c_credit=debug`; `RUST_LOG` when
    /// unset, else `info` with noisy libraries at `warn`.
    pub log_level: Option<String>,
    /// The secret every service of a deployment signs and checks internal
    /// calls with (at least 32 characters; the same everywhere). Required
    /// by the single-service binaries; the all-in-one makes its own.
    #[serde(skip_serializing)]
    pub internal_auth_secret: Option<Secret>,
}

impl CommonSettings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        if let Some(url) = &self.redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return Err(SettingsError::Invalid {
                key: "redis_url".into(),
                reason: "must start with redis:// or rediss://".into(),
            });
        }
        if let Some(secret) = &self.internal_auth_secret
            && secret.expose().len() < crate::auth::MIN_SECRET_LENGTH
        {
            return Err(SettingsError::Invalid {
                key: "internal_auth_secret".into(),
                reason: format!("at least {} characters", crate::auth::MIN_SECRET_LENGTH),
            });
        }
        if let Some(url) = &self.otlp_endpoint
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(SettingsError::Invalid {
                key: "otlp_endpoint".into(),
                reason: "must start with http:// or https://".into(),
            });
        }
        Ok(())
    }
}

/// Longest deadline accepted for one internal call.
pub const MAX_CALL_TIMEOUT_MS: u64 = 60_000;

/// Checks a per-call deadline setting.
pub fn validate_call_timeout(key: &str, value_ms: u64) -> Result<(), SettingsError> {
    if value_ms == 0 || value_ms > MAX_CALL_TIMEOUT_MS {
        return Err(SettingsError::Invalid {
            key: key.to_owned(),
            reason: format!("1 to {MAX_CALL_TIMEOUT_MS}"),
        });
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Loads `T`: its defaults, then `file` when given (it must exist), then the
/// `O2C_*` environment.
pub fn load<T>(defaults: T, file: Option<&Path>) -> Result<T, SettingsError>
where
    T: Serialize + for<'de> Deserialize<'de>,
{
    let mut figment = Figment::from(Serialized::defaults(defaults));
    if let Some(path) = file {
        figment = figment.merge(Toml::file_exact(path));
    }
    figment
        .merge(Env::prefixed("O2C_").split("__"))
        .extract()
        .map_err(|e| SettingsError::Read(Box::new(e)))
}

/// The settings file named by `--config PATH` on the command line, if any.
pub fn config_path_from_args() -> Option<std::path::PathBuf> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--config" {
            return args.next().map(Into::into);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(path.into());
        }
    }
    None
}

/// The same major-unit amount for the currencies most tenants invoice in:
/// the default of every per-currency limit setting.
pub fn default_currency_limits(amount: &str) -> std::collections::BTreeMap<String, String> {
    ["EUR", "USD", "GBP", "CHF"]
        .into_iter()
        .map(|code| (code.to_owned(), amount.to_owned()))
        .collect()
}

/// A validated per-currency limit setting (refunds, payouts, authority):
/// minor units by currency code. A currency not listed has no allowance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CurrencyLimits(std::collections::HashMap<&'static str, i64>);

impl CurrencyLimits {
    /// Parses `setting` (currency code → major-unit amount) named `key`.
    pub fn parse(
        key: &str,
        setting: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self, SettingsError> {
        let mut limits = std::collections::HashMap::new();
        for (code, amount) in setting {
            let invalid = |reason: String| SettingsError::Invalid {
                key: format!("{key}.{code}"),
                reason,
            };
            let currency = o2c_money::Currency::from_code(&code.to_uppercase())
                .map_err(|e| invalid(e.to_string()))?;
            let amount =
                o2c_money::Money::parse_in(amount, currency).map_err(|e| invalid(e.to_string()))?;
            if amount.is_negative() {
                return Err(invalid("must not be negative".into()));
            }
            limits.insert(currency.code(), amount.minor_units());
        }
        Ok(Self(limits))
    }

    /// The limit for `currency` in minor units, if it has one.
    pub fn get(&self, currency: o2c_money::Currency) -> Option<i64> {
        self.0.get(currency.code()).copied()
    }

    /// Whether `amount` is within the limit of its currency.
    pub fn allows(&self, amount: &o2c_money::Money) -> bool {
        self.get(amount.currency())
            .is_some_and(|limit| amount.minor_units() <= limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn currency_limits_are_exact_and_name_the_bad_key() {
        let limits =
            CurrencyLimits::parse("refund_limit", &default_currency_limits("10000")).unwrap();
        let eur = |a: &str| o2c_money::Money::parse(a, "EUR").unwrap();
        assert!(limits.allows(&eur("10000.00")));
        assert!(!limits.allows(&eur("10000.01")));
        assert!(
            !limits.allows(&o2c_money::Money::parse("1", "JPY").unwrap()),
            "unlisted: no allowance"
        );
        let bad: std::collections::BTreeMap<_, _> = [("EUR".to_owned(), "1.001".to_owned())].into();
        let error = CurrencyLimits::parse("refund_limit", &bad).unwrap_err();
        assert!(error.to_string().contains("refund_limit.EUR"), "{error}");
        let negative: std::collections::BTreeMap<_, _> =
            [("usd".to_owned(), "-1".to_owned())].into();
        assert!(CurrencyLimits::parse("payout_limit", &negative).is_err());
    }
}
