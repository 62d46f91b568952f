//! Order workflow rules. No I/O.

/// Longest client order reference.
pub const MAX_CLIENT_REFERENCE_LENGTH: usize = 100;
/// Longest idempotency key a client may send: the gateway derives the keys
/// of its downstream calls by suffixing it.
pub const MAX_CLIENT_KEY_LENGTH: usize = 150;
/// Longest net term accepted when invoicing an order.
pub const MAX_NET_DAYS: i32 = 365;

/// The id of the order a tenant's PlaceOrder call with idempotency key
/// `key` creates: the same for every retry of the call, in every gateway
/// replica, so the credit check a retry repeats is for the same order. A
/// UUID (version 8) from SHA-256 of both.
pub fn order_id_for(tenant: &str, key: &str) -> o2c_money::ids::OrderId {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(b"o2c.gateway.PlaceOrder\0")
        .chain_update(tenant.as_bytes())
        .chain_update(b"\0")
        .chain_update(key.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    o2c_money::ids::OrderId::from_uuid(uuid::Builder::from_custom_bytes(bytes).into_uuid())
}

/// Whether `id` can be one [`order_id_for`] made (orders placed before ids
/// were derived have random, time-ordered ones).
pub fn is_placed_id(id: o2c_money::ids::OrderId) -> bool {
    id.as_uuid().get_version_num() == 8
}

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
    fn an_order_id_is_the_same_for_the_same_call_and_differs_otherwise() {
        let id = order_id_for("acme", "order-1");
        assert_eq!(id, order_id_for("acme", "order-1"));
        assert_ne!(id, order_id_for("acme", "order-2"));
        assert_ne!(id, order_id_for("globex", "order-1"));
        // The separator keeps tenant and key apart.
        assert_ne!(order_id_for("ab", "c"), order_id_for("a", "bc"));
        assert!(is_placed_id(id));
        assert!(!is_placed_id(o2c_money::ids::OrderId::new()));
    }

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
