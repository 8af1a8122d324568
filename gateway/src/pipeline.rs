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
//!    pseudonymisation key (see [`crate::keys`]); image and video payloads are dropped undecoded;
//! 4. appends the filtered records to the store, one append per stream per batch;
//! 5. only then acknowledges the messages to the broker (QoS 1), so a message is never acked
//!    before its record is kept.
//!
//! Acknowledgements go through rumqttc's request channel without ever waiting on it (`try_ack`):
//! the MQTT task may itself be waiting for room in this task's queue, and waiting on each other
//! would deadlock. Acks that find the channel full are retried on the next turn.
//!
//! Metrics (counted per batch): `hubgate_mqtt_messages_received_total`,
//! `hubgate_mqtt_received_bytes_total`, `hubgate_unrouted_messages_total`,
//! `hubgate_stream_messages_total{stream}`, `hubgate_messages_dropped_total{stream, reason}`,
//! `hubgate_fields_dropped_total{stream, stage}`, `hubgate_identifiers_suppressed_total{stream}`,
//! `hubgate_fields_pseudonymised_total{stream}`, `hubgate_locations_generalised_total{stream, outcome}`,
//! `hubgate_records_kept_total{stream}`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hubgate_exporters::catalogue;
use hubgate_privacy::policy::PayloadFormat;
use hubgate_privacy::{Context, Policy, Reading, Record, Value, chain, identifiers};
use hubgate_proto::v1;
use metrics::Counter;
use prost::Message as _;
use rumqttc::{AsyncClient, Publish};
use tokio::sync::mpsc;

use crate::decode;
use crate::keys::KeyManager;
use crate::store::Store;

/// Most messages taken from the queue in one turn.
const BATCH: usize = 512;

/// Counts of what one stream received, dropped and kept. Read by `hubgate demo` and tests; the
/// same figures go to the metrics.
#[derive(Debug, Default)]
pub struct StreamStats {
    pub messages: AtomicU64,
    pub bytes_in: AtomicU64,
    pub dropped_decode: AtomicU64,
    pub dropped_media: AtomicU64,
    pub dropped_bad_time: AtomicU64,
    pub fields_dropped: AtomicU64,
    pub identifiers_suppressed: AtomicU64,
    pub pseudonymised: AtomicU64,
    pub locations_generalised: AtomicU64,
    pub records_kept: AtomicU64,
    /// Encoded size of the records kept (protobuf), the bytes a subscriber receives per record.
    pub bytes_kept: AtomicU64,
    /// Encoded size of the field data alone in the records kept, without the envelope (stream,
    /// sequence, time, policy hash): what is left of the payload's content.
    pub field_bytes_kept: AtomicU64,
}

/// Counts for the whole gateway.
#[derive(Debug)]
pub struct Stats {
    pub received: AtomicU64,
    pub received_bytes: AtomicU64,
    pub unrouted: AtomicU64,
    /// Per stream, in policy order.
    pub streams: Vec<StreamStats>,
}

impl Stats {
    pub fn new(streams: usize) -> Self {
        Self {
            received: AtomicU64::new(0),
            received_bytes: AtomicU64::new(0),
            unrouted: AtomicU64::new(0),
            streams: (0..streams).map(|_| StreamStats::default()).collect(),
        }
    }
}

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
    records: Vec<v1::Record>,
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
}

impl Pipeline {
    pub fn new(policy: Arc<Policy>, store: Arc<Store>, stats: Arc<Stats>) -> Self {
        let counters = policy
            .streams()
            .iter()
            .map(|s| StreamCounters::new(&s.name))
            .collect();
        let tallies = policy.streams().iter().map(|_| Tally::default()).collect();
        let policy_for_keys = Arc::clone(&policy);
        Self {
            policy_hash: policy.hash_hex(),
            policy,
            store,
            stats,
            counters,
            received: metrics::counter!(catalogue::MQTT_MESSAGES_RECEIVED),
            received_bytes: metrics::counter!(catalogue::MQTT_RECEIVED_BYTES),
            unrouted: metrics::counter!(catalogue::UNROUTED_MESSAGES),
            tallies,
            keys: KeyManager::new(&policy_for_keys),
        }
    }

    /// Processes a batch of messages and commits their records to the store.
    pub fn process(&mut self, batch: &[Publish], now_ms: i64) {
        let mut unrouted = 0u64;
        let mut bytes = 0u64;
        for publish in batch {
            bytes += publish.payload.len() as u64;
            if !self.process_one(publish, now_ms) {
                unrouted += 1;
            }
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
            let mut records = std::mem::take(&mut tally.records);
            let kept = records.len() as u64;
            if kept > 0 {
                self.store.append(index, records.drain(..), now_ms);
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
    }

    /// Returns false when no stream takes the message's topic.
    fn process_one(&mut self, publish: &Publish, now_ms: i64) -> bool {
        let mut routed = false;
        // Decoded once, on first use, and shared by every stream of the same format.
        let mut decoded: Option<Result<Reading, decode::DecodeError>> = None;
        let media = identifiers::is_media_payload(&publish.payload);
        for index in self.policy.route(&publish.topic) {
            routed = true;
            let stream = &self.policy.streams()[index];
            let tally = &mut self.tallies[index];
            tally.messages += 1;
            tally.bytes_in += publish.payload.len() as u64;
            if media {
                // Images and video are never decoded, kept or sent.
                tally.dropped_media += 1;
                continue;
            }
            let reading = match stream.format {
                PayloadFormat::Json => {
                    decoded.get_or_insert_with(|| decode::json(&publish.payload))
                }
            };
            let Ok(reading) = reading else {
                tally.dropped_decode += 1;
                continue;
            };
            let ctx = Context {
                received_ms: now_ms,
                key: self.keys.key(index, now_ms),
            };
            match chain::apply(stream, reading.clone(), &ctx) {
                Ok(outcome) => {
                    tally.fields_dropped += u64::from(outcome.fields_dropped);
                    tally.identifiers_suppressed += u64::from(outcome.identifiers_suppressed);
                    tally.pseudonymised += u64::from(outcome.pseudonymised);
                    tally.locations_generalised += u64::from(outcome.locations_generalised);
                    tally.locations_invalid += u64::from(outcome.locations_invalid);
                    let record = to_proto(&stream.name, &self.policy_hash, outcome.record);
                    tally.bytes_kept += record.encoded_len() as u64;
                    tally.field_bytes_kept += prost::encoding::hash_map::encoded_len(
                        prost::encoding::string::encoded_len,
                        prost::encoding::message::encoded_len,
                        5,
                        &record.fields,
                    ) as u64;
                    tally.records.push(record);
                }
                Err(chain::Rejection::BadTime) => tally.dropped_bad_time += 1,
            }
        }
        routed
    }
}

/// Converts a filtered record into its gRPC form (sequence assigned by the store).
pub fn to_proto(stream: &str, policy_hash: &str, record: Record) -> v1::Record {
    let ms = record.event_time_ms;
    v1::Record {
        stream: stream.to_owned(),
        sequence: 0,
        event_time: Some(prost_types::Timestamp {
            seconds: ms.div_euclid(1000),
            nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
        }),
        policy_hash: policy_hash.to_owned(),
        fields: record
            .fields
            .into_iter()
            .map(|(path, value)| (path, to_proto_value(value)))
            .collect(),
    }
}

fn to_proto_value(value: Value) -> v1::Value {
    use v1::value::Kind;
    let kind = match value {
        Value::Int(i) => Kind::IntValue(i),
        Value::Float(f) => Kind::DoubleValue(f),
        Value::Str(s) => Kind::StringValue(s),
        Value::Bool(b) => Kind::BoolValue(b),
    };
    v1::Value { kind: Some(kind) }
}

/// Acknowledges messages to the broker without ever blocking on the request channel.
#[derive(Debug)]
pub struct Acker {
    client: AsyncClient,
    pending: VecDeque<Publish>,
}

impl Acker {
    pub fn new(client: AsyncClient) -> Self {
        Self {
            client,
            pending: VecDeque::new(),
        }
    }

    /// Queues acks for these messages and sends as many queued acks as the channel takes.
    pub fn ack(&mut self, batch: impl IntoIterator<Item = Publish>) {
        self.pending.extend(
            batch
                .into_iter()
                .filter(|p| p.qos != rumqttc::QoS::AtMostOnce),
        );
        self.flush();
    }

    /// Sends queued acks until the channel is full. Returns whether any remain.
    pub fn flush(&mut self) -> bool {
        while let Some(p) = self.pending.front() {
            if self.client.try_ack(p).is_err() {
                return true;
            }
            self.pending.pop_front();
        }
        false
    }
}

/// Runs the pipeline until the queue closes.
pub async fn run(mut pipeline: Pipeline, mut queue: mpsc::Receiver<Publish>, mut acker: Acker) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let received = if acker.flush() {
            // Acks are waiting for room in the request channel: come back soon even if idle.
            match tokio::time::timeout(Duration::from_millis(5), queue.recv_many(&mut batch, BATCH))
                .await
            {
                Ok(n) => n,
                Err(_) => continue,
            }
        } else {
            queue.recv_many(&mut batch, BATCH).await
        };
        if received == 0 {
            break;
        }
        pipeline.process(&batch, now_ms());
        acker.ack(batch.drain(..));
    }
    acker.flush();
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
