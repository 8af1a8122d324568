//! Windowed aggregation with a minimum group size (ISO/IEC 20889: aggregation, k-anonymity), and
//! optional differential-privacy noise.
//!
//! Records that come out of the privacy chain of an aggregated stream are not kept one by one:
//! they are absorbed into tumbling windows by event time, grouped by the stream's `group_by`
//! fields. When a window closes (the gateway's clock passes its end plus the allowed lateness),
//! each group becomes one record holding the group keys and the measures, unless it has fewer than
//! `min_group_size` (k) distinct contributors, in which case it is suppressed and counted. A
//! reading for a window that has closed is late: it is dropped and counted.
//!
//! With noise, each contributor's readings are bounded to `max_contributions` per window (the
//! rest are left out and counted), numeric values are clamped to their declared bounds and
//! rounded, and each released quantity gets integer discrete Laplace noise scaled to its
//! sensitivity, drawn from the caller's random source. The window's epsilon is paid to the
//! [`budget`](crate::budget) ledger first; a window the ledger refuses is not released.
//!
//! Groups are thresholded on their true number of contributors, so that no released group ever
//! has fewer than k; with noise, this makes the release (epsilon, delta)-differentially private
//! rather than pure epsilon, delta being the chance that a group of exactly k is released.
//!
//! The state ([`WindowState`]) is plain data, with a compact binary form ([`WindowState::encode`];
//! serde as well, for checkpoints of earlier builds), so the gateway can checkpoint it and a
//! restart can resume the open windows. The state also notes which groups changed since it was
//! last written whole, so that a checkpoint can write only those
//! ([`WindowState::encode_changes`], [`WindowState::apply_changes`]). Contributors and distinct
//! values are held as 64-bit digests, never as the values themselves.
//!
//! Contributors are usually pseudonyms, and a pseudonym changes when its key does (a new key
//! epoch, or a restart). The caller says so with [`WindowState::rekey`]: contributors are then
//! counted per key generation, and a group's contributor count is the largest count within one
//! generation, a lower bound of the true number that never exceeds it (the same device under two
//! keys is never counted twice). Under noise, a device may give `max_contributions` readings in
//! each generation, so the sensitivity of a window is multiplied by the number of key generations
//! that overlap the time readings for it can arrive, a figure that depends on the rekey times
//! only, never on the data.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::budget::{PoolBudget, Refusal};
use crate::noise::{RandomSource, discrete_laplace};
use crate::policy::aggregate::{Aggregation, MICRO, MeasureFn, Noise};
use crate::value::{Record, Text, Value};

mod wire;
pub use wire::Malformed;

/// What happened to a record offered to the windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Absorbed {
    /// Counted in its window's group.
    Counted,
    /// Its window has closed: dropped.
    Late,
    /// Its event time is more than a window ahead of the gateway's clock: dropped.
    Early,
    /// It lacks the contributor field: dropped.
    NoContributor,
    /// It lacks a group field, or holds a decimal number in one: dropped.
    NoGroupKey,
    /// Its contributor already gave `max_contributions` readings to this window: left out.
    Bounded,
    /// The open windows hold `max_state_entries`: dropped.
    Full,
}

/// A value of a group key. Decimal numbers are not group keys.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
enum KeyValue {
    Int(i64),
    Str(Text),
    Bool(bool),
}

impl From<KeyValue> for Value {
    fn from(k: KeyValue) -> Self {
        match k {
            KeyValue::Int(i) => Value::Int(i),
            KeyValue::Str(s) => Value::Str(s),
            KeyValue::Bool(b) => Value::Bool(b),
        }
    }
}

/// Running figures for one measure of one group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Acc {
    n: u64,
    sum: f64,
    min: f64,
    max: f64,
    distinct: BTreeSet<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Group {
    readings: u64,
    /// Contributor digests by key generation.
    contributors: BTreeSet<(u32, u64)>,
    measures: Vec<Acc>,
    #[serde(skip)]
    changed: Changed,
}

impl Group {
    /// Distinct contributors in the key generation that has most: a lower bound of the true
    /// number of distinct contributors.
    fn contributors(&self) -> u64 {
        let mut best = 0;
        let mut run = (u32::MAX, 0u64);
        for (generation, _) in &self.contributors {
            if *generation == run.0 {
                run.1 += 1;
            } else {
                run = (*generation, 1);
            }
            best = best.max(run.1);
        }
        best
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Window {
    /// Groups by key: a new group costs a tree insert, not a move of the groups after it (a
    /// window of a city's devices can hold hundreds of thousands).
    #[serde(with = "pairs")]
    groups: BTreeMap<Vec<KeyValue>, Group>,
    /// Readings counted per contributor digest and key generation (see [`generation_digest`]),
    /// kept only when contributions are bounded.
    contributions: BTreeMap<u64, u32>,
}

/// Groups serialised as a sequence of (key, group) pairs: their keys are not strings, which
/// formats such as JSON require of a map's keys.
mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    use super::{Group, KeyValue};

    pub fn serialize<S: Serializer>(
        groups: &BTreeMap<Vec<KeyValue>, Group>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(groups)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<Vec<KeyValue>, Group>, D::Error> {
        let pairs = Vec::<(Vec<KeyValue>, Group)>::deserialize(d)?;
        Ok(pairs.into_iter().collect())
    }
}

/// A contributor digest made distinct per key generation, for the contributions map.
fn generation_digest(generation: u32, contributor: u64) -> u64 {
    contributor ^ u64::from(generation).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// What a release produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Release {
    /// One record per released group, in window then key order.
    pub records: Vec<Record>,
    /// Windows closed.
    pub windows: u32,
    /// Groups suppressed for having fewer than k contributors.
    pub groups_suppressed: u32,
    /// Windows the budget ledger refused (their groups are not released).
    pub windows_refused: u32,
    /// Why the last refusal happened.
    pub last_refusal: Option<Refusal>,
    /// Micro-epsilon spent by this release.
    pub epsilon_spent_micro: u64,
    /// Time range `[first window start, last window end)` of the windows closed.
    pub range_ms: Option<(i64, i64)>,
}

/// What a stream with noise releases with: the ledger of its budget pool, its name there (its
/// clock), and a random source.
pub struct Noising<'a> {
    pub pool: &'a mut PoolBudget,
    pub stream: &'a str,
    pub random: &'a mut dyn RandomSource,
}

impl std::fmt::Debug for Noising<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Noising")
            .field("pool", &self.pool)
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

/// The open windows of one aggregated stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowState {
    windows: BTreeMap<i64, Window>,
    /// Windows that start before this have been closed: their readings are late.
    closed_before_ms: i64,
    /// Groups, contributors and distinct values held, bounded by `max_state_entries`.
    entries: u64,
    /// The current key generation: contributors of different generations are never matched.
    #[serde(default)]
    generation: u32,
    /// When the key generation changed (gateway clock, ms), while it can still matter to a window.
    #[serde(default)]
    rekeys_ms: Vec<i64>,
    /// What changed since the state was last written whole.
    #[serde(skip)]
    changes: Changes,
}

/// What changed in a state since [`WindowState::forget_changes`], so that a checkpoint can write
/// only that ([`WindowState::encode_changes`]): the contribution counts that changed (the groups
/// that changed are marked in place, [`Changed`]). Bookkeeping, not state: two states compare
/// equal whatever their changes.
#[derive(Debug, Clone, Default)]
struct Changes {
    /// Contribution counts that changed, by window start and digest.
    contributions: BTreeSet<(i64, u64)>,
}

impl PartialEq for Changes {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Marks a group that changed since the state was last written whole. Bookkeeping, not state:
/// it compares equal whatever its value.
#[derive(Debug, Clone, Copy, Default)]
struct Changed(bool);

impl PartialEq for Changed {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

fn digest(value: &Value) -> u64 {
    let mut h = Sha256::new();
    match value {
        Value::Int(i) => {
            h.update([0]);
            h.update(i.to_le_bytes());
        }
        Value::Float(f) => {
            h.update([1]);
            h.update(f.to_bits().to_le_bytes());
        }
        Value::Str(s) => {
            h.update([2]);
            h.update(s.as_bytes());
        }
        Value::Bool(b) => h.update([3, u8::from(*b)]),
    }
    let bytes = h.finalize();
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(word)
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) if f.is_finite() => Some(*f),
        _ => None,
    }
}

fn field<'a>(record: &'a Record, path: &str) -> Option<&'a Value> {
    record
        .fields
        .iter()
        .find(|(p, _)| p == path)
        .map(|(_, v)| v)
}

impl WindowState {
    /// Number of windows still open.
    pub fn open_windows(&self) -> usize {
        self.windows.len()
    }

    /// Groups, contributors and distinct values held.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Groups that changed since [`WindowState::forget_changes`], and groups held: what writing
    /// only the changes would write, against writing the whole state.
    pub fn changed_groups(&self) -> (usize, usize) {
        let groups = || self.windows.values().flat_map(|w| w.groups.values());
        let changed = groups().filter(|g| g.changed.0).count();
        (changed, groups().count())
    }

    /// Forgets what changed: call when the whole state was written ([`WindowState::encode`]).
    pub fn forget_changes(&mut self) {
        self.changes = Changes::default();
        for window in self.windows.values_mut() {
            for group in window.groups.values_mut() {
                group.changed = Changed(false);
            }
        }
    }

    /// The open groups as (window start, group key values, distinct contributors as counted for
    /// the minimum group size), for tools that explain a policy.
    pub fn groups(&self) -> impl Iterator<Item = (i64, Vec<Value>, usize)> + '_ {
        self.windows.iter().flat_map(|(start, w)| {
            w.groups.iter().map(move |(key, g)| {
                (
                    *start,
                    key.iter().cloned().map(Value::from).collect(),
                    usize::try_from(g.contributors()).unwrap_or(usize::MAX),
                )
            })
        })
    }

    /// Starts a new key generation at `now_ms`: from now on the contributor field holds different
    /// pseudonyms for the same devices (a new key epoch, or a restart with a fresh key).
    pub fn rekey(&mut self, now_ms: i64) {
        self.generation = self.generation.wrapping_add(1);
        self.rekeys_ms.push(now_ms);
    }

    /// Key generations that overlap the arrival time of readings for the window starting at
    /// `start`: from a window before its start (earlier readings are refused as early) to its end
    /// plus the allowed lateness.
    fn generations(&self, spec: &Aggregation, start: i64) -> u64 {
        let (window_ms, lateness_ms) = (spec.window_ms(), spec.lateness_ms());
        let from = start.saturating_sub(window_ms);
        let to = start.saturating_add(window_ms).saturating_add(lateness_ms);
        1 + self
            .rekeys_ms
            .iter()
            .filter(|t| (from..=to).contains(*t))
            .count() as u64
    }

    /// Adds a filtered record to its window. `now_ms` is the gateway's clock.
    pub fn absorb(&mut self, spec: &Aggregation, record: &Record, now_ms: i64) -> Absorbed {
        let (window_ms, lateness_ms) = (spec.window_ms(), spec.lateness_ms());
        let start = spec.window_start(record.event_time_ms);
        if start < self.closed_before_ms
            || start.saturating_add(window_ms).saturating_add(lateness_ms) <= now_ms
        {
            return Absorbed::Late;
        }
        if start > now_ms.saturating_add(window_ms) {
            return Absorbed::Early;
        }
        let Some(contributor) = field(record, &spec.contributor).map(digest) else {
            return Absorbed::NoContributor;
        };
        let mut key = Vec::with_capacity(spec.group_by.len());
        for path in &spec.group_by {
            key.push(match field(record, path) {
                Some(Value::Int(i)) => KeyValue::Int(*i),
                Some(Value::Str(s)) => KeyValue::Str(s.clone()),
                Some(Value::Bool(b)) => KeyValue::Bool(*b),
                Some(Value::Float(_)) | None => return Absorbed::NoGroupKey,
            });
        }
        if self.entries >= spec.max_state_entries {
            return Absorbed::Full;
        }
        let generation = self.generation;
        let window = self.windows.entry(start).or_default();
        if let Some(noise) = &spec.noise {
            let given = window
                .contributions
                .entry(generation_digest(generation, contributor))
                .or_insert(0);
            if *given >= noise.max_contributions {
                return Absorbed::Bounded;
            }
            if *given == 0 {
                self.entries += 1;
            }
            *given += 1;
            self.changes
                .contributions
                .insert((start, generation_digest(generation, contributor)));
        }
        let group = window.groups.entry(key).or_insert_with(|| {
            self.entries += 1;
            Group {
                measures: vec![Acc::default(); spec.measures.len()],
                ..Group::default()
            }
        });
        group.readings += 1;
        group.changed = Changed(true);
        if group.contributors.insert((generation, contributor)) {
            self.entries += 1;
        }
        for (measure, acc) in spec.measures.iter().zip(&mut group.measures) {
            let Some(value) = measure.field.as_deref().and_then(|p| field(record, p)) else {
                continue;
            };
            match measure.func {
                MeasureFn::Count | MeasureFn::Contributors => {}
                MeasureFn::Distinct => {
                    if acc.distinct.insert(digest(value)) {
                        self.entries += 1;
                    }
                }
                MeasureFn::Sum | MeasureFn::Mean | MeasureFn::Min | MeasureFn::Max => {
                    let Some(mut x) = number(value) else { continue };
                    if let Some((lo, hi)) = measure.bounds {
                        x = x.clamp(lo, hi);
                    }
                    if spec.noise.is_some() {
                        x = x.round();
                    }
                    if acc.n == 0 {
                        (acc.min, acc.max) = (x, x);
                    } else {
                        acc.min = acc.min.min(x);
                        acc.max = acc.max.max(x);
                    }
                    acc.n += 1;
                    acc.sum += x;
                }
            }
        }
        Absorbed::Counted
    }

    /// Closes every window whose end plus the allowed lateness is at or before `now_ms`.
    ///
    /// Streams with noise need `noising`: without it they release nothing. Each window on the
    /// stream's clock is paid for as it closes, held readings or not; a window the ledger refuses
    /// releases nothing.
    pub fn release(
        &mut self,
        spec: &Aggregation,
        now_ms: i64,
        noising: Option<Noising<'_>>,
    ) -> Release {
        let (window_ms, lateness_ms) = (spec.window_ms(), spec.lateness_ms());
        let mut out = Release::default();
        let (budget, mut source) = match noising {
            Some(n) => (Some((n.pool, n.stream)), Some(n.random)),
            None => (None, None),
        };
        let last_closable =
            spec.window_start(now_ms.saturating_sub(lateness_ms).saturating_sub(window_ms));
        // With noise, the windows paid for now (or refused), by start.
        let mut paid = BTreeMap::new();
        if let (Some(noise), Some((pool, stream))) = (&spec.noise, budget) {
            paid = self.pay_on_the_clock(spec, noise, pool, stream, last_closable, &mut out);
        }
        while let Some(entry) = self.windows.first_entry() {
            let start = *entry.key();
            let end = start.saturating_add(window_ms);
            if end.saturating_add(lateness_ms) > now_ms {
                break;
            }
            let window = entry.remove();
            self.entries = self.entries.saturating_sub(window_entries(&window));
            self.closed_before_ms = self.closed_before_ms.max(end);
            out.windows += 1;
            let first = out.range_ms.map_or(start, |(s, _)| s);
            out.range_ms = Some((
                first.min(start),
                end.max(out.range_ms.map_or(end, |(_, e)| e)),
            ));
            let generations = self.generations(spec, start);
            if spec.noise.is_some() && (paid.get(&start) != Some(&true) || source.is_none()) {
                // Noise is required but the window was not paid for, or there is no source.
                out.groups_suppressed += window.groups.len() as u32;
                continue;
            }
            let rng = if spec.noise.is_some() {
                source.as_deref_mut()
            } else {
                None
            };
            release_groups(spec, start, window, generations, rng, &mut out);
        }
        if out.windows > 0 {
            // A closed window is gone from the state: what changed in it is no longer a change.
            let open = &self.windows;
            self.changes
                .contributions
                .retain(|(s, _)| open.contains_key(s));
        }
        // Nothing can arrive any more for windows that ended before now minus the lateness.
        let horizon = now_ms.saturating_sub(lateness_ms);
        self.closed_before_ms = self.closed_before_ms.max(spec.window_start(horizon));
        // Rekeys before the arrival range of every window still to come no longer matter.
        let oldest_relevant = self.closed_before_ms.saturating_sub(window_ms);
        self.rekeys_ms.retain(|t| *t >= oldest_relevant);
        out
    }

    /// Settles every window of the stream's clock from the one after the last settled through
    /// `last_closable` (at most [`MAX_WINDOWS_PAID`] of them, the latest): whether each was paid.
    fn pay_on_the_clock(
        &self,
        spec: &Aggregation,
        noise: &Noise,
        pool: &mut PoolBudget,
        stream: &str,
        last_closable: i64,
        out: &mut Release,
    ) -> BTreeMap<i64, bool> {
        let window_ms = spec.window_ms();
        let oldest_held = self.windows.keys().next().copied().unwrap_or(last_closable);
        let mut start = pool
            .settled_through(stream)
            .map_or(oldest_held.min(last_closable), |c| {
                c.saturating_add(window_ms)
            })
            .max(last_closable.saturating_sub(window_ms.saturating_mul(MAX_WINDOWS_PAID - 1)));
        let mut paid = BTreeMap::new();
        while start <= last_closable {
            match pool.charge(stream, start, noise.epsilon_micro, noise.pool_budget_micro) {
                Ok(()) => {
                    out.epsilon_spent_micro += noise.epsilon_micro;
                    paid.insert(start, true);
                }
                Err(refusal) => {
                    if refusal != Refusal::AlreadyCharged {
                        out.windows_refused += 1;
                        out.last_refusal = Some(refusal);
                    }
                    paid.insert(start, false);
                }
            }
            let end = start.saturating_add(window_ms);
            let first = out.range_ms.map_or(start, |(s, _)| s);
            out.range_ms = Some((first, end));
            start = end;
        }
        paid
    }
}

/// Most windows paid for in one release: after a long stop, only the latest are (older ones
/// hold no readings of this process).
const MAX_WINDOWS_PAID: i64 = 10_000;

/// Releases the groups of a closed window: those with at least k contributors and, with noise
/// (`rng`), whose noisy number of contributors reaches the release threshold ([`Selection`]).
fn release_groups<R: RandomSource + ?Sized>(
    spec: &Aggregation,
    start: i64,
    window: Window,
    generations: u64,
    mut rng: Option<&mut R>,
    out: &mut Release,
) {
    let k = u64::from(spec.min_group_size);
    for (key, group) in window.groups {
        let contributors = match (&spec.noise, rng.as_deref_mut()) {
            (Some(noise), Some(rng)) => {
                let selection = Selection::new(spec, noise, generations);
                let mut rng = rng;
                let noisy = i64::try_from(group.contributors())
                    .unwrap_or(i64::MAX)
                    .saturating_add(discrete_laplace(
                        &mut rng,
                        selection.sensitivity,
                        selection.epsilon_micro,
                    ));
                if !selection.releases(group.contributors(), noisy) {
                    out.groups_suppressed += 1;
                    continue;
                }
                noisy
            }
            _ => {
                if group.contributors() < k {
                    out.groups_suppressed += 1;
                    continue;
                }
                i64::try_from(group.contributors()).unwrap_or(i64::MAX)
            }
        };
        out.records.push(group_record(
            spec,
            start,
            key,
            &group,
            contributors,
            generations,
            rng.as_deref_mut(),
        ));
    }
}

/// How a window's groups are selected under noise: a group is released when it has at least k
/// contributors and its noisy number of contributors, drawn with the selection's sensitivity and
/// epsilon share, reaches the release threshold.
///
/// The exact test keeps the output invariant (no released group has fewer than k contributors);
/// the threshold keeps the decision differentially private across it: a group of exactly k
/// contributors, which one contributor less would suppress for certain, is released with
/// probability at most the per-group delta. Above k, one contributor more or less changes the
/// probability of release by a factor of at most `e^(epsilon / sensitivity)`.
#[derive(Debug, Clone, Copy)]
pub struct Selection {
    /// Groups one contributor can be in: `max_contributions` per key generation.
    pub sensitivity: u64,
    /// The selection's share of the window's epsilon, in millionths.
    pub epsilon_micro: u64,
    /// The stream's delta, for all the groups one contributor can be in.
    pub delta: f64,
    /// The least number of contributors of a released group.
    pub k: u64,
}

impl Selection {
    pub fn new(spec: &Aggregation, noise: &Noise, generations: u64) -> Self {
        Self {
            sensitivity: (u64::from(noise.max_contributions) * generations).max(1),
            epsilon_micro: epsilon_share(spec, noise),
            delta: noise.delta,
            k: u64::from(spec.min_group_size).max(1),
        }
    }

    /// The delta of one group: one contributor can be in `sensitivity` groups, so each gets
    /// `1 - (1 - delta)^(1 / sensitivity)`, as in Google's differential-privacy library's
    /// partition selection.
    pub fn group_delta(&self) -> f64 {
        -((-self.delta).ln_1p() / self.sensitivity as f64).exp_m1()
    }

    /// `alpha = exp(-epsilon / sensitivity)`: P(Z = z) is proportional to `alpha^|z|`.
    fn alpha(&self) -> f64 {
        (-(self.epsilon_micro as f64 / MICRO) / self.sensitivity as f64).exp()
    }

    /// The release threshold on the noisy count: `k + z` for the least `z >= 0` with
    /// P(Z >= z) at most the group's delta, so that a group of k contributors is released with
    /// at most that probability.
    pub fn threshold(&self) -> i64 {
        let alpha = self.alpha();
        // P(Z >= z) = alpha^z / (1 + alpha) for z >= 1.
        let z = ((self.group_delta() * (1.0 + alpha)).ln() / alpha.ln())
            .ceil()
            .max(0.0);
        let k = i64::try_from(self.k).unwrap_or(i64::MAX);
        if z.is_finite() {
            k.saturating_add(z as i64)
        } else {
            i64::MAX
        }
    }

    /// Whether a group of `contributors` whose noisy count is `noisy` is released.
    pub fn releases(&self, contributors: u64, noisy: i64) -> bool {
        contributors >= self.k && noisy >= self.threshold()
    }

    /// The probability that a group of `n` contributors is released: 0 below k, else
    /// P(n + Z >= threshold) for discrete Laplace `Z`. For statements and tests.
    pub fn release_probability(&self, n: u64) -> f64 {
        if n < self.k {
            return 0.0;
        }
        let alpha = self.alpha();
        let z = self.threshold() - i64::try_from(n).unwrap_or(i64::MAX);
        if z <= 0 {
            // P(Z >= z) = 1 - P(Z <= z - 1) = 1 - alpha^(1 - z) / (1 + alpha).
            1.0 - alpha.powi(i32::try_from(1 - z).unwrap_or(i32::MAX)) / (1.0 + alpha)
        } else {
            alpha.powi(i32::try_from(z).unwrap_or(i32::MAX)) / (1.0 + alpha)
        }
    }
}

/// Each noisy quantity's share of the window's epsilon, in millionths: the selection (whose noisy
/// count is also the `contributors` measure) and every other measure's quantities share it
/// equally.
fn epsilon_share(spec: &Aggregation, noise: &Noise) -> u64 {
    let quantities: u32 = 1 + spec
        .measures
        .iter()
        .filter(|m| m.func != MeasureFn::Contributors)
        .filter_map(|m| m.func.noisy_quantities())
        .sum::<u32>();
    (noise.epsilon_micro / u64::from(quantities.max(1))).max(1)
}

fn window_entries(window: &Window) -> u64 {
    let groups: u64 = window
        .groups
        .values()
        .map(|g| {
            1 + g.contributors.len() as u64
                + g.measures
                    .iter()
                    .map(|a| a.distinct.len() as u64)
                    .sum::<u64>()
        })
        .sum();
    groups + window.contributions.len() as u64
}

/// The record for one released group, noised when `rng` is given. Each contributor may have given
/// `max_contributions` readings in each of `generations` key generations. `contributors` is the
/// group's number of contributors as released: exact without noise, the selection's noisy count
/// with it (the group was released on it, so it is not drawn again).
fn group_record<R: RandomSource + ?Sized>(
    spec: &Aggregation,
    start: i64,
    key: Vec<KeyValue>,
    group: &Group,
    contributors: i64,
    generations: u64,
    mut rng: Option<&mut R>,
) -> Record {
    let mut fields: Vec<(Text, Value)> = spec
        .group_by
        .iter()
        .map(|path| Text::from(path.as_str()))
        .zip(key.into_iter().map(Value::from))
        .collect();
    // Under noise: each quantity gets an equal share of the window's epsilon.
    let share = spec.noise.as_ref().map(|n| {
        let m = u64::from(n.max_contributions) * generations;
        (epsilon_share(spec, n), m)
    });
    let mut noisy = |exact: u64, sensitivity: u64| -> i64 {
        let exact = i64::try_from(exact).unwrap_or(i64::MAX);
        match (rng.as_deref_mut(), share) {
            (Some(mut rng), Some((eps, m))) => {
                exact.saturating_add(discrete_laplace(&mut rng, (sensitivity * m).max(1), eps))
            }
            _ => exact,
        }
    };
    for (measure, acc) in spec.measures.iter().zip(&group.measures) {
        let bound = measure
            .bounds
            .map_or(1, |(lo, hi)| lo.abs().max(hi.abs()).ceil() as u64);
        let value = match measure.func {
            MeasureFn::Count => Value::Int(noisy(group.readings, 1).max(0)),
            MeasureFn::Contributors => Value::Int(contributors.max(0)),
            MeasureFn::Distinct => Value::Int(noisy(acc.distinct.len() as u64, 1).max(0)),
            MeasureFn::Sum if share.is_some() => {
                // The exact sum of rounded, clamped values is an integer.
                let exact = acc.sum as i64;
                let noise = noisy(0, bound);
                Value::Int(exact.saturating_add(noise))
            }
            MeasureFn::Sum => Value::Float(acc.sum),
            MeasureFn::Mean if share.is_some() => {
                let sum = acc.sum as i64 + noisy(0, bound);
                let n = noisy(acc.n, 1).max(1);
                let mean = sum as f64 / n as f64;
                let (lo, hi) = measure.bounds.unwrap_or((f64::MIN, f64::MAX));
                Value::Float(mean.clamp(lo, hi))
            }
            MeasureFn::Mean if acc.n > 0 => Value::Float(acc.sum / acc.n as f64),
            MeasureFn::Min if acc.n > 0 => Value::Float(acc.min),
            MeasureFn::Max if acc.n > 0 => Value::Float(acc.max),
            // No value of the field in this group.
            MeasureFn::Mean | MeasureFn::Min | MeasureFn::Max => continue,
        };
        fields.push((Text::from(measure.name.as_str()), value));
    }
    Record {
        event_time_ms: start,
        fields,
    }
}

#[cfg(test)]
mod tests;
