//! The open windows of aggregated streams: their counters, their checkpoints in the outbox
//! (a whole copy of the state, and what changed since), resuming them after a restart, and
//! releasing the groups of the windows that close.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hubgate_exporters::catalogue;
use hubgate_privacy::window::{Noising, Release, WindowState};
use hubgate_privacy::{Record, invariants};
use metrics::{Counter, Gauge};

use super::Pipeline;
use crate::record::encode_body;
use crate::store::{Bodies, Store};
use crate::telemetry::clock::now_ms;

/// Counters of an aggregated stream: only what its releases show anyway. What the windows take
/// in (readings counted, late or bounded, groups suppressed below k, windows that held any
/// reading, the state's size) is never published: one reading of a group that k or the noise
/// suppresses would move such a counter, and tell that the group exists.
#[derive(Debug)]
pub(super) struct WindowCounters {
    pub(super) released: Counter,
    pub(super) refusals: Counter,
    pub(super) spent_today: Gauge,
}

impl WindowCounters {
    pub(super) fn new(stream: &str) -> Self {
        let s = stream.to_owned();
        Self {
            released: metrics::counter!(catalogue::AGGREGATE_GROUPS, "stream" => s.clone(), "outcome" => "released"),
            refusals: metrics::counter!(catalogue::PRIVACY_BUDGET_REFUSALS, "stream" => s.clone()),
            spent_today: metrics::gauge!(catalogue::PRIVACY_BUDGET_SPENT_TODAY, "stream" => s),
        }
    }
}

/// The open windows of an aggregated stream.
#[derive(Debug)]
pub(super) struct Windows {
    pub(super) state: WindowState,
    pub(super) counters: WindowCounters,
    /// Changed since the last checkpoint.
    pub(super) dirty: bool,
    /// Must be checkpointed in the next commit: it absorbed a reading that will be acknowledged
    /// (QoS 1), or released or rekeyed windows. Otherwise a changed state is checkpointed at most
    /// every [`WINDOW_CHECKPOINT_EVERY_MS`].
    pub(super) must_checkpoint: bool,
    /// When it was last checkpointed (gateway clock, ms).
    pub(super) checkpointed_ms: i64,
    /// Numbers the whole states written: the changes written after one name it.
    pub(super) whole: u64,
    /// A whole state was written by this process: later checkpoints may write only changes.
    pub(super) wrote_whole: bool,
    /// Identifies the aggregation spec the state was built under.
    pub(super) spec: u32,
    /// The stream's key generation ([`PseudonymKeys::generation`]) the windows last absorbed under.
    pub(super) key_generation: Option<u64>,
}

impl Windows {
    /// Whether the next commit must checkpoint this state.
    pub(super) fn checkpoint_due(&self, now_ms: i64) -> bool {
        self.dirty
            && (self.must_checkpoint || now_ms - self.checkpointed_ms >= WINDOW_CHECKPOINT_EVERY_MS)
    }
}

/// A window checkpoint as stored in the outbox under [`checkpoint_name`]: [`CHECKPOINT_MAGIC`],
/// the spec's fingerprint (`u32`, little-endian), the number of this whole state (`u64`), then
/// the state's binary form ([`WindowState::encode`]).
///
/// Between two whole states, a checkpoint writes only what changed since the last one
/// ([`WindowState::encode_changes`]) under [`changes_name`]: [`CHANGES_MAGIC`], the fingerprint,
/// the number of the whole state they apply to, then the changes. A whole state is written with
/// empty changes beside it, in the same commit.
#[derive(Debug, serde::Deserialize)]
pub(super) struct Checkpoint {
    pub(super) spec: u32,
    #[serde(skip)]
    pub(super) whole: u64,
    pub(super) state: WindowState,
}

/// Marks a binary window checkpoint. Checkpoints written before it are JSON, and are still read.
pub(super) const CHECKPOINT_MAGIC: &[u8; 4] = b"HGW\x01";
/// Marks the changes written since a whole window checkpoint.
pub(super) const CHANGES_MAGIC: &[u8; 4] = b"HGC\x01";

/// A whole state is written instead of its changes once a quarter of its groups changed: what
/// a checkpoint writes stays a fraction of the state, and the changes never outgrow it.
pub(super) const WHOLE_WHEN_CHANGED: usize = 4;

impl Checkpoint {
    pub(super) fn encode(spec: u32, whole: u64, state: &WindowState) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(64 + 16 * usize::try_from(state.entries()).unwrap_or(0));
        bytes.extend_from_slice(CHECKPOINT_MAGIC);
        bytes.extend_from_slice(&spec.to_le_bytes());
        bytes.extend_from_slice(&whole.to_le_bytes());
        state.encode(&mut bytes);
        bytes
    }

    pub(super) fn encode_changes(spec: u32, whole: u64, state: &WindowState) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(CHANGES_MAGIC);
        bytes.extend_from_slice(&spec.to_le_bytes());
        bytes.extend_from_slice(&whole.to_le_bytes());
        state.encode_changes(&mut bytes);
        bytes
    }

    pub(super) fn decode(bytes: &[u8]) -> anyhow::Result<Self> {
        let Some(rest) = bytes.strip_prefix(CHECKPOINT_MAGIC) else {
            return Ok(serde_json::from_slice(bytes)?);
        };
        let (spec, whole, state) = split_numbers(rest)?;
        Ok(Self {
            spec,
            whole,
            state: WindowState::decode(state)?,
        })
    }

    /// Applies the changes stored beside this whole state, if they are its own, and returns how
    /// many groups they changed.
    pub(super) fn apply_changes(&mut self, bytes: &[u8]) -> anyhow::Result<usize> {
        if bytes.is_empty() {
            return Ok(0);
        }
        let rest = bytes
            .strip_prefix(CHANGES_MAGIC)
            .ok_or_else(|| anyhow::anyhow!("the changes are not of a known form"))?;
        let (spec, whole, changes) = split_numbers(rest)?;
        if (spec, whole) != (self.spec, self.whole) {
            anyhow::bail!("the changes are not those of the whole state beside them");
        }
        Ok(self.state.apply_changes(changes)?)
    }
}

/// Splits the fingerprint and the whole state's number from a checkpoint's body.
pub(super) fn split_numbers(bytes: &[u8]) -> anyhow::Result<(u32, u64, &[u8])> {
    let short = || anyhow::anyhow!("the checkpoint is cut short");
    let (spec, rest) = bytes.split_first_chunk::<4>().ok_or_else(short)?;
    let (whole, rest) = rest.split_first_chunk::<8>().ok_or_else(short)?;
    Ok((u32::from_le_bytes(*spec), u64::from_le_bytes(*whole), rest))
}

pub(super) fn checkpoint_name(stream: &str) -> String {
    format!("window/{stream}")
}

pub(super) fn changes_name(stream: &str) -> String {
    format!("window/{stream}/changes")
}

/// Opens the windows of an aggregated stream from its checkpoint.
pub(super) fn resume_windows(
    store: &Store,
    stream: &hubgate_privacy::policy::StreamPolicy,
    spec: &hubgate_privacy::policy::aggregate::Aggregation,
) -> anyhow::Result<Windows> {
    let fingerprint = crc32fast::hash(format!("{spec:?}").as_bytes());
    let name = checkpoint_name(&stream.name);
    let mut state = WindowState::default();
    let mut whole = 0;
    if let Some(bytes) = store.checkpoint(&name)? {
        let damaged = |e: anyhow::Error| {
            anyhow::anyhow!(
                "the window checkpoint of stream '{}' is damaged: {e}",
                stream.name
            )
        };
        let mut saved = Checkpoint::decode(&bytes).map_err(damaged)?;
        whole = saved.whole;
        if saved.spec == fingerprint {
            let changed_groups = match store.checkpoint(&changes_name(&stream.name))? {
                Some(changes) => saved.apply_changes(&changes).map_err(damaged)?,
                None => 0,
            };
            tracing::info!(stream = %stream.name, windows = saved.state.open_windows(), changed_groups, "resumed open windows from the checkpoint");
            state = saved.state;
            if stream.needs_key() {
                // This process pseudonymises with keys of its own: the same devices get new
                // pseudonyms, which must not count as new contributors.
                state.rekey(now_ms());
            }
        } else {
            tracing::warn!(stream = %stream.name, windows = saved.state.open_windows(), "the aggregation changed since the checkpoint: its open windows are discarded");
        }
    }
    let counters = WindowCounters::new(&stream.name);
    Ok(Windows {
        state,
        counters,
        dirty: false,
        must_checkpoint: false,
        checkpointed_ms: now_ms(),
        whole,
        wrote_whole: false,
        spec: fingerprint,
        key_generation: None,
    })
}

/// Longest a window state that absorbed only QoS 0 readings goes without a checkpoint: what a
/// crash can lose of them.
pub(super) const WINDOW_CHECKPOINT_EVERY_MS: i64 = 1_000;

impl Pipeline {
    /// Stages the checkpoints of the window states that are due (see [`Pipeline::take_turn`]).
    pub(super) fn stage_window_checkpoints(&mut self, now_ms: i64) {
        for (stream, windows) in self.policy.streams().iter().zip(&mut self.windows) {
            let Some(w) = windows.as_mut().filter(|w| w.checkpoint_due(now_ms)) else {
                continue;
            };
            let (changed, groups) = w.state.changed_groups();
            if w.wrote_whole && changed * WHOLE_WHEN_CHANGED < groups {
                let bytes = Checkpoint::encode_changes(w.spec, w.whole, &w.state);
                self.pending.checkpoint(changes_name(&stream.name), bytes);
            } else {
                w.whole += 1;
                let bytes = Checkpoint::encode(w.spec, w.whole, &w.state);
                self.pending
                    .checkpoint(checkpoint_name(&stream.name), bytes);
                self.pending
                    .checkpoint(changes_name(&stream.name), Vec::new());
                w.state.forget_changes();
                w.wrote_whole = true;
            }
            w.dirty = false;
            w.must_checkpoint = false;
            w.checkpointed_ms = now_ms;
        }
    }

    /// Closes the windows that are due and keeps the groups they release.
    pub fn release(&mut self, now_ms: i64) {
        let policy = Arc::clone(&self.policy);
        for (index, stream) in policy.streams().iter().enumerate() {
            let (Some(spec), Some(windows)) = (&stream.aggregate, self.windows[index].as_mut())
            else {
                continue;
            };
            let noising = match (&spec.noise, self.budget.as_mut()) {
                (Some(noise), Some(file)) => Some(Noising {
                    pool: file.ledger.pool(&noise.budget_pool),
                    stream: &stream.name,
                    random: &mut self.rng,
                }),
                _ => None,
            };
            let mut release = windows.state.release(spec, now_ms, noising);
            windows.dirty |= release.windows > 0;
            windows.must_checkpoint |= release.windows > 0;
            // With noise, windows are paid for on the clock, held readings or not.
            let paid_or_refused = release.epsilon_spent_micro > 0 || release.windows_refused > 0;
            if release.windows == 0 && !paid_or_refused {
                continue;
            }
            if !self.pay_for(index, &stream.name, &release, now_ms) {
                release.records.clear();
            }
            self.count_release(index, &release);
            if !release.records.is_empty() {
                self.stage_released(index, &stream.name, &release.records, now_ms);
            }
        }
    }

    /// Writes the privacy budget a release spent to disk before anything it paid for is kept,
    /// and audits the spending and any refusal. False when the ledger cannot be written: then
    /// the window's groups are not released.
    fn pay_for(&mut self, index: usize, stream: &str, release: &Release, now_ms: i64) -> bool {
        let mut paid = true;
        let pool = self.policy.streams()[index]
            .aggregate
            .as_ref()
            .and_then(|a| a.noise.as_ref())
            .map_or_else(|| stream.to_owned(), |n| n.budget_pool.clone());
        let settled = release.epsilon_spent_micro > 0 || release.windows_refused > 0;
        if settled
            && let Some(file) = &mut self.budget
            && let Some(w) = &self.windows[index]
        {
            let c = &w.counters;
            c.spent_today.set(
                file.ledger.pool(&pool).spent_on_day_of(now_ms) as f64
                    / hubgate_privacy::policy::aggregate::MICRO,
            );
            if let Err(err) = file.save() {
                tracing::error!(stream = %stream, %err, "cannot write the privacy-budget ledger: the window's groups are not released");
                c.refusals.increment(1);
                self.stats.streams[index]
                    .windows_refused
                    .fetch_add(1, Ordering::Relaxed);
                paid = false;
            } else if release.epsilon_spent_micro > 0 {
                let (from_ms, to_ms) = release.range_ms.unwrap_or_default();
                self.audit.record(
                    now_ms,
                    "privacy_budget_spent",
                    serde_json::json!({
                        "stream": stream,
                        "budget_pool": pool,
                        "epsilon_micro": release.epsilon_spent_micro,
                        "spent_today_micro": file.ledger.pool(&pool).spent_on_day_of(now_ms),
                        "windows_from_ms": from_ms,
                        "windows_to_ms": to_ms,
                    }),
                );
            }
        }
        if let Some(refusal) = &release.last_refusal {
            tracing::warn!(stream = %stream, windows = release.windows_refused, %refusal, "window release refused");
            self.audit.record(
                now_ms,
                "privacy_budget_refused",
                serde_json::json!({
                    "stream": stream,
                    "windows": release.windows_refused,
                    "reason": refusal.to_string(),
                }),
            );
        }
        paid
    }

    /// Counts the windows a release closed and what became of their groups.
    fn count_release(&self, index: usize, release: &Release) {
        let Some(w) = &self.windows[index] else {
            return;
        };
        let (c, stats) = (&w.counters, &self.stats.streams[index]);
        let released = release.records.len() as u64;
        c.refusals.increment(u64::from(release.windows_refused));
        c.released.increment(released);
        stats
            .groups_suppressed
            .fetch_add(u64::from(release.groups_suppressed), Ordering::Relaxed);
        stats
            .windows_refused
            .fetch_add(u64::from(release.windows_refused), Ordering::Relaxed);
        stats.groups_released.fetch_add(released, Ordering::Relaxed);
    }

    /// Stages the records of the groups a release let out: those that satisfy the stream's
    /// output invariants (a group record that does not is a fault, dropped and counted).
    fn stage_released(&mut self, index: usize, stream: &str, records: &[Record], now_ms: i64) {
        let (mut bytes, mut field_bytes) = (0, 0);
        let mut bodies = Bodies::default();
        let policy = &self.policy.streams()[index];
        for r in records {
            if let Err(broken) = invariants::check(policy, r, now_ms) {
                tracing::error!(stream, %broken, "a released group breaks the stream's output invariants: dropped");
                self.counters[index].dropped_invariant.increment(1);
                continue;
            }
            bodies.push_with(|buf| {
                let (b, f) = encode_body(stream, &self.policy_hash, r, buf);
                (bytes, field_bytes) = (bytes + b as u64, field_bytes + f as u64);
            });
        }
        let n = bodies.len() as u64;
        self.store
            .stage_encoded(&mut self.pending, index, &bodies, now_ms);
        self.counters[index].kept.increment(n);
        let stats = &self.stats.streams[index];
        stats.records_kept.fetch_add(n, Ordering::Relaxed);
        stats.bytes_kept.fetch_add(bytes, Ordering::Relaxed);
        stats
            .field_bytes_kept
            .fetch_add(field_bytes, Ordering::Relaxed);
    }
}
