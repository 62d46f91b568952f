//! Typed identifiers. Each wraps a UUID (v7: time-ordered, so new rows land
//! at the end of indexes) and prints as its canonical hyphenated form.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// The text was not a UUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid id: {0:?}")]
pub struct InvalidId(pub String);

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh, time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// The id that is `uuid`.
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The underlying UUID.
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::try_parse(s.trim())
                    .map(Self)
                    .map_err(|_| InvalidId(s.to_owned()))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.as_hyphenated().fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0.as_hyphenated())
            }
        }
    };
}

id_type!(
    /// A customer (legal entity we sell to).
    CustomerId
);
id_type!(
    /// A customer's credit account.
    CreditAccountId
);
id_type!(
    /// An order placed through the gateway.
    OrderId
);
id_type!(
    /// A credit reservation held for an order.
    ReservationId
);
id_type!(
    /// A stored credit decision.
    DecisionId
);
id_type!(
    /// An invoice.
    InvoiceId
);
id_type!(
    /// A received payment.
    PaymentId
);
id_type!(
    /// A CRM interaction.
    InteractionId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_garbage() {
        let id = CustomerId::new();
        assert_eq!(id.to_string().parse::<CustomerId>(), Ok(id));
        assert!("not-a-uuid".parse::<CustomerId>().is_err());
        assert!("".parse::<InvoiceId>().is_err());
    }
}
