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
//! `hubgate_records_kept_total{stream}`. An aggregated stream publishes none of these per-stream
//! counts of what it takes in (a single reading of a group that k or noise suppresses would move
//! them), only what its releases show: `hubgate_records_kept_total{stream}`,
//! `hubgate_aggregate_groups_total{stream, outcome="released"}`,
//! `hubgate_privacy_budget_refusals_total{stream}` and
//! `hubgate_privacy_budget_spent_today_epsilon{stream}`; and the drops of whole messages
//! (`hubgate_messages_dropped_total`), which a reading that passes never moves.

pub mod budget;
mod hold;
pub mod pseudonym_keys;
mod push;
mod tally;
mod turns;
mod windows;

use tally::{StreamCounters, Tally, absorbed_index};

pub use hold::held_streams;
pub use turns::{Spacing, run};
use windows::{Windows, resume_windows};

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::record::encode_body;
use crate::sources::mqtt::Inbound;
use crate::sources::ratelimit::{DeviceLimit, Limit, Limiter};
use crate::telemetry::stats::Stats;
use hubgate_exporters::catalogue;
use hubgate_privacy::{Context, Policy, Reading, chain, identifiers, invariants};
use metrics::Counter;

use crate::decode::{self, Decoder};
use crate::governance::audit::AuditLog;
use crate::pipeline::budget::{BudgetFile, OsRandom};
use crate::pipeline::pseudonym_keys::PseudonymKeys;
use crate::store::{CommitError, Pending, Store};

/// Most messages taken from the queue at once (a turn may take several such batches).
const BATCH: usize = 512;

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
    keys: PseudonymKeys,
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
    push_marks: std::collections::HashMap<String, crate::sources::push::Marks>,
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
    /// Per stream, where its records are staged: the stream itself, or its hold log while it
    /// holds them back (see [`hold`]).
    stage_to: Vec<usize>,
    /// The hold logs, and how far each is released.
    held: Vec<hold::Held>,
    /// Most bytes of one lane of a release ([`hold::LANE_BYTES`]; smaller in tests).
    lane_bytes: u64,
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
            .map(|s| StreamCounters::new(&s.name, s.aggregate.is_some()))
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
        let stage_to = policy
            .streams()
            .iter()
            .enumerate()
            .map(|(i, s)| match (s.release_delay(), store.hold_of(i)) {
                (Some(_), Some(hold)) => hold,
                _ => i,
            })
            .collect();
        let held = hold::open_holds(&policy, &store)?;
        Ok(Self {
            stage_to,
            held,
            lane_bytes: hold::LANE_BYTES,
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
            keys: PseudonymKeys::new(&policy_for_keys, Some(Arc::clone(&audit))),
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
                self.commit_failures[turns::failure_reason(err)].increment(1);
                self.pending = turn;
                self.marks_in_turn = marks;
                self.holds_not_taken();
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
    /// [`windows::WINDOW_CHECKPOINT_EVERY_MS`].
    ///
    /// A checkpoint writes what changed since the last whole state, until a quarter of the
    /// groups changed ([`windows::WHOLE_WHEN_CHANGED`]); then the whole state again. The first checkpoint
    /// of a process is a whole state.
    pub fn take_turn(&mut self, now_ms: i64) -> Pending {
        self.stage_window_checkpoints(now_ms);
        self.holds_taken();
        self.marks_in_turn = false;
        std::mem::take(&mut self.pending)
    }

    /// A turn taken with [`Pipeline::take_turn`] was committed.
    pub fn committed(&mut self) {
        self.holds_committed();
        // When no turn still to be committed holds a mark, the cache can start over from the
        // store: bounded however many origins and incarnations push.
        if !self.marks_in_turn && self.push_marks.len() >= push::MAX_CACHED_PUSH_MARKS {
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

    /// What the clock alone makes due: pseudonymisation keys whose epoch ended, windows that
    /// close, held records whose bucket ended. Runs twice a second.
    pub fn tick(&mut self, now_ms: i64) {
        self.keys.rotate_due(now_ms);
        if self.aggregates() {
            self.release(now_ms);
        }
        self.release_held(now_ms);
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
        self.flush_tallies(now_ms);
        if self.aggregates() {
            self.release(now_ms);
        }
    }

    /// Routes one message to the streams that take its topic.
    fn process_one(&mut self, publish: &rumqttc::Publish, now_ms: i64) -> Routed {
        // Decoded once per format, on first use, and shared by every stream of that format.
        let mut decoded = decode::Once::default();
        let media = identifiers::is_media_payload(&publish.payload);
        if !media && self.device_over_limit(publish, &mut decoded, now_ms) {
            return Routed::DeviceOverLimit;
        }
        let mut routes = std::mem::take(&mut self.routes);
        routes.clear();
        routes.extend(self.policy.route(&publish.topic));
        for (k, &index) in routes.iter().enumerate() {
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
                self.filter(index, reading, publish.qos, now_ms);
            }
        }
        let routed = !routes.is_empty();
        self.routes = routes;
        if routed { Routed::Yes } else { Routed::Nowhere }
    }

    /// Whether the message's device, named by `mqtt.device_rate_limit.field` in its first
    /// reading, is over its limit.
    fn device_over_limit(
        &mut self,
        publish: &rumqttc::Publish,
        decoded: &mut decode::Once,
        now_ms: i64,
    ) -> bool {
        let Some((field, limiter)) = &mut self.device_limiter else {
            return false;
        };
        let Some(first) = self.policy.route(&publish.topic).next() else {
            return false;
        };
        let format = self.policy.streams()[first].format;
        if let Ok(decoded) = decoded.get(
            &mut self.decoder,
            format,
            &publish.topic,
            &publish.payload,
            now_ms,
        ) && let Some(reading) = decoded.readings().first()
            && let Some((_, id)) = reading.fields.iter().find(|(name, _)| name == field)
        {
            return !limiter.allow_device(&publish.topic, id, now_ms);
        }
        false
    }

    /// Runs one reading through stream `index`'s privacy chain, and keeps what comes out: as a
    /// record, or absorbed into the stream's windows.
    fn filter(&mut self, index: usize, reading: Reading, qos: rumqttc::QoS, now_ms: i64) {
        let stream = &self.policy.streams()[index];
        let ctx = Context {
            received_ms: now_ms,
            key: self.keys.key(index, now_ms),
        };
        let tally = &mut self.tallies[index];
        let outcome = match chain::apply(stream, reading, &ctx) {
            Ok(outcome) => outcome,
            Err(chain::Rejection::BadTime) => {
                tally.dropped_bad_time += 1;
                return;
            }
        };
        tally.fields_dropped += u64::from(outcome.fields_dropped);
        tally.identifiers_suppressed += u64::from(outcome.identifiers_suppressed);
        tally.pseudonymised += u64::from(outcome.pseudonymised);
        tally.locations_generalised += u64::from(outcome.locations_generalised);
        tally.locations_invalid += u64::from(outcome.locations_invalid);
        if let (Some(spec), Some(windows)) = (&stream.aggregate, self.windows[index].as_mut()) {
            let generation = self.keys.generation(index);
            if windows.key_generation.is_some_and(|g| g != generation) {
                windows.state.rekey(now_ms);
                windows.must_checkpoint = true;
            }
            windows.key_generation = Some(generation);
            let absorbed = windows.state.absorb(spec, &outcome.record, now_ms);
            windows.dirty = true;
            windows.must_checkpoint |= qos != rumqttc::QoS::AtMostOnce;
            tally.absorbed[absorbed_index(absorbed)] += 1;
            return;
        }
        // The output invariants hold for every record served, the chain's own too: a record
        // that breaks them is a fault of the chain, and is dropped rather than served.
        if let Err(broken) = invariants::check(stream, &outcome.record, now_ms) {
            tracing::error!(stream = %stream.name, %broken, "a filtered record breaks the stream's output invariants: dropped");
            tally.dropped_invariant += 1;
            return;
        }
        let mut sizes = (0, 0);
        tally.records.push_with(|buf| {
            sizes = encode_body(&stream.name, &self.policy_hash, &outcome.record, buf);
        });
        tally.bytes_kept += sizes.0 as u64;
        tally.field_bytes_kept += sizes.1 as u64;
    }
}

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

#[cfg(test)]
mod tests;
