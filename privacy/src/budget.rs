//! The privacy-budget ledger: how much epsilon each stream has spent per UTC day.
//!
//! A stream with differential-privacy noise pays its `epsilon` for every window it releases. The
//! ledger refuses a release that would take the day's spending over the stream's daily budget, and
//! refuses to pay twice for the same window, so a window is never released (and noised) twice,
//! even if it is recomputed after a crash. The day is the UTC day of the window's start.
//!
//! The ledger is plain data (serde): the gateway writes it to disk before each release, so a
//! restart can never reset a spent budget.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

const DAY_MS: i64 = 86_400_000;

/// Days of history kept; older days can no longer receive releases (windows are closed).
const DAYS_KEPT: i64 = 7;

/// Why a release was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the day's privacy budget is spent ({spent_micro} of {cap_micro} micro-epsilon)")]
    OverBudget { spent_micro: u64, cap_micro: u64 },
    #[error("this window was already released")]
    AlreadyCharged,
}

/// One stream's spending.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamBudget {
    /// Micro-epsilon spent per UTC day (days since the Unix epoch).
    spent: BTreeMap<i64, u64>,
    /// Start times of the windows paid for.
    charged: BTreeSet<i64>,
}

impl StreamBudget {
    /// Pays `cost_micro` for releasing the window that starts at `window_start_ms`, unless that
    /// takes the day over `cap_micro` or the window was already paid for.
    pub fn charge(
        &mut self,
        window_start_ms: i64,
        cost_micro: u64,
        cap_micro: u64,
    ) -> Result<(), Refusal> {
        if self.charged.contains(&window_start_ms) {
            return Err(Refusal::AlreadyCharged);
        }
        let day = window_start_ms.div_euclid(DAY_MS);
        let spent = self.spent_on(day);
        if spent.saturating_add(cost_micro) > cap_micro {
            return Err(Refusal::OverBudget {
                spent_micro: spent,
                cap_micro,
            });
        }
        self.spent.insert(day, spent + cost_micro);
        self.charged.insert(window_start_ms);
        let oldest = day - DAYS_KEPT;
        self.spent.retain(|d, _| *d > oldest);
        self.charged.retain(|w| w.div_euclid(DAY_MS) > oldest);
        Ok(())
    }

    /// Micro-epsilon spent on a UTC day (days since the Unix epoch).
    pub fn spent_on(&self, day: i64) -> u64 {
        self.spent.get(&day).copied().unwrap_or(0)
    }

    /// Micro-epsilon spent on the UTC day that holds `t_ms`.
    pub fn spent_on_day_of(&self, t_ms: i64) -> u64 {
        self.spent_on(t_ms.div_euclid(DAY_MS))
    }
}

/// Every stream's spending, by stream name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    pub streams: BTreeMap<String, StreamBudget>,
}

impl Ledger {
    pub fn stream(&mut self, name: &str) -> &mut StreamBudget {
        self.streams.entry(name.to_owned()).or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = DAY_MS;

    #[test]
    fn the_release_over_the_cap_is_refused() {
        let mut b = StreamBudget::default();
        let t0 = 20_000 * DAY;
        assert_eq!(b.charge(t0, 400_000, 1_000_000), Ok(()));
        assert_eq!(b.charge(t0 + 60_000, 400_000, 1_000_000), Ok(()));
        assert_eq!(
            b.charge(t0 + 120_000, 400_000, 1_000_000),
            Err(Refusal::OverBudget {
                spent_micro: 800_000,
                cap_micro: 1_000_000
            })
        );
        // A smaller release still fits; the day is then exactly spent.
        assert_eq!(b.charge(t0 + 180_000, 200_000, 1_000_000), Ok(()));
        assert_eq!(b.spent_on_day_of(t0), 1_000_000);
        // The next UTC day starts afresh.
        assert_eq!(b.charge(t0 + DAY, 400_000, 1_000_000), Ok(()));
        assert_eq!(b.spent_on_day_of(t0 + DAY), 400_000);
    }

    #[test]
    fn a_window_is_paid_for_and_released_once() {
        let mut b = StreamBudget::default();
        let t0 = 20_000 * DAY + 3_600_000;
        assert_eq!(b.charge(t0, 1, 10), Ok(()));
        assert_eq!(b.charge(t0, 1, 10), Err(Refusal::AlreadyCharged));
        assert_eq!(b.spent_on_day_of(t0), 1);
    }

    #[test]
    fn a_restored_ledger_keeps_what_was_spent() {
        let mut ledger = Ledger::default();
        let t0 = 20_000 * DAY;
        ledger
            .stream("footfall")
            .charge(t0, 900_000, 1_000_000)
            .unwrap();
        let json = serde_json::to_string(&ledger).unwrap();
        let mut restored: Ledger = serde_json::from_str(&json).unwrap();
        assert_eq!(restored, ledger);
        assert!(
            restored
                .stream("footfall")
                .charge(t0 + 60_000, 200_000, 1_000_000)
                .is_err()
        );
        assert_eq!(
            restored.stream("footfall").charge(t0, 1, 1_000_000),
            Err(Refusal::AlreadyCharged)
        );
    }

    #[test]
    fn old_days_are_forgotten() {
        let mut b = StreamBudget::default();
        for d in 0..30 {
            b.charge(d * DAY, 1, 10).unwrap();
        }
        assert_eq!(b.spent.len() as i64, DAYS_KEPT);
        assert_eq!(b.charged.len() as i64, DAYS_KEPT);
    }
}
