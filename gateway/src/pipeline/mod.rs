//! The pipeline between MQTT and the store: route, decode, privacy chain, append, acknowledge.
//!
//! One task runs it. It takes messages in batches from the bounded queue the MQTT connection
//! fills, and for each message:
//!
//! 1. routes the topic to the streams whose filters match it; a topic no stream declares is
//!    dropped and counted (fail closed);
//! 2. decodes the payload in the stream's format; a payload that does not decode is dropped and
//!    counted per stream;
//! 3. runs the stream's privacy chain ([`hubgate_privacy::chain`]) with the stream's current
//!    pseudonymisation key (see [`crate::pipeline::pseudonym_keys`]); image and video payloads are dropped undecoded;
//! 4. stages the filtered records in the store, one append per stream per batch; for an
//!    aggregated stream, absorbs them into the stream's open windows instead
//!    ([`hubgate_privacy::window`]), and stages the groups each closing window releases;
//! 5. commits the turn to the outbox: the records, and a checkpoint of every aggregated stream's
//!    windows that changed, in one atomic, durable write ([`crate::store::Store::commit`]), on a
//!    thread of its own ([`Committer`]); the messages that come meanwhile wait in the queue and
//!    are the next turn, taken all at once when the commit is done;
//! 6. only then acknowledges the messages to the broker (QoS 1), so a message is never acked
//!    before its record (or the window state that absorbed it) is on disk. A commit that fails
//!    (a disk error, or a full outbox with `on_full = "stop_acking"`) is retried with backoff, and
//!    no further message is taken until it succeeds.
//!
//! Commits start at least `store.commit_interval` apart, and under heavy load further apart, up
//! to `store.commit_interval_max` ([`Spacing`]). The first message after a quiet spell is
//! committed at once; those that come within the interval join the next commit.
//!
//! Windows close on the gateway's clock: after every batch, and at least twice a second when no
//! message comes. A stream with differential-privacy noise pays for each release in the
//! privacy-budget ledger, which is written to disk before the released records are kept (see
//! [`crate::pipeline::budget`]).
//!
//! Open windows are checkpointed in the outbox under `window/<stream>` (a whole copy of the state)
//! and `window/<stream>/changes` (what changed since that copy), and a restart resumes them. A
//! checkpoint written under a different aggregation spec (the policy changed) is not resumed: its
//! windows are discarded, with a warning.
//!
//! Acknowledgements are handed to the MQTT connection without ever waiting on it
//! ([`crate::sources::mqtt::Acker`]): the MQTT task may itself be waiting for room in this task's queue,
//! and waiting on each other would deadlock. The acks of a turn are written to the broker together.
//!
//! Metrics (counted per batch): `hubgate_mqtt_messages_received_total`,
//! `hubgate_mqtt_received_bytes_total`, `hubgate_unrouted_messages_total`,
//! `hubgate_stream_messages_total{stream}`, `hubgate_messages_dropped_total{stream, reason}`,
//! `hubgate_fields_dropped_total{stream, stage}`, `hubgate_identifiers_suppressed_total{stream}`,
//! `hubgate_fields_pseudonymised_total{stream}`, `hubgate_locations_generalised_total{stream, outcome}`,
//! `hubgate_records_kept_total{stream}`; for aggregated streams
//! `hubgate_aggregate_readings_total{stream, outcome}`, `hubgate_aggregate_groups_total{stream, outcome}`,
//! `hubgate_aggregate_windows_closed_total{stream}`, `hubgate_aggregate_state_entries{stream}`,
//! `hubgate_privacy_budget_refusals_total{stream}` and
//! `hubgate_privacy_budget_spent_today_epsilon{stream}`.

pub mod budget;
pub mod pseudonym_keys;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::record::{encode_body, from_proto_value, to_proto_value};
use crate::sources::mqtt::{Acker, Inbound};
use crate::sources::ratelimit::{DeviceLimit, Limit, Limiter};
use crate::telemetry::clock::now_ms;
use crate::telemetry::stats::Stats;
use hubgate_exporters::catalogue;
use hubgate_privacy::window::{Absorbed, WindowState};
use hubgate_privacy::{Context, Policy, chain, identifiers};
use hubgate_proto::v1;
use metrics::{Counter, Gauge};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::decode::{self, Decoder};
use crate::governance::audit::AuditLog;
use crate::pipeline::budget::{BudgetFile, OsRandom};
use crate::pipeline::pseudonym_keys::KeyManager;
use crate::sources::push::PushJob;
use crate::store::{Bodies, CommitError, Pending, Store};

/// Most messages taken from the queue at once (a turn may take several such batches).
const BATCH: usize = 512;

/// Per-batch tallies for one stream, flushed to [`StreamStats`] and metrics once per batch.
#[derive(Debug, Default)]
struct Tally {
    messages: u64,
    bytes_in: u64,
    dropped_decode: u64,
    dropped_media: u64,
    dropped_bad_time: u64,
    fields_dropped: u64,
    identifiers_suppressed: u64,
    pseudonymised: u64,
    locations_generalised: u64,
    locations_invalid: u64,
    bytes_kept: u64,
    field_bytes_kept: u64,
    /// Per [`Absorbed`] outcome, indexed by [`absorbed_index`].
    absorbed: [u64; ABSORBED.len()],
    /// The records kept, encoded (see [`crate::store::Bodies`]).
    records: Bodies,
}

/// Every outcome of offering a record to the windows, with its metric label.
const ABSORBED: [(Absorbed, &str); 7] = [
    (Absorbed::Counted, "counted"),
    (Absorbed::Late, "late"),
    (Absorbed::Early, "early"),
    (Absorbed::NoContributor, "no_contributor"),
    (Absorbed::NoGroupKey, "no_group_key"),
    (Absorbed::Bounded, "bounded"),
    (Absorbed::Full, "state_full"),
];

fn absorbed_index(a: Absorbed) -> usize {
    ABSORBED.iter().position(|(x, _)| *x == a).unwrap_or(0)
}

/// Counters of an aggregated stream.
#[derive(Debug)]
struct WindowCounters {
    absorbed: Vec<Counter>,
    released: Counter,
    suppressed: Counter,
    windows: Counter,
    refusals: Counter,
    entries: Gauge,
    spent_today: Gauge,
}

impl WindowCounters {
    fn new(stream: &str) -> Self {
        let s = stream.to_owned();
        Self {
            absorbed: ABSORBED
                .iter()
                .map(|(_, label)| metrics::counter!(catalogue::AGGREGATE_READINGS, "stream" => s.clone(), "outcome" => *label))
                .collect(),
            released: metrics::counter!(catalogue::AGGREGATE_GROUPS, "stream" => s.clone(), "outcome" => "released"),
            suppressed: metrics::counter!(catalogue::AGGREGATE_GROUPS, "stream" => s.clone(), "outcome" => "suppressed_min_group_size"),
            windows: metrics::counter!(catalogue::AGGREGATE_WINDOWS_CLOSED, "stream" => s.clone()),
            refusals: metrics::counter!(catalogue::PRIVACY_BUDGET_REFUSALS, "stream" => s.clone()),
            entries: metrics::gauge!(catalogue::AGGREGATE_STATE_ENTRIES, "stream" => s.clone()),
            spent_today: metrics::gauge!(catalogue::PRIVACY_BUDGET_SPENT_TODAY, "stream" => s),
        }
    }
}

/// The open windows of an aggregated stream.
#[derive(Debug)]
struct Windows {
    state: WindowState,
    counters: WindowCounters,
    /// Changed since the last checkpoint.
    dirty: bool,
    /// Must be checkpointed in the next commit: it absorbed a reading that will be acknowledged
    /// (QoS 1), or released or rekeyed windows. Otherwise a changed state is checkpointed at most
    /// every [`WINDOW_CHECKPOINT_EVERY_MS`].
    must_checkpoint: bool,
    /// When it was last checkpointed (gateway clock, ms).
    checkpointed_ms: i64,
    /// Numbers the whole states written: the changes written after one name it.
    whole: u64,
    /// A whole state was written by this process: later checkpoints may write only changes.
    wrote_whole: bool,
    /// Identifies the aggregation spec the state was built under.
    spec: u32,
    /// The stream's key generation ([`KeyManager::generation`]) the windows last absorbed under.
    key_generation: Option<u64>,
}

impl Windows {
    /// Whether the next commit must checkpoint this state.
    fn checkpoint_due(&self, now_ms: i64) -> bool {
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
struct Checkpoint {
    spec: u32,
    #[serde(skip)]
    whole: u64,
    state: WindowState,
}

/// Marks a binary window checkpoint. Checkpoints written before it are JSON, and are still read.
const CHECKPOINT_MAGIC: &[u8; 4] = b"HGW\x01";
/// Marks the changes written since a whole window checkpoint.
const CHANGES_MAGIC: &[u8; 4] = b"HGC\x01";

/// A whole state is written instead of its changes once a quarter of its groups changed: what
/// a checkpoint writes stays a fraction of the state, and the changes never outgrow it.
const WHOLE_WHEN_CHANGED: usize = 4;

impl Checkpoint {
    fn encode(spec: u32, whole: u64, state: &WindowState) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(64 + 16 * usize::try_from(state.entries()).unwrap_or(0));
        bytes.extend_from_slice(CHECKPOINT_MAGIC);
        bytes.extend_from_slice(&spec.to_le_bytes());
        bytes.extend_from_slice(&whole.to_le_bytes());
        state.encode(&mut bytes);
        bytes
    }

    fn encode_changes(spec: u32, whole: u64, state: &WindowState) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(CHANGES_MAGIC);
        bytes.extend_from_slice(&spec.to_le_bytes());
        bytes.extend_from_slice(&whole.to_le_bytes());
        state.encode_changes(&mut bytes);
        bytes
    }

    fn decode(bytes: &[u8]) -> anyhow::Result<Self> {
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
    fn apply_changes(&mut self, bytes: &[u8]) -> anyhow::Result<usize> {
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
fn split_numbers(bytes: &[u8]) -> anyhow::Result<(u32, u64, &[u8])> {
    let short = || anyhow::anyhow!("the checkpoint is cut short");
    let (spec, rest) = bytes.split_first_chunk::<4>().ok_or_else(short)?;
    let (whole, rest) = rest.split_first_chunk::<8>().ok_or_else(short)?;
    Ok((u32::from_le_bytes(*spec), u64::from_le_bytes(*whole), rest))
}

fn checkpoint_name(stream: &str) -> String {
    format!("window/{stream}")
}

fn changes_name(stream: &str) -> String {
    format!("window/{stream}/changes")
}

/// Opens the windows of an aggregated stream from its checkpoint.
fn resume_windows(
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
    counters.entries.set(state.entries() as f64);
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

#[derive(Debug)]
struct StreamCounters {
    messages: Counter,
    dropped_decode: Counter,
    dropped_media: Counter,
    dropped_bad_time: Counter,
    fields_dropped: Counter,
    identifiers_suppressed: Counter,
    pseudonymised: Counter,
    locations_generalised: Counter,
    locations_invalid: Counter,
    kept: Counter,
}

impl StreamCounters {
    fn new(stream: &str) -> Self {
        let s = stream.to_owned();
        Self {
            messages: metrics::counter!(catalogue::STREAM_MESSAGES, "stream" => s.clone()),
            dropped_decode: metrics::counter!(catalogue::MESSAGES_DROPPED, "stream" => s.clone(), "reason" => "decode"),
            dropped_media: metrics::counter!(catalogue::MESSAGES_DROPPED, "stream" => s.clone(), "reason" => "media"),
            dropped_bad_time: metrics::counter!(catalogue::MESSAGES_DROPPED, "stream" => s.clone(), "reason" => "bad_time"),
            fields_dropped: metrics::counter!(catalogue::FIELDS_DROPPED, "stream" => s.clone(), "stage" => "allow_list"),
            identifiers_suppressed: metrics::counter!(catalogue::IDENTIFIERS_SUPPRESSED, "stream" => s.clone()),
            pseudonymised: metrics::counter!(catalogue::FIELDS_PSEUDONYMISED, "stream" => s.clone()),
            locations_generalised: metrics::counter!(catalogue::LOCATIONS_GENERALISED, "stream" => s.clone(), "outcome" => "cell"),
            locations_invalid: metrics::counter!(catalogue::LOCATIONS_GENERALISED, "stream" => s.clone(), "outcome" => "invalid"),
            kept: metrics::counter!(catalogue::RECORDS_KEPT, "stream" => s),
        }
    }
}

/// Route, decode, filter and keep. Holds no I/O of its own besides the store.
#[derive(Debug)]
pub struct Pipeline {
    policy: Arc<Policy>,
    policy_hash: String,
    store: Arc<Store>,
    stats: Arc<Stats>,
    counters: Vec<StreamCounters>,
    received: Counter,
    received_bytes: Counter,
    unrouted: Counter,
    tallies: Vec<Tally>,
    keys: KeyManager,
    /// Per stream, in policy order: the open windows of aggregated streams.
    windows: Vec<Option<Windows>>,
    /// The privacy-budget ledger, when a stream adds noise.
    budget: Option<BudgetFile>,
    rng: OsRandom,
    audit: Arc<AuditLog>,
    /// What this turn stages, until it is committed.
    pending: Pending,
    commit_failures: [Counter; 2],
    /// Highest origin sequence kept, by de-duplication checkpoint name (see [`crate::sources::push`]).
    push_marks: std::collections::HashMap<String, u64>,
    /// The turn being taken stages a push mark: the cache must not forget it before it is
    /// committed.
    marks_in_turn: bool,
    /// Per-topic rate limits, when configured (see [`crate::sources::ratelimit`]).
    topic_limiter: Option<Limiter>,
    /// Per-device rate limits and the payload field that names the device, when configured.
    device_limiter: Option<(String, Limiter)>,
    /// Messages over a rate limit: by topic, by device.
    rate_limited: [Counter; 2],
    /// Payload decoders, with what Sparkplug B births declared.
    decoder: Decoder,
    /// The streams that take the message being routed (kept to reuse its allocation).
    routes: Vec<usize>,
}

impl Pipeline {
    /// A pipeline for `policy`, resuming aggregated streams' windows from their checkpoints.
    /// `budget` must be given when a stream adds noise; without it, such a stream releases
    /// nothing.
    pub fn new(
        policy: Arc<Policy>,
        store: Arc<Store>,
        stats: Arc<Stats>,
        budget: Option<BudgetFile>,
        audit: Arc<AuditLog>,
    ) -> anyhow::Result<Self> {
        let counters = policy
            .streams()
            .iter()
            .map(|s| StreamCounters::new(&s.name))
            .collect();
        let tallies = policy.streams().iter().map(|_| Tally::default()).collect();
        let policy_for_keys = Arc::clone(&policy);
        let mut windows = Vec::new();
        for stream in policy.streams() {
            windows.push(match &stream.aggregate {
                Some(spec) => Some(resume_windows(&store, stream, spec)?),
                None => None,
            });
        }
        Ok(Self {
            decoder: Decoder::default(),
            routes: Vec::new(),
            topic_limiter: None,
            device_limiter: None,
            rate_limited: ["topic", "device"]
                .map(|by| metrics::counter!(catalogue::MQTT_RATE_LIMITED, "by" => by)),
            policy_hash: policy.hash_hex(),
            policy,
            store,
            stats,
            counters,
            received: metrics::counter!(catalogue::MQTT_MESSAGES_RECEIVED),
            received_bytes: metrics::counter!(catalogue::MQTT_RECEIVED_BYTES),
            unrouted: metrics::counter!(catalogue::UNROUTED_MESSAGES),
            tallies,
            keys: KeyManager::new(&policy_for_keys, Some(Arc::clone(&audit))),
            audit,
            windows,
            budget,
            rng: OsRandom::new(),
            pending: Pending::default(),
            commit_failures: ["error", "full"].map(
                |reason| metrics::counter!(catalogue::OUTBOX_COMMIT_FAILURES, "reason" => reason),
            ),
            push_marks: std::collections::HashMap::new(),
            marks_in_turn: false,
        })
    }

    /// Stages the records another gateway forwarded (see [`crate::sources::push`]): those not kept
    /// before, with the fields this gateway's policy admits. Returns the origin sequence to
    /// acknowledge once the turn is committed.
    pub fn accept_push(&mut self, job: &PushJob, now_ms: i64) -> anyhow::Result<u64> {
        let stream = &self.policy.streams()[job.stream];
        let mark_name =
            crate::sources::push::mark_name(&job.origin, &job.incarnation, &stream.name);
        let mark = match self.push_marks.get(&mark_name) {
            Some(mark) => *mark,
            None => self
                .store
                .checkpoint(&mark_name)?
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map_or(0, u64::from_be_bytes),
        };
        let (mut last, mut duplicates, mut dropped, mut identifiers) = (mark, 0u64, 0u64, 0u64);
        let mut records = Vec::new();
        for r in &job.records {
            if r.sequence <= last {
                duplicates += 1;
                continue;
            }
            last = r.sequence;
            let fields = r
                .fields
                .iter()
                .filter_map(|(p, v)| Some((p.as_str().into(), from_proto_value(v.clone())?)))
                .collect();
            let admitted = chain::admit_forwarded(stream, fields);
            dropped += u64::from(admitted.fields_dropped);
            identifiers += u64::from(admitted.identifiers_suppressed);
            records.push(v1::Record {
                stream: stream.name.clone(),
                sequence: 0,
                event_time: r.event_time,
                policy_hash: r.policy_hash.clone(),
                fields: admitted
                    .fields
                    .into_iter()
                    .map(|(p, v)| (p.into_string(), to_proto_value(v)))
                    .collect(),
                origin: job.origin.clone(),
                origin_sequence: r.sequence,
            });
        }
        let kept = records.len() as u64;
        if kept > 0 {
            self.store
                .stage(&mut self.pending, job.stream, records, now_ms);
            self.pending
                .checkpoint(mark_name.clone(), last.to_be_bytes().to_vec());
            self.push_marks.insert(mark_name, last);
            self.marks_in_turn = true;
        }
        let name = stream.name.clone();
        metrics::counter!(catalogue::PUSH_RECORDS, "stream" => name.clone(), "outcome" => "kept")
            .increment(kept);
        metrics::counter!(catalogue::PUSH_RECORDS, "stream" => name.clone(), "outcome" => "duplicate")
            .increment(duplicates);
        let c = &self.counters[job.stream];
        c.kept.increment(kept);
        c.identifiers_suppressed.increment(identifiers);
        metrics::counter!(catalogue::FIELDS_DROPPED, "stream" => name, "stage" => "forwarded")
            .increment(dropped);
        let s = &self.stats.streams[job.stream];
        s.records_kept.fetch_add(kept, Ordering::Relaxed);
        s.identifiers_suppressed
            .fetch_add(identifiers, Ordering::Relaxed);
        Ok(last)
    }

    /// Has the next commit checkpoint every changed window, due or not (before a stop).
    pub fn checkpoint_all_windows(&mut self) {
        for w in self.windows.iter_mut().flatten() {
            w.must_checkpoint |= w.dirty;
        }
    }

    /// Commits what this turn staged: records and the window checkpoints that are due,
    /// atomically and durably. On an error everything stays staged for the next attempt.
    ///
    /// The same as [`Pipeline::take_turn`], [`Store::commit`] and [`Pipeline::committed`] in a
    /// row; [`run`] does the second on a thread of its own.
    pub fn commit(&mut self, now_ms: i64) -> Result<(), CommitError> {
        let marks = self.marks_in_turn;
        let mut turn = self.take_turn(now_ms);
        let result = self.store.commit(&mut turn, now_ms);
        match &result {
            Ok(()) => self.committed(),
            Err(err) => {
                self.commit_failures[failure_reason(err)].increment(1);
                self.pending = turn;
                self.marks_in_turn = marks;
            }
        }
        result
    }

    /// Takes what this turn staged, with the window checkpoints that are due, for one atomic
    /// and durable commit ([`Store::commit`]); what is staged from now on belongs to the next.
    ///
    /// A window state is checkpointed in the commit after it absorbed a reading that will be
    /// acknowledged (QoS 1), or released or rekeyed windows: nothing acknowledged is lost, and
    /// released groups are never released again. Readings at QoS 0 are never acknowledged: the
    /// state that absorbed only those is checkpointed at most once every
    /// [`WINDOW_CHECKPOINT_EVERY_MS`].
    ///
    /// A checkpoint writes what changed since the last whole state, until a quarter of the
    /// groups changed ([`WHOLE_WHEN_CHANGED`]); then the whole state again. The first checkpoint
    /// of a process is a whole state.
    pub fn take_turn(&mut self, now_ms: i64) -> Pending {
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
        self.marks_in_turn = false;
        std::mem::take(&mut self.pending)
    }

    /// A turn taken with [`Pipeline::take_turn`] was committed.
    pub fn committed(&mut self) {
        // When no turn still to be committed holds a mark, the cache can start over from the
        // store: bounded however many origins and incarnations push.
        if !self.marks_in_turn && self.push_marks.len() >= MAX_CACHED_PUSH_MARKS {
            self.push_marks.clear();
        }
    }

    /// Whether the next turn has anything to write: staged records or checkpoints, or window
    /// checkpoints that are due.
    pub fn wants_commit(&self, now_ms: i64) -> bool {
        !self.pending.is_empty()
            || self
                .windows
                .iter()
                .flatten()
                .any(|w| w.checkpoint_due(now_ms))
    }

    /// Whether any stream aggregates (then [`Pipeline::release`] must run on a timer).
    pub fn aggregates(&self) -> bool {
        self.windows.iter().any(Option::is_some)
    }

    /// Closes the windows that are due and keeps the groups they release.
    pub fn release(&mut self, now_ms: i64) {
        let policy = Arc::clone(&self.policy);
        for (index, stream) in policy.streams().iter().enumerate() {
            let (Some(spec), Some(windows)) = (&stream.aggregate, self.windows[index].as_mut())
            else {
                continue;
            };
            let dp = match (&spec.noise, self.budget.as_mut()) {
                (Some(_), Some(file)) => Some((
                    file.ledger.stream(&stream.name),
                    &mut self.rng as &mut dyn hubgate_privacy::noise::RandomSource,
                )),
                _ => None,
            };
            let release = windows.state.release(spec, now_ms, dp);
            windows.dirty |= release.windows > 0;
            windows.must_checkpoint |= release.windows > 0;
            let c = &windows.counters;
            c.entries.set(windows.state.entries() as f64);
            if release.windows == 0 {
                continue;
            }
            let stats = &self.stats.streams[index];
            let mut records = release.records;
            if release.epsilon_spent_micro > 0
                && let Some(file) = &mut self.budget
            {
                c.spent_today.set(
                    file.ledger.stream(&stream.name).spent_on_day_of(now_ms) as f64
                        / hubgate_privacy::policy::aggregate::MICRO,
                );
                // The spending is on disk before anything it paid for is kept.
                if let Err(err) = file.save() {
                    tracing::error!(stream = %stream.name, %err, "cannot write the privacy-budget ledger: the window's groups are not released");
                    c.refusals.increment(1);
                    stats.windows_refused.fetch_add(1, Ordering::Relaxed);
                    records.clear();
                } else {
                    let (from_ms, to_ms) = release.range_ms.unwrap_or_default();
                    self.audit.record(
                        now_ms,
                        "privacy_budget_spent",
                        serde_json::json!({
                            "stream": stream.name,
                            "epsilon_micro": release.epsilon_spent_micro,
                            "spent_today_micro": file.ledger.stream(&stream.name).spent_on_day_of(now_ms),
                            "windows_from_ms": from_ms,
                            "windows_to_ms": to_ms,
                        }),
                    );
                }
            }
            if let Some(refusal) = release.last_refusal {
                tracing::warn!(stream = %stream.name, windows = release.windows_refused, %refusal, "window release refused");
                self.audit.record(
                    now_ms,
                    "privacy_budget_refused",
                    serde_json::json!({
                        "stream": stream.name,
                        "windows": release.windows_refused,
                        "reason": refusal.to_string(),
                    }),
                );
            }
            c.windows.increment(u64::from(release.windows));
            c.suppressed.increment(u64::from(release.groups_suppressed));
            c.refusals.increment(u64::from(release.windows_refused));
            c.released.increment(records.len() as u64);
            stats
                .groups_suppressed
                .fetch_add(u64::from(release.groups_suppressed), Ordering::Relaxed);
            stats
                .windows_refused
                .fetch_add(u64::from(release.windows_refused), Ordering::Relaxed);
            stats
                .groups_released
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            if records.is_empty() {
                continue;
            }
            let (mut bytes, mut field_bytes) = (0, 0);
            let mut bodies = Bodies::default();
            for r in &records {
                bodies.push_with(|buf| {
                    let (b, f) = encode_body(&stream.name, &self.policy_hash, r, buf);
                    (bytes, field_bytes) = (bytes + b as u64, field_bytes + f as u64);
                });
            }
            let n = bodies.len() as u64;
            self.store
                .stage_encoded(&mut self.pending, index, &bodies, now_ms);
            self.counters[index].kept.increment(n);
            stats.records_kept.fetch_add(n, Ordering::Relaxed);
            stats.bytes_kept.fetch_add(bytes, Ordering::Relaxed);
            stats
                .field_bytes_kept
                .fetch_add(field_bytes, Ordering::Relaxed);
        }
    }

    /// Limits each MQTT topic to `limit`; messages over it are dropped before decoding.
    pub fn limit_topics(&mut self, limit: Limit) {
        self.topic_limiter = Some(Limiter::new(limit));
    }

    /// Limits each device, named by a payload field, to its limit; messages over it are dropped
    /// after decoding, before any stream sees them. Readings without the field are not held.
    pub fn limit_devices(&mut self, device: &DeviceLimit) {
        self.device_limiter = Some((device.field.clone(), Limiter::new(device.limit())));
    }

    /// Processes a batch of messages and stages their records (see [`Pipeline::commit`]).
    /// Oversized messages were dropped on arrival, and messages over their topic's or device's
    /// rate limit are dropped here: they count as received, and are only acknowledged.
    pub fn process(&mut self, batch: &[Inbound], now_ms: i64) {
        let mut unrouted = 0u64;
        let mut bytes = 0u64;
        let mut limited = [0u64; 2];
        for inbound in batch {
            bytes += inbound.bytes as u64;
            if inbound.oversized {
                continue;
            }
            if let Some(limiter) = &mut self.topic_limiter
                && !limiter.allow(inbound.publish.topic.as_bytes(), now_ms)
            {
                limited[0] += 1;
                continue;
            }
            match self.process_one(&inbound.publish, now_ms) {
                Routed::Yes => {}
                Routed::Nowhere => unrouted += 1,
                Routed::DeviceOverLimit => limited[1] += 1,
            }
        }
        for (counter, n) in self.rate_limited.iter().zip(limited) {
            counter.increment(n);
        }
        let n = batch.len() as u64;
        self.received.increment(n);
        self.received_bytes.increment(bytes);
        self.unrouted.increment(unrouted);
        self.stats.received.fetch_add(n, Ordering::Relaxed);
        self.stats
            .received_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        self.stats.unrouted.fetch_add(unrouted, Ordering::Relaxed);
        for (index, tally) in self.tallies.iter_mut().enumerate() {
            if tally.messages == 0 {
                continue;
            }
            if let Some(windows) = &self.windows[index] {
                let s = &self.stats.streams[index];
                for (i, n) in tally.absorbed.iter().enumerate() {
                    windows.counters.absorbed[i].increment(*n);
                }
                let counted = tally.absorbed[absorbed_index(Absorbed::Counted)];
                let late = tally.absorbed[absorbed_index(Absorbed::Late)];
                let all: u64 = tally.absorbed.iter().sum();
                s.readings_aggregated.fetch_add(counted, Ordering::Relaxed);
                s.dropped_late.fetch_add(late, Ordering::Relaxed);
                s.dropped_aggregate
                    .fetch_add(all - counted - late, Ordering::Relaxed);
            }
            let mut records = std::mem::take(&mut tally.records);
            let kept = records.len() as u64;
            if kept > 0 {
                self.store
                    .stage_encoded(&mut self.pending, index, &records, now_ms);
                records.clear();
            }
            let (c, s) = (&self.counters[index], &self.stats.streams[index]);
            // The same figures go to the metrics and to the stats `hubgate demo` reads.
            for (counter, stat, n) in [
                (&c.messages, &s.messages, tally.messages),
                (&c.dropped_decode, &s.dropped_decode, tally.dropped_decode),
                (&c.dropped_media, &s.dropped_media, tally.dropped_media),
                (
                    &c.dropped_bad_time,
                    &s.dropped_bad_time,
                    tally.dropped_bad_time,
                ),
                (&c.fields_dropped, &s.fields_dropped, tally.fields_dropped),
                (
                    &c.identifiers_suppressed,
                    &s.identifiers_suppressed,
                    tally.identifiers_suppressed,
                ),
                (&c.pseudonymised, &s.pseudonymised, tally.pseudonymised),
                (
                    &c.locations_generalised,
                    &s.locations_generalised,
                    tally.locations_generalised,
                ),
                (&c.kept, &s.records_kept, kept),
            ] {
                counter.increment(n);
                stat.fetch_add(n, Ordering::Relaxed);
            }
            c.locations_invalid.increment(tally.locations_invalid);
            s.bytes_in.fetch_add(tally.bytes_in, Ordering::Relaxed);
            s.bytes_kept.fetch_add(tally.bytes_kept, Ordering::Relaxed);
            s.field_bytes_kept
                .fetch_add(tally.field_bytes_kept, Ordering::Relaxed);
            *tally = Tally {
                records,
                ..Tally::default()
            };
        }
        if self.aggregates() {
            self.release(now_ms);
        }
    }

    /// Routes one message to the streams that take its topic.
    fn process_one(&mut self, publish: &rumqttc::Publish, now_ms: i64) -> Routed {
        let mut routed = false;
        // Decoded once per format, on first use, and shared by every stream of that format.
        let mut decoded = decode::Once::default();
        let media = identifiers::is_media_payload(&publish.payload);
        if let Some((field, limiter)) = &mut self.device_limiter
            && !media
            && let Some(first) = self.policy.route(&publish.topic).next()
        {
            let format = self.policy.streams()[first].format;
            if let Ok(decoded) = decoded.get(
                &mut self.decoder,
                format,
                &publish.topic,
                &publish.payload,
                now_ms,
            ) && let Some(reading) = decoded.readings().first()
                && let Some((_, id)) = reading.fields.iter().find(|(name, _)| name == field)
                && !limiter.allow_device(&publish.topic, id, now_ms)
            {
                return Routed::DeviceOverLimit;
            }
        }
        let mut routes = std::mem::take(&mut self.routes);
        routes.clear();
        routes.extend(self.policy.route(&publish.topic));
        for (k, &index) in routes.iter().enumerate() {
            routed = true;
            let stream = &self.policy.streams()[index];
            // The last stream of a format to take the message takes its readings by value.
            let last = !routes[k + 1..]
                .iter()
                .any(|&later| self.policy.streams()[later].format == stream.format);
            let tally = &mut self.tallies[index];
            tally.messages += 1;
            tally.bytes_in += publish.payload.len() as u64;
            if media {
                // Images and video are never decoded, kept or sent.
                tally.dropped_media += 1;
                continue;
            }
            let Ok(readings) = decoded.readings(
                &mut self.decoder,
                stream.format,
                &publish.topic,
                &publish.payload,
                now_ms,
                last,
            ) else {
                tally.dropped_decode += 1;
                continue;
            };
            for reading in readings {
                let ctx = Context {
                    received_ms: now_ms,
                    key: self.keys.key(index, now_ms),
                };
                match chain::apply(stream, reading, &ctx) {
                    Ok(outcome) => {
                        tally.fields_dropped += u64::from(outcome.fields_dropped);
                        tally.identifiers_suppressed += u64::from(outcome.identifiers_suppressed);
                        tally.pseudonymised += u64::from(outcome.pseudonymised);
                        tally.locations_generalised += u64::from(outcome.locations_generalised);
                        tally.locations_invalid += u64::from(outcome.locations_invalid);
                        if let (Some(spec), Some(windows)) =
                            (&stream.aggregate, self.windows[index].as_mut())
                        {
                            let generation = self.keys.generation(index);
                            if windows.key_generation.is_some_and(|g| g != generation) {
                                windows.state.rekey(now_ms);
                                windows.must_checkpoint = true;
                            }
                            windows.key_generation = Some(generation);
                            let absorbed = windows.state.absorb(spec, &outcome.record, now_ms);
                            windows.dirty = true;
                            windows.must_checkpoint |= publish.qos != rumqttc::QoS::AtMostOnce;
                            tally.absorbed[absorbed_index(absorbed)] += 1;
                            continue;
                        }
                        let mut sizes = (0, 0);
                        tally.records.push_with(|buf| {
                            sizes =
                                encode_body(&stream.name, &self.policy_hash, &outcome.record, buf);
                        });
                        tally.bytes_kept += sizes.0 as u64;
                        tally.field_bytes_kept += sizes.1 as u64;
                    }
                    Err(chain::Rejection::BadTime) => tally.dropped_bad_time += 1,
                }
            }
        }
        self.routes = routes;
        if routed { Routed::Yes } else { Routed::Nowhere }
    }
}

/// Longest a window state that absorbed only QoS 0 readings goes without a checkpoint: what a
/// crash can lose of them.
const WINDOW_CHECKPOINT_EVERY_MS: i64 = 1_000;

/// De-duplication marks of pushing origins held in memory, at most; the rest are read from their
/// checkpoints in the store when next needed.
const MAX_CACHED_PUSH_MARKS: usize = 4096;

/// Where one message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Routed {
    /// To the streams that take its topic.
    Yes,
    /// Nowhere: no stream takes its topic.
    Nowhere,
    /// Nowhere: its device is over `mqtt.device_rate_limit`.
    DeviceOverLimit,
}

/// Most messages in one turn. Once a turn holds this many, or a quarter of `store.max_bytes` of
/// records, it takes no more: the rest wait in the queue for the next (when the queue is full, the
/// MQTT connection stops reading).
const TURN_MAX: usize = 8 * BATCH;

/// What a turn owes once it is durable: the packet ids of its QoS 1 messages in the order they
/// arrived, and the replies to the forwarded records it kept.
#[derive(Debug, Default)]
struct Owed {
    messages: usize,
    acks: Vec<u16>,
    replies: Vec<(tokio::sync::oneshot::Sender<u64>, u64)>,
}

impl Owed {
    fn is_empty(&self) -> bool {
        self.messages == 0 && self.replies.is_empty()
    }

    /// Takes in `batch`'s messages (QoS 0 messages need no acknowledgement).
    fn take(&mut self, batch: &mut Vec<Inbound>) {
        self.messages += batch.len();
        // The gateway subscribes at QoS 1, so the broker sends nothing at QoS 2.
        self.acks.extend(
            batch
                .drain(..)
                .filter(|i| i.publish.qos != rumqttc::QoS::AtMostOnce)
                .map(|i| i.publish.pkid),
        );
    }

    /// The turn is durable: acknowledge its messages and answer its forwarders.
    fn pay(self, acker: &mut Acker) {
        acker.ack(self.acks);
        for (reply, ack) in self.replies {
            let _ = reply.send(ack);
        }
    }
}

/// A turn handed to the committer, and where it says whether the turn was committed.
#[derive(Debug)]
struct Job {
    pending: Pending,
    owed: Owed,
    done: tokio::sync::oneshot::Sender<Option<Owed>>,
}

/// Writes turns to the store on a thread of its own, one at a time and in order. The pipeline
/// task is free meanwhile: it serves forwarded records and window ticks, and the MQTT connection
/// fills the queue, without either waiting on the disk.
#[derive(Debug)]
struct Committer {
    jobs: std::sync::mpsc::Sender<Job>,
    /// Closed once the thread has let go of the store.
    stopped: tokio::sync::oneshot::Receiver<()>,
}

impl Committer {
    fn start(store: Arc<Store>, failures: [Counter; 2], shutdown: CancellationToken) -> Self {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let (stopping, stopped) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("hubgate-commit".into())
            .spawn(move || {
                while let Ok(mut job) = queue.recv() {
                    let committed =
                        commit_until_done(&store, &mut job.pending, &failures, &shutdown);
                    let _ = job.done.send(committed.then_some(job.owed));
                }
                // The pipeline stopped. Its store, and with it the outbox, must be closed before
                // another start opens them (a policy reload).
                drop(store);
                drop(stopping);
            })
            .expect("the commit thread starts");
        Self { jobs, stopped }
    }

    /// Stops the thread once it has written what it was given, and waits until it has let go
    /// of the store.
    async fn stop(self) {
        drop(self.jobs);
        let _ = self.stopped.await;
    }

    /// Hands a turn over; the receiver answers with what it owes once it is committed, or
    /// `None` when the gateway stopped first.
    fn commit(&self, pending: Pending, owed: Owed) -> tokio::sync::oneshot::Receiver<Option<Owed>> {
        let (done, answer) = tokio::sync::oneshot::channel();
        // The thread only stops when this sender is dropped; if it ever died, `answer` is
        // closed and the pipeline stops without acknowledging.
        let _ = self.jobs.send(Job {
            pending,
            owed,
            done,
        });
        answer
    }
}

/// How far apart commits start (`store.commit_interval` and `store.commit_interval_max`).
#[derive(Debug, Clone, Copy)]
pub struct Spacing {
    pub interval: Duration,
    pub max: Duration,
}

/// Messages a second taken in for each millisecond between commits, under load.
const MESSAGES_PER_SECOND_PER_MS: f64 = 20_000.0;

impl Spacing {
    /// The time between the starts of two commits when messages come at `rate` a second: 1 ms
    /// per 20,000 a second, within `interval` and `max` (never less than `interval`). A commit
    /// costs a fixed amount of CPU and disk writes besides its records' share; under heavy load
    /// fewer, larger commits leave more of the machine to the readings themselves, and under
    /// light load each reading waits the least.
    pub fn at(&self, rate: f64) -> Duration {
        let wanted = Duration::from_secs_f64((rate / MESSAGES_PER_SECOND_PER_MS).max(0.0) / 1e3);
        wanted.min(self.max).max(self.interval)
    }
}

/// Runs the pipeline until the queue closes or `shutdown`. `pushed` brings records other gateways
/// forward (see [`crate::sources::push`]). Fails only if the commit thread dies.
///
/// Turns are committed on a thread of their own ([`Committer`]); the messages that come while a
/// commit is written wait in the queue, and are the next turn. Commits start at least
/// [`Spacing::at`] the rate of messages apart: what comes sooner waits for the next.
pub async fn run(
    mut pipeline: Pipeline,
    queue: mpsc::Receiver<Inbound>,
    pushed: mpsc::Receiver<PushJob>,
    acker: Acker,
    spacing: Spacing,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let committer = Committer::start(
        Arc::clone(&pipeline.store),
        pipeline.commit_failures.clone(),
        shutdown.clone(),
    );
    let result = take_turns(
        &mut pipeline,
        &committer,
        queue,
        pushed,
        acker,
        spacing,
        &shutdown,
    )
    .await;
    committer.stop().await;
    result
}

/// What became of a commit handed to the [`Committer`].
fn answered(
    answer: Result<Option<Owed>, tokio::sync::oneshot::error::RecvError>,
) -> anyhow::Result<Option<Owed>> {
    answer.map_err(|_| anyhow::anyhow!("the outbox commit thread stopped"))
}

/// The loop of [`run`].
async fn take_turns(
    pipeline: &mut Pipeline,
    committer: &Committer,
    mut queue: mpsc::Receiver<Inbound>,
    mut pushed: mpsc::Receiver<PushJob>,
    mut acker: Acker,
    spacing: Spacing,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut batch = Vec::with_capacity(BATCH);
    let mut owed = Owed::default();
    let mut in_flight: Option<tokio::sync::oneshot::Receiver<Option<Owed>>> = None;
    let mut last_commit: Option<tokio::time::Instant> = None;
    // The time from the start of the last commit to the start of the next.
    let mut commit_interval = spacing.interval;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let aggregates = pipeline.aggregates();
    let turn_bytes = pipeline.store.max_bytes() / 4;
    // How many more messages the turn takes.
    let room = |pipeline: &Pipeline, owed: &Owed| {
        if pipeline.pending.record_bytes() < turn_bytes {
            TURN_MAX.saturating_sub(owed.messages)
        } else {
            0
        }
    };
    loop {
        // Acks waiting for room in the request channel: come back soon even if idle.
        let acks_waiting = acker.flush();
        let now = tokio::time::Instant::now();
        // When the next commit may start, if not yet.
        let next_commit = last_commit
            .map(|t| t + commit_interval)
            .filter(|&t| now < t);
        // The turn has something to commit, and nothing is being written.
        let due = in_flight.is_none() && (!owed.is_empty() || pipeline.wants_commit(now_ms()));
        // While a commit is written or the interval runs, the messages that come stay in the
        // queue, to be taken all at once: one wake-up per commit, not per message.
        let collecting = in_flight.is_some() || (due && next_commit.is_some());
        let take = room(pipeline, &owed).min(BATCH);
        tokio::select! {
            n = queue.recv_many(&mut batch, take), if !collecting && take > 0 => {
                if n == 0 {
                    break;
                }
                pipeline.process(&batch, now_ms());
                owed.take(&mut batch);
            }
            Some(job) = pushed.recv(), if take > 0 => match pipeline.accept_push(&job, now_ms()) {
                Ok(ack) => owed.replies.push((job.reply, ack)),
                Err(err) => tracing::error!(%err, "cannot accept forwarded records"),
            },
            answer = async { in_flight.as_mut().expect("a commit in flight").await }, if in_flight.is_some() => {
                in_flight = None;
                match answered(answer)? {
                    Some(paid) => {
                        pipeline.committed();
                        paid.pay(&mut acker);
                    }
                    // Stopped with the turn uncommitted: its messages are not acknowledged, so
                    // the broker delivers them again after the restart (and the origin of
                    // forwarded records sends them again).
                    None => return Ok(()),
                }
            }
            _ = tick.tick(), if aggregates => pipeline.release(now_ms()),
            // At once when the interval has run.
            () = tokio::time::sleep_until(next_commit.unwrap_or(now)), if due => {}
            () = tokio::time::sleep(Duration::from_millis(5)), if acks_waiting => continue,
            () = shutdown.cancelled() => break,
        }
        if in_flight.is_some()
            || last_commit.is_some_and(|t| tokio::time::Instant::now() < t + commit_interval)
        {
            continue;
        }
        // What came while the last commit was written or the interval ran joins this turn.
        loop {
            let take = room(pipeline, &owed).min(BATCH);
            while batch.len() < take
                && let Ok(inbound) = queue.try_recv()
            {
                batch.push(inbound);
            }
            if batch.is_empty() {
                break;
            }
            pipeline.process(&batch, now_ms());
            owed.take(&mut batch);
            // Others on this worker go on between batches.
            tokio::task::yield_now().await;
        }
        let now = now_ms();
        if pipeline.wants_commit(now) {
            let start = tokio::time::Instant::now();
            // The rate the turn's messages came at since the last commit started.
            let rate = last_commit.map_or(0.0, |t| {
                owed.messages as f64 / (start - t).as_secs_f64().max(1e-6)
            });
            commit_interval = spacing.at(rate);
            in_flight = Some(committer.commit(pipeline.take_turn(now), std::mem::take(&mut owed)));
            last_commit = Some(start);
        } else if !owed.is_empty() {
            // Nothing to write and nothing being written: what the turn owes is due now.
            std::mem::take(&mut owed).pay(&mut acker);
        }
    }
    // The commit being written, then what the last turn took and the windows that changed, so a
    // stop or a reload loses none of them.
    if let Some(answer) = in_flight.take() {
        match answered(answer.await)? {
            Some(paid) => paid.pay(&mut acker),
            None => return Ok(()),
        }
    }
    pipeline.checkpoint_all_windows();
    if pipeline.wants_commit(now_ms()) || !owed.is_empty() {
        let answer = committer.commit(pipeline.take_turn(now_ms()), owed);
        if let Some(paid) = answered(answer.await)? {
            paid.pay(&mut acker);
        }
    }
    acker.flush();
    Ok(())
}

/// Which commit-failure counter an error counts in.
fn failure_reason(err: &CommitError) -> usize {
    usize::from(matches!(err, CommitError::Full { .. }))
}

/// Commits `pending`, retrying with backoff (10 ms doubling to 1 s) until it succeeds. Returns false
/// when `shutdown` comes first (a single attempt is made once it has).
fn commit_until_done(
    store: &Store,
    pending: &mut Pending,
    failures: &[Counter; 2],
    shutdown: &CancellationToken,
) -> bool {
    let mut wait = Duration::from_millis(10);
    let mut attempts = 0u32;
    loop {
        match store.commit(pending, now_ms()) {
            Ok(()) => {
                if attempts > 0 {
                    tracing::info!(
                        failures = attempts,
                        "outbox commit succeeded after retrying"
                    );
                }
                return true;
            }
            Err(err) => {
                failures[failure_reason(&err)].increment(1);
                // Logged on the first failure, then every 30th, so a long outage does not flood.
                if attempts.is_multiple_of(30) {
                    tracing::warn!(%err, failures = attempts, "outbox commit failed: retrying; messages stay unacknowledged");
                }
                attempts += 1;
            }
        }
        let until = std::time::Instant::now() + wait;
        while std::time::Instant::now() < until {
            if shutdown.is_cancelled() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10).min(wait));
        }
        wait = (wait * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::SledOutbox;
    use hubgate_privacy::{Record, Value};
    use rumqttc::Publish;

    #[test]
    fn window_checkpoints_are_binary_and_those_written_as_json_still_resume() {
        let (policy, _) = hubgate_privacy::policy::from_toml(
            r#"
[[stream]]
name = "counts"
topics = ["c/+"]
purpose = "test"
legal_basis = "public task"
principles = ["community_participation"]
retention = "1d"

[stream.fields]
zone = "keep"
device = "keep"

[stream.aggregate]
window = "1m"
group_by = ["zone"]
contributor = "device"
min_group_size = 2

[stream.aggregate.measures]
readings = "count"
"#,
        )
        .unwrap();
        let spec = policy.streams()[0].aggregate.as_ref().unwrap();
        let mut state = WindowState::default();
        for i in 0..10 {
            let record = Record {
                event_time_ms: 60_000,
                fields: vec![
                    (
                        "zone".into(),
                        Value::Str(compact_str::format_compact!("z{}", i % 3)),
                    ),
                    ("device".into(), Value::Int(i)),
                ],
            };
            assert_eq!(state.absorb(spec, &record, 60_000), Absorbed::Counted);
        }
        let binary = Checkpoint::encode(7, 1, &state);
        assert!(binary.starts_with(CHECKPOINT_MAGIC));
        let read = Checkpoint::decode(&binary).unwrap();
        assert_eq!((read.spec, &read.state), (7, &state));
        let json = serde_json::to_vec(&serde_json::json!({ "spec": 7, "state": state })).unwrap();
        assert!(json.len() > binary.len());
        let read = Checkpoint::decode(&json).unwrap();
        assert_eq!((read.spec, &read.state), (7, &state));
        for damaged in [
            &binary[..binary.len() - 1],
            &binary[..6],
            &json[..json.len() - 1],
        ] {
            assert!(Checkpoint::decode(damaged).is_err());
        }
    }

    const POLICY: &str = r#"
[[stream]]
name = "s"
topics = ["city/s/+"]
purpose = "test"
legal_basis = "public task"
principles = ["sustainability_resilience"]
retention = "1d"

[stream.fields]
v = "keep"
"#;

    fn push(origin: &str, sequence: u64) -> PushJob {
        let record = v1::Record {
            sequence,
            fields: [(
                "v".to_owned(),
                v1::Value {
                    kind: Some(v1::value::Kind::IntValue(1)),
                },
            )]
            .into(),
            ..v1::Record::default()
        };
        PushJob {
            origin: origin.to_owned(),
            incarnation: "a".to_owned(),
            stream: 0,
            records: vec![record],
            reply: tokio::sync::oneshot::channel().0,
        }
    }

    /// Commits are spaced by 1 ms per 20,000 messages a second, within the interval and the
    /// maximum, and never closer than the interval, even when the maximum is less.
    #[test]
    fn commits_are_spaced_by_the_rate_of_messages_within_the_interval_and_the_maximum() {
        let ms = Duration::from_millis;
        let spacing = Spacing {
            interval: ms(1),
            max: ms(5),
        };
        assert_eq!(spacing.at(0.0), ms(1));
        assert_eq!(spacing.at(10_000.0), ms(1));
        assert_eq!(spacing.at(50_000.0), Duration::from_micros(2_500));
        assert_eq!(spacing.at(100_000.0), ms(5));
        assert_eq!(spacing.at(1e9), ms(5));
        let spacing = Spacing {
            interval: ms(10),
            max: ms(5),
        };
        assert_eq!(spacing.at(1e9), ms(10));
        let spacing = Spacing {
            interval: Duration::ZERO,
            max: Duration::ZERO,
        };
        assert_eq!(spacing.at(1e9), Duration::ZERO);
    }

    /// The values of field `v` of stream 0's records, in sequence order.
    fn values(store: &Store) -> Vec<i64> {
        store
            .read(0, 1, 1_000, now_ms())
            .records
            .iter()
            .filter_map(|r| match r.record().ok()?.fields.get("v")?.kind {
                Some(v1::value::Kind::IntValue(v)) => Some(v),
                _ => None,
            })
            .collect()
    }

    /// `run` acknowledges QoS 1 messages in the order they came, each only once its record is
    /// committed (readable), the last of a burst that nothing follows included; QoS 0 messages
    /// are committed and never acknowledged. A stop commits what was taken, and the commit
    /// thread lets go of the store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_acknowledges_in_order_once_committed_and_commits_what_it_took_before_a_stop() {
        let dir = tempfile::tempdir().unwrap();
        let (pipeline, store) = pipeline_for(POLICY, dir.path());
        let (queue_tx, queue_rx) = mpsc::channel(64);
        let (_push_tx, push_rx) = mpsc::channel(1);
        let acks = crate::sources::mqtt::AckQueue::default();
        let (acker, woke) = Acker::noting(acks.clone());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            pipeline,
            queue_rx,
            push_rx,
            acker,
            Spacing {
                interval: Duration::from_millis(20),
                max: Duration::from_millis(20),
            },
            shutdown.clone(),
        ));
        let message = |v: u16| {
            // Every third message is QoS 0.
            let qos = if v.is_multiple_of(3) {
                rumqttc::QoS::AtMostOnce
            } else {
                rumqttc::QoS::AtLeastOnce
            };
            let payload = format!(r#"{{"v":{v}}}"#);
            let mut publish = Publish::new("city/s/x", qos, payload.clone());
            publish.pkid = v;
            Inbound {
                bytes: payload.len(),
                publish,
                oversized: false,
            }
        };
        let mut acked: Vec<u16> = Vec::new();
        let wait_for_acks = async |acked: &mut Vec<u16>, want: &[u16]| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while acked.as_slice() != want {
                let written = acks.written(&woke);
                // Nothing is acknowledged before its record is readable.
                let readable = values(&store);
                for pkid in &written {
                    assert!(
                        readable.contains(&i64::from(*pkid)),
                        "{pkid} acknowledged before it was committed"
                    );
                }
                acked.extend(written);
                assert!(
                    want.starts_with(acked),
                    "acknowledged {acked:?}, expected {want:?}"
                );
                assert!(
                    std::time::Instant::now() < deadline,
                    "acknowledged {acked:?}, expected {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        // A burst in several sends, closer together than the commit interval: more than one turn.
        for v in 1..=12 {
            queue_tx.send(message(v)).await.unwrap();
            if v % 4 == 0 {
                tokio::time::sleep(Duration::from_millis(7)).await;
            }
        }
        let qos1: Vec<u16> = (1..=12u16).filter(|v| !v.is_multiple_of(3)).collect();
        wait_for_acks(&mut acked, &qos1).await;
        assert_eq!(values(&store), (1..=12).collect::<Vec<i64>>());
        // One message after a quiet spell, which nothing follows.
        tokio::time::sleep(Duration::from_millis(50)).await;
        queue_tx.send(message(13)).await.unwrap();
        let mut want = qos1.clone();
        want.push(13);
        wait_for_acks(&mut acked, &want).await;
        // Two more, right before a stop. What the pipeline took by then is committed and
        // acknowledged; what it did not take stays unacknowledged, for the broker to deliver
        // again.
        queue_tx.send(message(14)).await.unwrap();
        queue_tx.send(message(16)).await.unwrap();
        shutdown.cancel();
        task.await.unwrap().unwrap();
        let committed = values(&store);
        assert!(
            matches!(committed[12..], [13] | [13, 14] | [13, 14, 16]),
            "{committed:?}"
        );
        want.extend(
            [14, 16]
                .into_iter()
                .filter(|v| committed.contains(&i64::from(*v))),
        );
        wait_for_acks(&mut acked, &want).await;
        assert_eq!(
            Arc::strong_count(&store),
            1,
            "the commit thread holds the store"
        );
    }

    const AGGREGATED: &str = r#"
[[stream]]
name = "counts"
topics = ["city/footfall/+/probe"]
purpose = "test"
legal_basis = "public task"
principles = ["community_participation"]
retention = "1d"

[stream.fields]
counter_id = "keep"
mac = "pseudonymise"

[stream.aggregate]
window = "1h"
group_by = ["counter_id"]
contributor = "mac"
min_group_size = 1

[stream.aggregate.measures]
readings = "count"
"#;

    fn pipeline_for(policy: &str, dir: &std::path::Path) -> (Pipeline, Arc<Store>) {
        let (policy, _) = hubgate_privacy::policy::from_toml(policy).unwrap();
        let policy = Arc::new(policy);
        let audit = Arc::new(AuditLog::open(&dir.join("audit.jsonl")).unwrap());
        let outbox = Arc::new(SledOutbox::open(&dir.join("outbox")).unwrap());
        let streams: Vec<(&str, Duration)> = policy
            .streams()
            .iter()
            .map(|s| (s.name.as_str(), s.retention))
            .collect();
        let store = Arc::new(
            Store::open(
                outbox,
                streams,
                &crate::config::StoreConfig::default(),
                Arc::clone(&audit),
            )
            .unwrap(),
        );
        let stats = Arc::new(Stats::new(policy.streams().len()));
        let pipeline =
            Pipeline::new(Arc::clone(&policy), Arc::clone(&store), stats, None, audit).unwrap();
        (pipeline, store)
    }

    fn probe(qos: rumqttc::QoS, mac: &str) -> Inbound {
        let payload = format!(r#"{{"counter_id":"pc-1","mac":"{mac}"}}"#);
        Inbound {
            bytes: payload.len(),
            publish: Publish::new("city/footfall/pc-1/probe", qos, payload),
            oversized: false,
        }
    }

    const SENML: &str = r#"
[[stream]]
name = "climate"
topics = ["city/climate/+"]
format = "senml_cbor"
purpose = "test"
legal_basis = "public task"
principles = ["sustainability_resilience"]
retention = "1d"
time_field = "t"

[stream.fields]
bn = "pseudonymise"
"temperature.v" = "keep"
"#;

    /// A SenML pack gives one record per time it reports; a payload that is not SenML is
    /// dropped and counted, and costs nothing else.
    #[test]
    fn a_senml_pack_gives_a_record_per_time_and_a_bad_pack_is_counted() {
        use ciborium::Value as C;
        let dir = tempfile::tempdir().unwrap();
        let (mut pipeline, store) = pipeline_for(SENML, dir.path());
        let record = |fields: Vec<(i64, C)>| {
            C::Map(fields.into_iter().map(|(k, v)| (C::from(k), v)).collect())
        };
        let pack = C::Array(vec![
            record(vec![
                (-2, C::from("urn:dev:ow:10e2073a01080063:")),
                (-3, C::from(1_700_000_000)),
                (0, C::from("temperature")),
                (1, C::from("Cel")),
                (2, C::Float(21.5)),
            ]),
            record(vec![
                (0, C::from("temperature")),
                (6, C::from(60)),
                (2, C::Float(21.75)),
            ]),
        ]);
        let mut payload = Vec::new();
        ciborium::into_writer(&pack, &mut payload).unwrap();
        let message = |payload: Vec<u8>| Inbound {
            bytes: payload.len(),
            publish: Publish::new("city/climate/7", rumqttc::QoS::AtLeastOnce, payload),
            oversized: false,
        };
        let now = now_ms();
        let mut garbage = payload.clone();
        garbage.truncate(payload.len() - 3);
        pipeline.process(&[message(payload), message(garbage)], now);
        pipeline.commit(now).unwrap();
        let records: Vec<v1::Record> = (store.read(0, 1, 10, now).records.iter())
            .map(|r| r.record().unwrap())
            .collect();
        let times: Vec<i64> = records
            .iter()
            .map(|r| r.event_time.unwrap().seconds)
            .collect();
        assert_eq!(times, [1_700_000_000, 1_700_000_060]);
        for (r, want) in records.iter().zip([21.5, 21.75]) {
            let mut names: Vec<&str> = r.fields.keys().map(String::as_str).collect();
            names.sort_unstable();
            assert_eq!(names, ["bn", "temperature.v"]);
            assert_eq!(
                r.fields["temperature.v"].kind,
                Some(v1::value::Kind::DoubleValue(want))
            );
            let Some(v1::value::Kind::StringValue(bn)) = &r.fields["bn"].kind else {
                panic!("bn is a pseudonym");
            };
            assert!(!bn.contains("10e2073a01080063"));
        }
        assert_eq!(
            pipeline.stats.streams[0]
                .dropped_decode
                .load(Ordering::Relaxed),
            1
        );
    }

    /// Streams of one topic each get the message's readings, whatever their order and formats:
    /// the last stream of a format takes them by value, the others copies, and a format that
    /// cannot read the payload is counted for its stream alone.
    #[test]
    fn every_stream_of_a_topic_gets_the_readings() {
        let stream = |name: &str, format: &str, fields: &str| {
            format!(
                r#"
[[stream]]
name = "{name}"
topics = ["city/footfall/+/probe"]
format = "{format}"
purpose = "test"
legal_basis = "public task"
principles = ["community_participation"]
retention = "1d"

[stream.fields]
{fields}
"#
            )
        };
        let policy = [
            stream("ids", "json", r#"counter_id = "keep""#),
            stream("pack", "senml_json", r#"n = "keep""#),
            stream(
                "both",
                "json",
                "counter_id = \"keep\"\nmac = \"pseudonymise\"",
            ),
        ]
        .concat();
        let dir = tempfile::tempdir().unwrap();
        let (mut pipeline, store) = pipeline_for(&policy, dir.path());
        let mut garbage = probe(rumqttc::QoS::AtMostOnce, "3c:22:fb:12:34:56");
        garbage.publish.payload = bytes::Bytes::from_static(b"{\"counter_id\":");
        let now = now_ms();
        let messages = [
            probe(rumqttc::QoS::AtMostOnce, "3c:22:fb:12:34:56"),
            garbage,
            probe(rumqttc::QoS::AtMostOnce, "3c:22:fb:12:34:57"),
        ];
        pipeline.process(&messages, now);
        pipeline.commit(now).unwrap();
        let fields = |stream: usize| -> Vec<Vec<String>> {
            store
                .read(stream, 1, 10, now)
                .records
                .iter()
                .map(|r| {
                    let mut names: Vec<String> = r.record().unwrap().fields.into_keys().collect();
                    names.sort_unstable();
                    names
                })
                .collect()
        };
        assert_eq!(fields(0), [["counter_id"], ["counter_id"]]);
        assert!(fields(1).is_empty());
        assert_eq!(fields(2), [["counter_id", "mac"], ["counter_id", "mac"]]);
        let macs: Vec<String> = store
            .read(2, 1, 10, now)
            .records
            .iter()
            .map(|r| match r.record().unwrap().fields["mac"].kind.clone() {
                Some(v1::value::Kind::StringValue(p)) => p,
                other => panic!("a pseudonym, not {other:?}"),
            })
            .collect();
        assert_ne!(macs[0], macs[1]);
        let dropped: Vec<u64> = (pipeline.stats.streams.iter())
            .map(|s| s.dropped_decode.load(Ordering::Relaxed))
            .collect();
        assert_eq!(dropped, [1, 3, 1]);
    }

    /// A window that absorbed a QoS 1 reading (to be acknowledged) is checkpointed in that
    /// commit; one that absorbed only QoS 0 readings at most once a second, and before a stop.
    #[test]
    fn windows_are_checkpointed_before_acknowledgement_and_at_most_each_second_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let (mut pipeline, store) = pipeline_for(AGGREGATED, dir.path());
        let name = checkpoint_name("counts");
        let t = now_ms();
        pipeline.process(&[probe(rumqttc::QoS::AtMostOnce, "aa:01")], t);
        pipeline.commit(t).unwrap();
        assert_eq!(store.checkpoint(&name).unwrap(), None, "QoS 0: not yet");
        pipeline.process(&[probe(rumqttc::QoS::AtMostOnce, "aa:02")], t + 1_500);
        pipeline.commit(t + 1_500).unwrap();
        let after_a_second = store
            .checkpoint(&name)
            .unwrap()
            .expect("due after a second");
        pipeline.process(&[probe(rumqttc::QoS::AtLeastOnce, "aa:03")], t + 1_600);
        pipeline.commit(t + 1_600).unwrap();
        let for_the_ack = store.checkpoint(&name).unwrap().expect("checkpointed");
        assert_ne!(for_the_ack, after_a_second, "QoS 1: in the same commit");
        pipeline.process(&[probe(rumqttc::QoS::AtMostOnce, "aa:04")], t + 1_700);
        pipeline.commit(t + 1_700).unwrap();
        assert_eq!(store.checkpoint(&name).unwrap().unwrap(), for_the_ack);
        pipeline.checkpoint_all_windows();
        pipeline.commit(t + 1_800).unwrap();
        assert_ne!(
            store.checkpoint(&name).unwrap().unwrap(),
            for_the_ack,
            "before a stop"
        );
    }

    /// Between whole states, a checkpoint writes only the groups that changed; the whole state
    /// and its changes resume the state the pipeline holds, and once a quarter of the groups
    /// changed the whole state is written again.
    #[test]
    fn window_checkpoints_write_the_changes_between_whole_states() {
        let dir = tempfile::tempdir().unwrap();
        let (mut pipeline, store) = pipeline_for(AGGREGATED, dir.path());
        let probe_at = |counter: usize, mac: &str| {
            let payload = format!(r#"{{"counter_id":"pc-{counter}","mac":"{mac}"}}"#);
            Inbound {
                bytes: payload.len(),
                publish: Publish::new(
                    format!("city/footfall/pc-{counter}/probe"),
                    rumqttc::QoS::AtLeastOnce,
                    payload,
                ),
                oversized: false,
            }
        };
        let (whole, changes) = (checkpoint_name("counts"), changes_name("counts"));
        let stored = |name: &str| store.checkpoint(name).unwrap().unwrap_or_default();
        let t = now_ms();
        let batch: Vec<_> = (0..40).map(|c| probe_at(c, "aa:01")).collect();
        pipeline.process(&batch, t);
        pipeline.commit(t).unwrap();
        let first = stored(&whole);
        assert!(first.starts_with(CHECKPOINT_MAGIC));
        assert!(
            stored(&changes).is_empty(),
            "a whole state, with no changes"
        );

        // Two groups change, one of them new: only they are written.
        pipeline.process(&[probe_at(1, "aa:02"), probe_at(99, "aa:03")], t + 10);
        pipeline.commit(t + 10).unwrap();
        assert_eq!(stored(&whole), first);
        let written = stored(&changes);
        assert!(written.starts_with(CHANGES_MAGIC));
        assert!(
            written.len() * 5 < first.len(),
            "{} of {}",
            written.len(),
            first.len()
        );
        let spec = pipeline.policy.streams()[0].aggregate.clone().unwrap();
        let resumed = resume_windows(&store, &pipeline.policy.streams()[0], &spec).unwrap();
        let live = &pipeline.windows[0].as_ref().unwrap().state;
        assert_eq!(resumed.state.entries(), live.entries());
        assert_eq!(
            resumed.state.groups().collect::<Vec<_>>(),
            live.groups().collect::<Vec<_>>()
        );
        assert!(
            live.groups()
                .any(|(_, key, n)| key == [Value::Str("pc-99".into())] && n == 1)
        );

        // A quarter of the groups changed: the whole state again, and its changes start over.
        let batch: Vec<_> = (0..10).map(|c| probe_at(c, "aa:04")).collect();
        pipeline.process(&batch, t + 20);
        pipeline.commit(t + 20).unwrap();
        assert_ne!(stored(&whole), first);
        assert!(stored(&changes).is_empty());
        let resumed = resume_windows(&store, &pipeline.policy.streams()[0], &spec).unwrap();
        let live = &pipeline.windows[0].as_ref().unwrap().state;
        assert_eq!(
            resumed.state.groups().collect::<Vec<_>>(),
            live.groups().collect::<Vec<_>>()
        );

        // Changes that are not those of the whole state beside them are refused, not applied.
        store.save_checkpoint(&changes, written).unwrap();
        let refused = resume_windows(&store, &pipeline.policy.streams()[0], &spec);
        assert!(refused.unwrap_err().to_string().contains("damaged"));
    }

    /// However many origins push, the marks held in memory stay bounded, and a mark let go is
    /// read back from the store: a batch sent again is still recognised.
    #[test]
    fn push_marks_in_memory_are_bounded_and_reread_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let (mut pipeline, store) = pipeline_for(POLICY, dir.path());
        let origins = MAX_CACHED_PUSH_MARKS + 100;
        for i in 0..origins {
            assert_eq!(
                pipeline.accept_push(&push(&format!("o{i}"), 1), 0).unwrap(),
                1
            );
            pipeline.commit(0).unwrap();
            assert!(pipeline.push_marks.len() < MAX_CACHED_PUSH_MARKS);
        }
        let kept = store.next_sequence(0);
        assert_eq!(kept, origins as u64 + 1);
        // The first origin's mark left memory long ago; its batch sent again is not kept twice.
        assert!(!pipeline.push_marks.contains_key("push/o0/a/s"));
        assert_eq!(pipeline.accept_push(&push("o0", 1), 0).unwrap(), 1);
        pipeline.commit(0).unwrap();
        assert_eq!(store.next_sequence(0), kept);
    }
}
