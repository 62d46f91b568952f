//! Payment rules: how a receipt may be allocated, and what must never be
//! stored. No I/O.

pub mod processor;

use o2c_money::ids::InvoiceId;
use o2c_money::{Money, MoneyError};

/// Most allocations one payment may carry.
pub const MAX_ALLOCATIONS: usize = 100;
/// Longest payer reference.
pub const MAX_REFERENCE_LENGTH: usize = 140;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PaymentError {
    #[error("invoice {0} is allocated more than once")]
    DuplicateInvoice(InvoiceId),
    #[error("allocations total {allocated}, more than the payment {amount}")]
    OverAllocated { allocated: Money, amount: Money },
    #[error("must be in the payment currency")]
    Currency,
    #[error("must not contain a card number; send a token")]
    CardNumber,
    #[error("amount out of range: {0}")]
    Money(#[from] MoneyError),
}

/// Money received and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub invoice_id: InvoiceId,
    pub amount: Money,
}

/// Checks allocations against the payment and returns the unapplied rest:
/// what is not allocated stays on the payment as account credit.
pub fn unapplied(amount: Money, allocations: &[Allocation]) -> Result<Money, PaymentError> {
    let mut allocated = Money::zero(amount.currency());
    for (index, allocation) in allocations.iter().enumerate() {
        if allocation.amount.currency() != amount.currency() {
            return Err(PaymentError::Currency);
        }
        if allocations[..index]
            .iter()
            .any(|a| a.invoice_id == allocation.invoice_id)
        {
            return Err(PaymentError::DuplicateInvoice(allocation.invoice_id));
        }
        allocated = allocated.checked_add(&allocation.amount)?;
    }
    let rest = amount.checked_sub(&allocated)?;
    if rest.is_negative() {
        return Err(PaymentError::OverAllocated { allocated, amount });
    }
    Ok(rest)
}

/// Retry delays after each declined attempt of a collection; after the
/// last one the session fails.
pub fn next_attempt_delay(schedule_ms: &[u64], attempts_so_far: usize) -> Option<u64> {
    schedule_ms.get(attempts_so_far.saturating_sub(1)).copied()
}

/// True when `text` holds a run of 13 to 19 digits (spaces and dashes
/// allowed between) that passes the Luhn check: a card number.
pub fn contains_card_number(text: &str) -> bool {
    let mut digits: Vec<u32> = Vec::new();
    let flush = |digits: &mut Vec<u32>| -> bool {
        let found = (13..=19).contains(&digits.len()) && luhn(digits);
        digits.clear();
        found
    };
    for c in text.chars() {
        if let Some(d) = c.to_digit(10) {
            digits.push(d);
        } else if (c == ' ' || c == '-') && !digits.is_empty() {
            continue;
        } else if flush(&mut digits) {
            return true;
        }
    }
    flush(&mut digits)
}

fn luhn(digits: &[u32]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur(s: &str) -> Money {
        Money::parse(s, "EUR").unwrap()
    }

    #[test]
    fn the_rest_of_a_payment_is_kept_as_unapplied_cash() {
        let a = Allocation {
            invoice_id: InvoiceId::new(),
            amount: eur("60"),
        };
        let b = Allocation {
            invoice_id: InvoiceId::new(),
            amount: eur("30"),
        };
        assert_eq!(unapplied(eur("100"), &[a, b]).unwrap(), eur("10"));
        assert_eq!(unapplied(eur("100"), &[]).unwrap(), eur("100"));
    }

    #[test]
    fn over_allocation_and_duplicates_are_refused() {
        let id = InvoiceId::new();
        let a = Allocation {
            invoice_id: id,
            amount: eur("60"),
        };
        assert!(matches!(
            unapplied(
                eur("100"),
                &[
                    a.clone(),
                    Allocation {
                        invoice_id: InvoiceId::new(),
                        amount: eur("41")
                    }
                ]
            ),
            Err(PaymentError::OverAllocated { .. })
        ));
        assert_eq!(
            unapplied(eur("200"), &[a.clone(), a]),
            Err(PaymentError::DuplicateInvoice(id))
        );
        let usd = Allocation {
            invoice_id: InvoiceId::new(),
            amount: Money::parse("1", "USD").unwrap(),
        };
        assert_eq!(unapplied(eur("100"), &[usd]), Err(PaymentError::Currency));
    }

    #[test]
    fn card_numbers_are_detected() {
        assert!(contains_card_number("4111 1111 1111 1111"));
        assert!(contains_card_number("paid with 4111-1111-1111-1111 thanks"));
        assert!(!contains_card_number("INV-2026-000123"));
        assert!(!contains_card_number("4111 1111 1111 1112"));
        assert!(!contains_card_number("tok_abc123"));
    }
}
