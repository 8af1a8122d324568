//! Sparkplug B (Eclipse Sparkplug 3.0): the protobuf payload on the `spBv1.0` topic namespace,
//! with its metric names, aliases and sequence numbers (`format = "sparkplug_b"`).
//!
//! Topics are `spBv1.0/<group>/<type>/<edge node>[/<device>]`. Each `NBIRTH`, `DBIRTH`, `NDATA`
//! and `DDATA` message gives one reading:
//!
//! | field | from |
//! |---|---|
//! | `group`, `edge_node`, `device` | the topic (`device` for device messages only) |
//! | `timestamp` | the payload's timestamp, in seconds since the Unix epoch (declare `time_field = "timestamp"`) |
//! | `seq` | the payload's sequence number |
//! | `<metric name>` | each metric's value: integers, floats, booleans and strings; `DateTime` as milliseconds |
//!
//! A birth certificate declares each metric's name, alias and datatype; later data messages may
//! name a metric by its alias alone. hubgate keeps the aliases of every edge node (and its
//! devices) it has seen born, in memory (at most 10,000 nodes and 100,000 names and aliases), and
//! resolves them; a metric whose alias no birth
//! declared (the gateway started after the birth) is dropped and counted
//! (`hubgate_sparkplug_unknown_aliases_total`), as are null, historical, bytes, dataset and
//! template metrics (unsupported values). hubgate only reads: it cannot ask a node to be born
//! again, so a node's data is resolved from its next birth on. The sequence numbers of an edge
//! node (0 to 255, shared by its devices) are checked; a gap is counted
//! (`hubgate_sparkplug_sequence_gaps_total`) and the readings are still taken.
//!
//! `NDEATH` forgets the node's aliases, `DDEATH` and the commands (`NCMD`, `DCMD`) and host
//! `STATE` messages give no reading. A topic outside the namespace, or a payload that is not a
//! Sparkplug B protobuf, is rejected whole.
//!
//! The message definitions below follow the Sparkplug B payload's wire format (field numbers and
//! types); fields hubgate does not read (metadata, properties, datasets, templates) are skipped.

use std::collections::HashMap;
use std::sync::Arc;

use hubgate_exporters::catalogue;
use hubgate_privacy::{Reading, Value};
use metrics::Counter;
use prost::Message as _;

use super::{DecodeError, MAX_FIELDS};

/// The Sparkplug B payload.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    /// Milliseconds since the Unix epoch, when the message was sent.
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    /// 0 to 255, per edge node.
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

/// One metric of a payload.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    #[prost(oneof = "MetricValue", tags = "10, 11, 12, 13, 14, 15, 16")]
    pub value: Option<MetricValue>,
}

/// A metric's value.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum MetricValue {
    #[prost(uint32, tag = "10")]
    IntValue(u32),
    #[prost(uint64, tag = "11")]
    LongValue(u64),
    #[prost(float, tag = "12")]
    FloatValue(f32),
    #[prost(double, tag = "13")]
    DoubleValue(f64),
    #[prost(bool, tag = "14")]
    BooleanValue(bool),
    #[prost(string, tag = "15")]
    StringValue(String),
    #[prost(bytes = "vec", tag = "16")]
    BytesValue(Vec<u8>),
}

/// Sparkplug datatypes hubgate interprets (the rest by the value's own kind).
mod datatype {
    pub const INT8: u32 = 1;
    pub const INT16: u32 = 2;
    pub const INT32: u32 = 3;
    pub const INT64: u32 = 4;
}

/// Edge nodes remembered at most; a birth beyond it is not remembered (its aliases are unknown).
const MAX_NODES: usize = 10_000;
/// Metric declarations (names and aliases) remembered over all edge nodes at most, the longest
/// name remembered, and the longest group and node names remembered: together they bound the
/// memory births can take.
const MAX_DECLARATIONS: usize = 100_000;
const MAX_NAME_BYTES: usize = 128;
const MAX_KEY_BYTES: usize = 256;

/// What one edge node's births declared.
#[derive(Debug, Default)]
struct Node {
    /// Alias to name and datatype, for the node and its devices.
    aliases: HashMap<u64, (Arc<str>, u32)>,
    /// Name to datatype.
    datatypes: HashMap<Arc<str>, u32>,
    /// Last sequence number seen.
    seq: Option<u64>,
}

/// The births the gateway has seen, by (group, edge node). Held in memory only.
#[derive(Debug)]
pub struct State {
    nodes: HashMap<(String, String), Node>,
    gaps: Counter,
    unknown_aliases: Counter,
    /// Sequence gaps and unknown aliases seen by this state (the counters count every state's).
    seen: (u64, u64),
    /// Names and aliases held over all nodes.
    declarations: usize,
}

impl Default for State {
    fn default() -> Self {
        Self {
            nodes: HashMap::new(),
            gaps: metrics::counter!(catalogue::SPARKPLUG_SEQUENCE_GAPS),
            unknown_aliases: metrics::counter!(catalogue::SPARKPLUG_UNKNOWN_ALIASES),
            seen: (0, 0),
            declarations: 0,
        }
    }
}

/// The kinds of message in the namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    NodeBirth,
    NodeData,
    NodeDeath,
    DeviceBirth,
    DeviceData,
    DeviceDeath,
    /// Commands and host state: no telemetry.
    Other,
}

impl State {
    /// Decodes one message on `topic`.
    pub fn decode(&mut self, topic: &str, payload: &[u8]) -> Result<Vec<Reading>, DecodeError> {
        let segments: Vec<&str> = topic.split('/').collect();
        let (group, kind, edge, device) = match segments.as_slice() {
            ["spBv1.0", "STATE", _] => return Ok(Vec::new()),
            ["spBv1.0", group, kind, edge] => (*group, *kind, *edge, None),
            ["spBv1.0", group, kind, edge, device] => (*group, *kind, *edge, Some(*device)),
            _ => return Err(DecodeError::NotSparkplug),
        };
        let kind = match (kind, device.is_some()) {
            ("NBIRTH", false) => Kind::NodeBirth,
            ("NDATA", false) => Kind::NodeData,
            ("NDEATH", false) => Kind::NodeDeath,
            ("DBIRTH", true) => Kind::DeviceBirth,
            ("DDATA", true) => Kind::DeviceData,
            ("DDEATH", true) => Kind::DeviceDeath,
            ("NCMD", false) | ("DCMD", true) => Kind::Other,
            _ => return Err(DecodeError::NotSparkplug),
        };
        if kind == Kind::Other {
            return Ok(Vec::new());
        }
        count_metrics(payload)?;
        let payload = Payload::decode(payload).map_err(|_| DecodeError::Protobuf)?;
        let key = (group.to_owned(), edge.to_owned());
        if matches!(kind, Kind::NodeDeath | Kind::NodeBirth) {
            self.forget(&key);
        }
        if kind == Kind::NodeDeath {
            return Ok(Vec::new());
        }
        // Only a node's birth makes it remembered, within bounds; anything else from a node not
        // remembered is read by metric names alone.
        let remember = self.nodes.contains_key(&key)
            || (kind == Kind::NodeBirth
                && self.nodes.len() < MAX_NODES
                && group.len() + edge.len() <= MAX_KEY_BYTES);
        if !remember {
            let mut scratch = Node::default();
            let readings = self.read(&mut scratch, kind, &payload, group, edge, device);
            self.declarations -= scratch.aliases.len() + scratch.datatypes.len();
            return Ok(readings);
        }
        let mut node = self.nodes.remove(&key).unwrap_or_default();
        let readings = self.read(&mut node, kind, &payload, group, edge, device);
        self.nodes.insert(key, node);
        Ok(readings)
    }

    /// Forgets what an edge node's births declared.
    fn forget(&mut self, key: &(String, String)) {
        if let Some(node) = self.nodes.remove(key) {
            self.declarations -= node.aliases.len() + node.datatypes.len();
        }
    }

    fn read(
        &mut self,
        node: &mut Node,
        kind: Kind,
        payload: &Payload,
        group: &str,
        edge: &str,
        device: Option<&str>,
    ) -> Vec<Reading> {
        if let Some(seq) = payload.seq {
            let expected = node.seq.map(|last| last.wrapping_add(1) % 256);
            if kind != Kind::NodeBirth && expected.is_some_and(|e| e != seq) {
                self.gaps.increment(1);
                self.seen.0 += 1;
            }
            node.seq = Some(seq);
        }
        if kind == Kind::DeviceDeath {
            return Vec::new();
        }
        let birth = matches!(kind, Kind::NodeBirth | Kind::DeviceBirth);
        let mut reading = header(payload, group, edge, device);
        for metric in &payload.metrics {
            if birth {
                self.declare(node, metric);
            }
            self.read_metric(node, metric, &mut reading);
        }
        vec![reading]
    }

    /// Remembers the name, alias and datatype a birth declares for a metric, within bounds.
    fn declare(&mut self, node: &mut Node, metric: &Metric) {
        if let Some(name) = metric.name.as_deref().filter(|n| !n.is_empty())
            && name.len() <= MAX_NAME_BYTES
            && self.declarations + 2 <= MAX_DECLARATIONS
        {
            let name: Arc<str> = name.into();
            let datatype = metric.datatype.unwrap_or(0);
            if node.datatypes.insert(Arc::clone(&name), datatype).is_none() {
                self.declarations += 1;
            }
            if let Some(alias) = metric.alias
                && node.aliases.insert(alias, (name, datatype)).is_none()
            {
                self.declarations += 1;
            }
        }
    }

    /// Adds a metric's value to `reading` under its name; a metric without a name or a value
    /// hubgate reads is counted as unsupported instead.
    fn read_metric(&mut self, node: &Node, metric: &Metric, reading: &mut Reading) {
        let Some((name, datatype)) = node.resolve(metric) else {
            if metric.alias.is_some() {
                self.unknown_aliases.increment(1);
                self.seen.1 += 1;
            }
            reading.unsupported += 1;
            return;
        };
        let value = if metric.is_null == Some(true) || metric.is_historical == Some(true) {
            None
        } else {
            metric
                .value
                .as_ref()
                .and_then(|v| value(v, datatype.unwrap_or(0)))
        };
        let duplicate = reading.fields.iter().any(|(p, _)| p.as_str() == &*name);
        match value {
            Some(value) if !duplicate => reading.fields.push((name.as_ref().into(), value)),
            _ => reading.unsupported += 1,
        }
    }
}

impl Node {
    /// A metric's name and datatype: its own, else what a birth declared for its name or alias.
    fn resolve(&self, metric: &Metric) -> Option<(Arc<str>, Option<u32>)> {
        let named = metric.name.as_deref().filter(|n| !n.is_empty());
        // Datatype 0 is "unknown": the birth's declaration holds.
        let declared = metric.datatype.filter(|d| *d != 0);
        match (named, metric.alias) {
            (Some(name), _) => Some((
                Arc::<str>::from(name),
                declared.or_else(|| self.datatypes.get(name).copied()),
            )),
            (None, Some(alias)) => self
                .aliases
                .get(&alias)
                .map(|(name, datatype)| (Arc::clone(name), Some(declared.unwrap_or(*datatype)))),
            (None, None) => None,
        }
    }
}

/// A reading's fields from the topic and the payload's header: where it comes from, when, and
/// its sequence number.
fn header(payload: &Payload, group: &str, edge: &str, device: Option<&str>) -> Reading {
    let mut reading = Reading::default();
    reading
        .fields
        .push(("group".into(), Value::Str(group.into())));
    reading
        .fields
        .push(("edge_node".into(), Value::Str(edge.into())));
    if let Some(device) = device {
        reading
            .fields
            .push(("device".into(), Value::Str(device.into())));
    }
    if let Some(ms) = payload.timestamp {
        reading
            .fields
            .push(("timestamp".into(), Value::Float(ms as f64 / 1000.0)));
    }
    if let Some(seq) = payload.seq {
        reading.fields.push((
            "seq".into(),
            Value::Int(i64::try_from(seq).unwrap_or(i64::MAX)),
        ));
    }
    reading
}

/// Refuses a payload of more than [`MAX_FIELDS`] metrics before decoding it (decoded metrics
/// take far more memory than their bytes).
fn count_metrics(mut bytes: &[u8]) -> Result<(), DecodeError> {
    use prost::encoding::{DecodeContext, decode_key, skip_field};
    let mut metrics = 0;
    while !bytes.is_empty() {
        let (tag, wire_type) = decode_key(&mut bytes).map_err(|_| DecodeError::Protobuf)?;
        if tag == 2 {
            metrics += 1;
            if metrics > MAX_FIELDS {
                return Err(DecodeError::TooManyFields);
            }
        }
        skip_field(wire_type, tag, &mut bytes, DecodeContext::default())
            .map_err(|_| DecodeError::Protobuf)?;
    }
    Ok(())
}

/// A metric value as a field value, by its declared datatype: signed integers are carried in
/// two's complement in the unsigned fields.
fn value(v: &MetricValue, datatype: u32) -> Option<Value> {
    Some(match v {
        MetricValue::IntValue(i) => Value::Int(match datatype {
            datatype::INT8 => i64::from(*i as u8 as i8),
            datatype::INT16 => i64::from(*i as u16 as i16),
            datatype::INT32 => i64::from(*i as i32),
            _ => i64::from(*i),
        }),
        MetricValue::LongValue(l) => match datatype {
            datatype::INT64 => Value::Int(*l as i64),
            _ => i64::try_from(*l).map_or(Value::Float(*l as f64), Value::Int),
        },
        MetricValue::FloatValue(f) if f.is_finite() => Value::Float(f64::from(*f)),
        MetricValue::DoubleValue(f) if f.is_finite() => Value::Float(*f),
        MetricValue::BooleanValue(b) => Value::Bool(*b),
        MetricValue::StringValue(s) => Value::Str(s.as_str().into()),
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
