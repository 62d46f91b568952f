//! Order workflow rules. No I/O.

/// Longest client order reference.
pub const MAX_CLIENT_REFERENCE_LENGTH: usize = 100;
/// Longest idempotency key a client may send: the gateway derives the keys
/// of its downstream calls by suffixing it.
pub const MAX_CLIENT_KEY_LENGTH: usize = 150;
/// Longest net term accepted when invoicing an order.
pub const MAX_NET_DAYS: i32 = 365;

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    /// Created; the credit check has not answered yet.
    Pending,
    Approved,
    Held,
    Blocked,
    Invoiced,
    Cancelled,
    Rejected,
}

impl OrderStatus {
    pub fn code(self) -> &'static str {
        match self {
            OrderStatus::Pending => "PENDING",
            OrderStatus::Approved => "APPROVED",
            OrderStatus::Held => "HELD",
            OrderStatus::Blocked => "BLOCKED",
            OrderStatus::Invoiced => "INVOICED",
            OrderStatus::Cancelled => "CANCELLED",
            OrderStatus::Rejected => "REJECTED",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "PENDING" => Some(OrderStatus::Pending),
            "APPROVED" => Some(OrderStatus::Approved),
            "HELD" => Some(OrderStatus::Held),
            "BLOCKED" => Some(OrderStatus::Blocked),
            "INVOICED" => Some(OrderStatus::Invoiced),
            "CANCELLED" => Some(OrderStatus::Cancelled),
            "REJECTED" => Some(OrderStatus::Rejected),
            _ => None,
        }
    }

    /// Only an order whose credit is reserved can be invoiced. `Invoiced`
    /// is allowed too so an interrupted invoicing can be finished by a
    /// retry with the same idempotency key.
    pub fn can_invoice(self) -> bool {
        matches!(self, OrderStatus::Approved | OrderStatus::Invoiced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reserved_orders_can_be_invoiced() {
        assert!(OrderStatus::Approved.can_invoice());
        assert!(OrderStatus::Invoiced.can_invoice());
        for s in [
            OrderStatus::Pending,
            OrderStatus::Held,
            OrderStatus::Blocked,
        ] {
            assert!(!s.can_invoice());
        }
    }

    #[test]
    fn codes_round_trip() {
        for s in [
            OrderStatus::Pending,
            OrderStatus::Approved,
            OrderStatus::Held,
            OrderStatus::Blocked,
            OrderStatus::Invoiced,
            OrderStatus::Cancelled,
            OrderStatus::Rejected,
        ] {
            assert_eq!(OrderStatus::from_code(s.code()), Some(s));
        }
    }
}
