//! The risk scorecard: payment pattern, history and size → score 0–100 →
//! class A–E → calculated limit. Every factor's points are returned so a
//! score can be explained and replayed from its stored inputs.

use chrono::NaiveDate;

/// Version of the scorecard; stored with every score.
pub const SCORECARD_VERSION: &str = "risk-scorecard/2026-12-04.1";
/// Score every customer starts from.
const BASE_POINTS: i32 = 50;
/// Payments the trend compares: the latest ones against the earlier ones.
pub const TREND_WINDOW: usize = 3;

/// What the scorecard looks at.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Facts {
    pub relationship_since: Option<NaiveDate>,
    pub annual_volume_minor: i64,
    pub disputes: i32,
    pub write_offs: i32,
    pub broken_promises: i32,
    pub past_holds: i64,
    pub open_receivables_minor: i64,
    /// (days to pay, days beyond terms) per paid invoice, oldest first.
    pub payments: Vec<(i32, i32)>,
}

/// One factor's contribution.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Factor {
    pub name: String,
    pub value: String,
    pub points: i32,
    pub explanation: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RiskClass {
    A,
    B,
    C,
    D,
    E,
}

impl RiskClass {
    pub fn code(self) -> &'static str {
        match self {
            RiskClass::A => "A",
            RiskClass::B => "B",
            RiskClass::C => "C",
            RiskClass::D => "D",
            RiskClass::E => "E",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "A" => Some(RiskClass::A),
            "B" => Some(RiskClass::B),
            "C" => Some(RiskClass::C),
            "D" => Some(RiskClass::D),
            "E" => Some(RiskClass::E),
            _ => None,
        }
    }

    fn of(score: i32) -> Self {
        match score {
            80.. => RiskClass::A,
            65..=79 => RiskClass::B,
            50..=64 => RiskClass::C,
            35..=49 => RiskClass::D,
            _ => RiskClass::E,
        }
    }

    /// Share of annual volume (percent) granted as the calculated limit.
    fn limit_percent_of_volume(self) -> i64 {
        match self {
            RiskClass::A => 25,
            RiskClass::B => 20,
            RiskClass::C => 12,
            RiskClass::D => 6,
            RiskClass::E => 0,
        }
    }
}

/// A computed score.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Score {
    pub points: i32,
    pub class: RiskClass,
    pub calculated_limit_minor: i64,
    pub factors: Vec<Factor>,
}

fn factor(name: &str, value: String, points: i32, explanation: &str) -> Factor {
    Factor {
        name: name.to_owned(),
        value,
        points,
        explanation: explanation.to_owned(),
    }
}

fn average(values: impl Iterator<Item = i32>) -> Option<f64> {
    // Averages of whole days only shape points; they never touch money.
    let (sum, count) = values.fold((0i64, 0i64), |(s, c), v| (s + i64::from(v), c + 1));
    (count > 0).then(|| sum as f64 / count as f64)
}

/// Scores `facts` on `today`.
pub fn score(facts: &Facts, today: NaiveDate) -> Score {
    let mut factors = Vec::new();

    match average(facts.payments.iter().map(|p| p.1)) {
        None => factors.push(factor(
            "days_beyond_terms",
            "no history".into(),
            0,
            "no paid invoices yet",
        )),
        Some(avg) => {
            let points = match avg {
                a if a <= 0.0 => 20,
                a if a <= 5.0 => 10,
                a if a <= 15.0 => 0,
                a if a <= 30.0 => -10,
                _ => -20,
            };
            factors.push(factor(
                "days_beyond_terms",
                format!("{avg:.1}"),
                points,
                "average days paid after the due date: on time +20, up to 5 +10, up to 15 0, up to 30 -10, later -20",
            ));
        }
    }
    if let Some(avg) = average(facts.payments.iter().map(|p| p.0)) {
        let points = match avg {
            a if a <= 30.0 => 5,
            a if a <= 45.0 => 0,
            a if a <= 60.0 => -5,
            _ => -10,
        };
        factors.push(factor(
            "average_days_to_pay",
            format!("{avg:.1}"),
            points,
            "average days from issue to payment: up to 30 +5, up to 45 0, up to 60 -5, more -10",
        ));
    }
    if facts.payments.len() > TREND_WINDOW {
        let split = facts.payments.len() - TREND_WINDOW;
        let earlier = average(facts.payments[..split].iter().map(|p| p.1)).unwrap_or(0.0);
        let recent = average(facts.payments[split..].iter().map(|p| p.1)).unwrap_or(0.0);
        let change = recent - earlier;
        let points = if change < -2.0 {
            5
        } else if change > 2.0 {
            -5
        } else {
            0
        };
        factors.push(factor(
            "payment_trend",
            format!("{change:+.1}"),
            points,
            "change in days beyond terms, last 3 payments vs earlier: improving +5, worsening -5",
        ));
    }
    match facts.relationship_since {
        None => factors.push(factor(
            "relationship_years",
            "unknown".into(),
            0,
            "relationship start unknown",
        )),
        Some(since) => {
            let years = (today - since).num_days() / 365;
            let points = match years {
                ..1 => -5,
                1..=2 => 5,
                _ => 10,
            };
            factors.push(factor(
                "relationship_years",
                years.to_string(),
                points,
                "years as a customer: under 1 -5, 1 to 2 +5, 3 or more +10",
            ));
        }
    }
    let capped = |count: i64, each: i32, cap: i32| -> i32 {
        let points = i32::try_from(count.saturating_mul(i64::from(each))).unwrap_or(cap);
        points.max(cap)
    };
    factors.push(factor(
        "past_holds",
        facts.past_holds.to_string(),
        capped(facts.past_holds, -2, -10),
        "-2 per order ever held, at most -10",
    ));
    factors.push(factor(
        "write_offs",
        facts.write_offs.to_string(),
        capped(i64::from(facts.write_offs), -15, -30),
        "-15 per write-off, at most -30",
    ));
    factors.push(factor(
        "disputes",
        facts.disputes.to_string(),
        capped(i64::from(facts.disputes), -3, -12),
        "-3 per dispute, at most -12",
    ));
    factors.push(factor(
        "broken_promises",
        facts.broken_promises.to_string(),
        capped(i64::from(facts.broken_promises), -5, -15),
        "-5 per broken promise to pay, at most -15",
    ));
    let heavy = facts.annual_volume_minor > 0
        && facts.open_receivables_minor.saturating_mul(2) > facts.annual_volume_minor;
    factors.push(factor(
        "open_receivables_share",
        if facts.annual_volume_minor > 0 {
            format!(
                "{}%",
                i128::from(facts.open_receivables_minor) * 100
                    / i128::from(facts.annual_volume_minor)
            )
        } else {
            "no volume".into()
        },
        if heavy { -5 } else { 0 },
        "open receivables above half the annual volume -5",
    ));

    let points = (BASE_POINTS + factors.iter().map(|f| f.points).sum::<i32>()).clamp(0, 100);
    let class = RiskClass::of(points);
    let limit = i128::from(facts.annual_volume_minor.max(0))
        * i128::from(class.limit_percent_of_volume())
        / 100;
    Score {
        points,
        class,
        calculated_limit_minor: i64::try_from(limit).unwrap_or(i64::MAX),
        factors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 12, 4).unwrap()
    }

    fn facts() -> Facts {
        Facts {
            relationship_since: NaiveDate::from_ymd_opt(2020, 1, 1),
            annual_volume_minor: 120_000_000,
            disputes: 0,
            write_offs: 0,
            broken_promises: 0,
            past_holds: 0,
            open_receivables_minor: 10_000_000,
            payments: vec![(28, -2), (30, 0), (25, -5)],
        }
    }

    #[test]
    fn a_punctual_long_standing_customer_is_class_a() {
        let s = score(&facts(), today());
        // 50 + 20 (on time) + 5 (fast) + 10 (6 years) = 85.
        assert_eq!(s.points, 85);
        assert_eq!(s.class, RiskClass::A);
        assert_eq!(s.calculated_limit_minor, 30_000_000);
        assert_eq!(
            s.points,
            BASE_POINTS + s.factors.iter().map(|f| f.points).sum::<i32>(),
            "the factors explain the whole score"
        );
    }

    #[test]
    fn late_payers_with_write_offs_drop_to_e() {
        let mut f = facts();
        f.payments = vec![(70, 40), (80, 45), (75, 50), (90, 60)];
        f.write_offs = 3;
        f.broken_promises = 2;
        f.past_holds = 9;
        let s = score(&f, today());
        assert_eq!(s.class, RiskClass::E);
        assert_eq!(s.calculated_limit_minor, 0);
        let write_offs = s.factors.iter().find(|f| f.name == "write_offs").unwrap();
        assert_eq!(write_offs.points, -30, "capped");
    }

    #[test]
    fn a_worsening_trend_costs_points() {
        let mut f = facts();
        f.payments = vec![(30, 0), (30, 0), (30, 0), (40, 10), (40, 10), (40, 10)];
        let s = score(&f, today());
        let trend = s
            .factors
            .iter()
            .find(|f| f.name == "payment_trend")
            .unwrap();
        assert_eq!(trend.points, -5);
    }

    #[test]
    fn scoring_is_deterministic() {
        assert_eq!(score(&facts(), today()), score(&facts(), today()));
    }
}
