//! The `hubgate.v1.Record` message as the gateway writes it: the one owner of its wire layout.
//!
//! A record is encoded once, when the pipeline keeps it, without its sequence number
//! ([`encode_body`]); the store appends the sequence ([`SEQUENCE_FIELD`]) when it stages the
//! record, and from then on the same bytes go to the outbox, the memory tail, every subscriber,
//! the upstream hub and NATS. A test compares the hand-written encoding with prost's.

use hubgate_privacy::{Record, Value};
use hubgate_proto::v1;

/// Field number of `sequence` in `hubgate.v1.Record`: appended by the store to a body
/// [`encode_body`] wrote without it (a decoder keeps the last value of a field).
pub const SEQUENCE_FIELD: u32 = 2;

/// Encodes a filtered record as a `hubgate.v1.Record` message without its sequence (the store
/// appends it as [`SEQUENCE_FIELD`]), byte for byte as prost would encode the message,
/// without building it (the tests compare the two). Returns the bytes written, and those of the
/// field data alone (without stream, time and policy hash): what a subscriber receives but the
/// sequence, and what is left of the payload's content.
pub fn encode_body(
    stream: &str,
    policy_hash: &str,
    record: &Record,
    buf: &mut Vec<u8>,
) -> (usize, usize) {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    fn put_str(tag: u32, s: &str, buf: &mut Vec<u8>) {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(s.len() as u64, buf);
        buf.extend_from_slice(s.as_bytes());
    }
    fn str_len(tag: u32, s: &str) -> usize {
        key_len(tag) + encoded_len_varint(s.len() as u64) + s.len()
    }
    let start = buf.len();
    if !stream.is_empty() {
        put_str(1, stream, buf);
    }
    let time = event_time(record.event_time_ms);
    prost::encoding::message::encode(3, &time, buf);
    if !policy_hash.is_empty() {
        put_str(4, policy_hash, buf);
    }
    let fields_start = buf.len();
    for (path, value) in &record.fields {
        // A map entry: the key as field 1, the `Value` message as field 2.
        let value_len = match value {
            Value::Float(_) => key_len(1) + 8,
            Value::Int(i) => key_len(2) + encoded_len_varint(*i as u64),
            Value::Str(s) => str_len(3, s),
            Value::Bool(_) => key_len(4) + 1,
        };
        let key = if path.is_empty() { 0 } else { str_len(1, path) };
        let entry_len = key + key_len(2) + encoded_len_varint(value_len as u64) + value_len;
        encode_key(5, WireType::LengthDelimited, buf);
        encode_varint(entry_len as u64, buf);
        if !path.is_empty() {
            put_str(1, path, buf);
        }
        encode_key(2, WireType::LengthDelimited, buf);
        encode_varint(value_len as u64, buf);
        match value {
            Value::Float(f) => {
                encode_key(1, WireType::SixtyFourBit, buf);
                buf.extend_from_slice(&f.to_le_bytes());
            }
            Value::Int(i) => {
                encode_key(2, WireType::Varint, buf);
                encode_varint(*i as u64, buf);
            }
            Value::Str(s) => put_str(3, s, buf),
            Value::Bool(b) => {
                encode_key(4, WireType::Varint, buf);
                buf.push(u8::from(*b));
            }
        }
    }
    (buf.len() - start, buf.len() - fields_start)
}

/// The body of a stored record: its bytes less the sequence the store appended
/// ([`SEQUENCE_FIELD`], `sequence`), to be staged again under another sequence.
pub fn without_sequence(bytes: &[u8], sequence: u64) -> &[u8] {
    use prost::encoding::{encoded_len_varint, key_len};
    let suffix = key_len(SEQUENCE_FIELD) + encoded_len_varint(sequence);
    &bytes[..bytes.len().saturating_sub(suffix)]
}

/// An event time in milliseconds as a protobuf timestamp.
pub fn event_time(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

pub fn from_proto_value(value: v1::Value) -> Option<Value> {
    use v1::value::Kind;
    Some(match value.kind? {
        Kind::IntValue(i) => Value::Int(i),
        Kind::DoubleValue(f) => Value::Float(f),
        Kind::StringValue(s) => Value::Str(s.into()),
        Kind::BoolValue(b) => Value::Bool(b),
    })
}

pub fn to_proto_value(value: Value) -> v1::Value {
    use v1::value::Kind;
    let kind = match value {
        Value::Int(i) => Kind::IntValue(i),
        Value::Float(f) => Kind::DoubleValue(f),
        Value::Str(s) => Kind::StringValue(s.into_string()),
        Value::Bool(b) => Kind::BoolValue(b),
    };
    v1::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message as _;

    /// A filtered record in its gRPC form, built as a message (sequence 0).
    fn to_proto(stream: &str, policy_hash: &str, record: Record) -> v1::Record {
        v1::Record {
            stream: stream.to_owned(),
            sequence: 0,
            event_time: Some(event_time(record.event_time_ms)),
            policy_hash: policy_hash.to_owned(),
            fields: record
                .fields
                .into_iter()
                .map(|(path, value)| (path.into_string(), to_proto_value(value)))
                .collect(),
            origin: String::new(),
            origin_sequence: 0,
        }
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(Value::Int),
            any::<f64>()
                .prop_filter("comparable", |f| !f.is_nan())
                .prop_map(Value::Float),
            ".{0,40}".prop_map(|s| Value::Str(s.into())),
            any::<bool>().prop_map(Value::Bool),
        ]
    }

    proptest! {
        /// The hand-written encoding decodes to the message prost would have encoded, with the
        /// same sizes.
        #[test]
        fn encode_body_is_the_record_message(
            stream in "[a-z_]{0,12}",
            hash in "[0-9a-f]{0,64}",
            time in any::<i64>(),
            fields in proptest::collection::btree_map("[a-z.]{0,12}", value(), 0..8),
        ) {
            let record = Record {
                event_time_ms: time,
                fields: fields.into_iter().map(|(p, v)| (p.into(), v)).collect(),
            };
            let mut buf = vec![7];
            let (bytes, field_bytes) = encode_body(&stream, &hash, &record, &mut buf);
            prop_assert_eq!(buf[0], 7, "what the buffer held is kept");
            let want = to_proto(&stream, &hash, record);
            prop_assert_eq!(bytes, want.encoded_len());
            prop_assert_eq!(bytes, buf.len() - 1);
            let fields_len = prost::encoding::hash_map::encoded_len(
                prost::encoding::string::encoded_len,
                prost::encoding::message::encoded_len,
                5,
                &want.fields,
            );
            prop_assert_eq!(field_bytes, fields_len);
            prop_assert_eq!(v1::Record::decode(&buf[1..]).expect("decodes"), want);
        }
    }
}
