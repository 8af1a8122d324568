//! The privacy-budget ledger: how much epsilon each budget pool has spent per UTC day.
//!
//! A stream with differential-privacy noise pays its `epsilon` for every window on its clock, as
//! the window closes, whether it held readings or not: what is spent, and when, depends on the
//! time alone, never on the data. The ledger refuses a payment that would take the day's spending
//! over the daily budget, and settles each window of a stream's clock once, paid or refused, so a
//! window is never released (and noised) twice, even if it is recomputed after a crash. The day
//! is the UTC day of the window's start. Streams that aggregate readings of the same topics share
//! one pool ([`crate::policy::aggregate::Noise::budget_pool`]): their spending adds up, each keeps
//! its own clock.
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
    #[error("this window was already settled")]
    AlreadyCharged,
}

/// One budget pool's spending, and the clock of each stream that pays into it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolBudget {
    /// Micro-epsilon spent per UTC day (days since the Unix epoch).
    spent: BTreeMap<i64, u64>,
    /// Per stream: the start of the latest window settled, paid for or refused.
    #[serde(default)]
    settled: BTreeMap<String, i64>,
    /// Ledgers written before pools had clocks: the windows paid for by the stream the pool is
    /// named after. Read, never written; [`Ledger::upgrade`] turns them into that stream's clock.
    #[serde(default, skip_serializing)]
    charged: BTreeSet<i64>,
}

impl PoolBudget {
    /// Settles `stream`'s window that starts at `window_start_ms`: pays `cost_micro` for it,
    /// unless that takes the day over `cap_micro` (refused), or the window or a later one of the
    /// stream was settled before. Settling is in clock order: a window before the last settled
    /// one is never paid for.
    pub fn charge(
        &mut self,
        stream: &str,
        window_start_ms: i64,
        cost_micro: u64,
        cap_micro: u64,
    ) -> Result<(), Refusal> {
        if self
            .settled_through(stream)
            .is_some_and(|s| window_start_ms <= s)
        {
            return Err(Refusal::AlreadyCharged);
        }
        self.settled.insert(stream.to_owned(), window_start_ms);
        let day = window_start_ms.div_euclid(DAY_MS);
        let spent = self.spent_on(day);
        if spent.saturating_add(cost_micro) > cap_micro {
            return Err(Refusal::OverBudget {
                spent_micro: spent,
                cap_micro,
            });
        }
        self.spent.insert(day, spent + cost_micro);
        let oldest = day - DAYS_KEPT;
        self.spent.retain(|d, _| *d > oldest);
        Ok(())
    }

    /// The start of `stream`'s latest window settled, paid for or refused, if any.
    pub fn settled_through(&self, stream: &str) -> Option<i64> {
        self.settled.get(stream).copied()
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

/// Every budget pool's spending, by pool name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    pub streams: BTreeMap<String, PoolBudget>,
}

impl Ledger {
    pub fn pool(&mut self, name: &str) -> &mut PoolBudget {
        self.streams.entry(name.to_owned()).or_default()
    }

    /// Brings a ledger read from a file written before pools kept a clock per stream up to date:
    /// each pool's paid windows become the clock of the stream it is named after.
    pub fn upgrade(&mut self) {
        for (name, pool) in &mut self.streams {
            if let Some(last) = pool.charged.last().copied() {
                let clock = pool.settled.entry(name.clone()).or_insert(last);
                *clock = (*clock).max(last);
            }
            pool.charged.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = DAY_MS;

    #[test]
    fn the_release_over_the_cap_is_refused() {
        let mut b = PoolBudget::default();
        let t0 = 20_000 * DAY;
        assert_eq!(b.charge("s", t0, 400_000, 1_000_000), Ok(()));
        assert_eq!(b.charge("s", t0 + 60_000, 400_000, 1_000_000), Ok(()));
        assert_eq!(
            b.charge("s", t0 + 120_000, 400_000, 1_000_000),
            Err(Refusal::OverBudget {
                spent_micro: 800_000,
                cap_micro: 1_000_000
            })
        );
        // A smaller release still fits; the day is then exactly spent.
        assert_eq!(b.charge("s", t0 + 180_000, 200_000, 1_000_000), Ok(()));
        assert_eq!(b.spent_on_day_of(t0), 1_000_000);
        // The refused window stays refused.
        assert_eq!(
            b.charge("s", t0 + 120_000, 1, 1_000_000),
            Err(Refusal::AlreadyCharged)
        );
        // The next UTC day starts afresh.
        assert_eq!(b.charge("s", t0 + DAY, 400_000, 1_000_000), Ok(()));
        assert_eq!(b.spent_on_day_of(t0 + DAY), 400_000);
    }

    #[test]
    fn a_window_is_settled_once_per_stream_and_streams_of_a_pool_add_up() {
        let mut b = PoolBudget::default();
        let t0 = 20_000 * DAY + 3_600_000;
        assert_eq!(b.charge("a", t0, 1, 10), Ok(()));
        assert_eq!(b.charge("a", t0, 1, 10), Err(Refusal::AlreadyCharged));
        assert_eq!(
            b.charge("a", t0 - 60_000, 1, 10),
            Err(Refusal::AlreadyCharged)
        );
        // Another stream of the pool has its own clock, and spends from the same day.
        assert_eq!(b.charge("b", t0, 1, 10), Ok(()));
        assert_eq!(b.spent_on_day_of(t0), 2);
        assert_eq!(b.settled_through("a"), Some(t0));
        assert_eq!(b.settled_through("c"), None);
    }

    #[test]
    fn a_restored_ledger_keeps_what_was_spent() {
        let mut ledger = Ledger::default();
        let t0 = 20_000 * DAY;
        ledger
            .pool("footfall")
            .charge("footfall", t0, 900_000, 1_000_000)
            .unwrap();
        let json = serde_json::to_string(&ledger).unwrap();
        let mut restored: Ledger = serde_json::from_str(&json).unwrap();
        assert_eq!(restored, ledger);
        assert!(
            restored
                .pool("footfall")
                .charge("footfall", t0 + 60_000, 200_000, 1_000_000)
                .is_err()
        );
        assert_eq!(
            restored
                .pool("footfall")
                .charge("footfall", t0, 1, 1_000_000),
            Err(Refusal::AlreadyCharged)
        );
    }

    #[test]
    fn a_ledger_from_before_clocks_keeps_its_paid_windows_paid() {
        let t0 = 20_000 * DAY;
        let old = format!(
            r#"{{"streams":{{"footfall":{{"spent":{{"20000":500000}},"charged":[{t0},{}]}}}}}}"#,
            t0 + 60_000
        );
        let mut ledger: Ledger = serde_json::from_str(&old).unwrap();
        ledger.upgrade();
        let pool = ledger.pool("footfall");
        assert_eq!(pool.settled_through("footfall"), Some(t0 + 60_000));
        assert_eq!(
            pool.charge("footfall", t0 + 60_000, 1, 1_000_000),
            Err(Refusal::AlreadyCharged)
        );
        assert_eq!(pool.spent_on_day_of(t0), 500_000);
        assert!(!serde_json::to_string(&ledger).unwrap().contains("charged"));
    }

    #[test]
    fn old_days_are_forgotten() {
        let mut b = PoolBudget::default();
        for d in 0..30 {
            b.charge("s", d * DAY, 1, 10).unwrap();
        }
        assert_eq!(b.spent.len() as i64, DAYS_KEPT);
    }
}
