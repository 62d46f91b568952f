//! CRM connector rules. No I/O.

/// Longest interaction summary.
pub const MAX_SUMMARY_LENGTH: usize = 2_000;
/// Default and largest page of interactions.
pub const DEFAULT_PAGE_SIZE: u64 = 50;
pub const MAX_PAGE_SIZE: u64 = 100;

/// What kind of contact a CRM recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InteractionKind {
    Call,
    Email,
    Dispute,
    PromiseToPay,
}

impl InteractionKind {
    pub fn code(self) -> &'static str {
        match self {
            InteractionKind::Call => "CALL",
            InteractionKind::Email => "EMAIL",
            InteractionKind::Dispute => "DISPUTE",
            InteractionKind::PromiseToPay => "PROMISE_TO_PAY",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "CALL" => Some(InteractionKind::Call),
            "EMAIL" => Some(InteractionKind::Email),
            "DISPUTE" => Some(InteractionKind::Dispute),
            "PROMISE_TO_PAY" => Some(InteractionKind::PromiseToPay),
            _ => None,
        }
    }
}

/// The page size a caller gets for `requested` (0 means the default).
pub fn page_size(requested: i32) -> Option<u64> {
    match requested {
        0 => Some(DEFAULT_PAGE_SIZE),
        n if n > 0 && (n as u64) <= MAX_PAGE_SIZE => Some(n as u64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_are_bounded() {
        assert_eq!(page_size(0), Some(DEFAULT_PAGE_SIZE));
        assert_eq!(page_size(7), Some(7));
        assert_eq!(page_size(101), None);
        assert_eq!(page_size(-1), None);
    }

    #[test]
    fn kinds_round_trip() {
        for k in [
            InteractionKind::Call,
            InteractionKind::Email,
            InteractionKind::Dispute,
            InteractionKind::PromiseToPay,
        ] {
            assert_eq!(InteractionKind::from_code(k.code()), Some(k));
        }
    }
}
