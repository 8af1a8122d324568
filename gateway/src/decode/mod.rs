//! Payload decoders: message bytes into [`Reading`]s, in the format the stream declares
//! ([`PayloadFormat`]).
//!
//! JSON (`format = "json"`): the payload must be one object. Nested objects are flattened into dotted paths
//! (`{"location": {"district": "north"}}` gives `location.district`). Numbers become integers when
//! they are whole and fit in 64 bits, floats otherwise. Arrays and nulls cannot be represented as
//! field values: they are skipped and counted in [`Reading::unsupported`], so the allow-list counts
//! them as dropped. A payload that is not a JSON object, nests deeper than [`MAX_DEPTH`], has more
//! than [`MAX_FIELDS`] members at all levels, or gives two values for one path is rejected whole:
//! the caller drops it and counts it.
//!
//! SenML (`format = "senml_json"` or `"senml_cbor"`): see [`senml`]; one pack can give several
//! readings. FIWARE NGSI entities (`format = "ngsi"`, key-values or normalised): see [`ngsi`].
//! Sparkplug B (`format = "sparkplug_b"`): see [`sparkplug`]; it is the one format with state
//! (the aliases births declare), held by a [`Decoder`]. LoRaWAN uplinks from ChirpStack
//! (`format = "chirpstack"`) and The Things Stack (`format = "ttn"`): see [`lorawan`].
//!
//! Decoders are pure functions over bytes and the time of receipt; they never log what they read.

use std::fmt;

pub use hubgate_privacy::policy::PayloadFormat;
use hubgate_privacy::{Reading, Text, Value};
use serde::Deserializer as _;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};

pub mod lorawan;
pub mod ngsi;
pub mod senml;
pub mod sparkplug;

/// Deepest object nesting accepted.
pub const MAX_DEPTH: usize = 16;

/// Most members (fields, arrays, nulls and objects, at every level) a payload may have.
pub const MAX_FIELDS: usize = 1024;

/// Why a payload was rejected. Messages never quote the payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is not valid JSON (line {line}, column {column})")]
    Syntax { line: usize, column: usize },
    #[error("payload is not a JSON object")]
    NotAnObject,
    #[error("payload nests objects deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("payload has more than {MAX_FIELDS} members")]
    TooManyFields,
    #[error("payload gives more than one value for a field")]
    DuplicateField,
    #[error("payload is not valid CBOR")]
    Cbor,
    #[error("payload is not a SenML pack (an array of records)")]
    NotAPack,
    #[error("invalid SenML: {0}")]
    Senml(&'static str),
    #[error("payload is not an NGSI entity (an object with string \"id\" and \"type\")")]
    NotAnEntity,
    #[error(
        "topic is not in the Sparkplug B namespace (spBv1.0/<group>/<type>/<edge node>[/<device>])"
    )]
    NotSparkplug,
    #[error("payload is not a Sparkplug B protobuf")]
    Protobuf,
    #[error(
        "payload is not a LoRaWAN uplink event of the declared network server (no device identity)"
    )]
    NotAnUplink,
}

/// What one payload decoded into: one reading, or several from a SenML pack.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    One(Reading),
    Many(Vec<Reading>),
}

impl Decoded {
    /// The readings, in payload order.
    pub fn readings(&self) -> &[Reading] {
        match self {
            Decoded::One(reading) => std::slice::from_ref(reading),
            Decoded::Many(readings) => readings,
        }
    }

    /// The readings, in payload order, by value.
    pub fn into_readings(self) -> Readings<'static> {
        match self {
            Decoded::One(reading) => Readings::One(Some(reading)),
            Decoded::Many(readings) => Readings::Many(readings.into_iter()),
        }
    }
}

/// The readings of one payload, each by value: moved out of a decoded payload no other stream
/// needs, or copied from one that others do.
#[derive(Debug)]
pub enum Readings<'a> {
    One(Option<Reading>),
    Many(std::vec::IntoIter<Reading>),
    Copied(std::slice::Iter<'a, Reading>),
}

impl Iterator for Readings<'_> {
    type Item = Reading;

    fn next(&mut self) -> Option<Reading> {
        match self {
            Readings::One(reading) => reading.take(),
            Readings::Many(readings) => readings.next(),
            Readings::Copied(readings) => readings.next().cloned(),
        }
    }
}

/// One message decoded at most once per format, however many streams of that format take it:
/// Sparkplug B births are taken in once, and the work is not repeated.
#[derive(Debug, Default)]
pub struct Once([Option<Result<Decoded, DecodeError>>; 7]);

impl Once {
    pub fn get(
        &mut self,
        decoder: &mut Decoder,
        format: PayloadFormat,
        topic: &str,
        payload: &[u8],
        received_ms: i64,
    ) -> &Result<Decoded, DecodeError> {
        self.0[Self::slot(format)]
            .get_or_insert_with(|| decoder.decode(format, topic, payload, received_ms))
    }

    /// The readings of the message in `format`, by value. With `last` (no other stream of this
    /// format takes the message) they are moved out, not copied; a later call for the format
    /// decodes again.
    pub fn readings(
        &mut self,
        decoder: &mut Decoder,
        format: PayloadFormat,
        topic: &str,
        payload: &[u8],
        received_ms: i64,
        last: bool,
    ) -> Result<Readings<'_>, DecodeError> {
        if !last {
            return match self.get(decoder, format, topic, payload, received_ms) {
                Ok(decoded) => Ok(Readings::Copied(decoded.readings().iter())),
                Err(e) => Err(e.clone()),
            };
        }
        let decoded = self.0[Self::slot(format)]
            .take()
            .unwrap_or_else(|| decoder.decode(format, topic, payload, received_ms));
        decoded.map(Decoded::into_readings)
    }

    fn slot(format: PayloadFormat) -> usize {
        match format {
            PayloadFormat::Json => 0,
            PayloadFormat::SenmlJson => 1,
            PayloadFormat::SenmlCbor => 2,
            PayloadFormat::Ngsi => 3,
            PayloadFormat::SparkplugB => 4,
            PayloadFormat::Chirpstack => 5,
            PayloadFormat::Ttn => 6,
        }
    }
}

/// Decodes payloads, holding what a stateful format remembers between messages (the aliases of
/// Sparkplug B births).
#[derive(Debug, Default)]
pub struct Decoder {
    sparkplug: sparkplug::State,
}

impl Decoder {
    /// Decodes `payload`, received on `topic` at `received_ms`, in `format`.
    pub fn decode(
        &mut self,
        format: PayloadFormat,
        topic: &str,
        payload: &[u8],
        received_ms: i64,
    ) -> Result<Decoded, DecodeError> {
        match format {
            PayloadFormat::Json => json(payload).map(Decoded::One),
            PayloadFormat::SenmlJson => senml::json(payload, received_ms).map(Decoded::Many),
            PayloadFormat::SenmlCbor => senml::cbor(payload, received_ms).map(Decoded::Many),
            PayloadFormat::Ngsi => ngsi::entity(payload).map(Decoded::One),
            PayloadFormat::SparkplugB => self.sparkplug.decode(topic, payload).map(Decoded::Many),
            PayloadFormat::Chirpstack => {
                lorawan::uplink(lorawan::Server::ChirpStack, payload).map(Decoded::One)
            }
            PayloadFormat::Ttn => {
                lorawan::uplink(lorawan::Server::TheThingsStack, payload).map(Decoded::One)
            }
        }
    }
}

/// Decodes a JSON object payload.
pub fn json(payload: &[u8]) -> Result<Reading, DecodeError> {
    // Sensor payloads have a few to a dozen members: room for them at once, not by doubling.
    let mut reading = Reading {
        fields: Vec::with_capacity(16),
        unsupported: 0,
    };
    let mut prefix = String::new();
    let mut de = serde_json::Deserializer::from_slice(payload);
    let mut members = 0;
    let seed = Flatten {
        prefix: &mut prefix,
        out: &mut reading,
        depth: 0,
        members: &mut members,
    };
    match de
        .deserialize_map(ObjectVisitor(seed))
        .and_then(|()| de.end())
    {
        Ok(()) => {}
        Err(err) => {
            return Err(match err.classify() {
                serde_json::error::Category::Data if err.to_string().starts_with(TOO_DEEP) => {
                    DecodeError::TooDeep
                }
                serde_json::error::Category::Data if err.to_string().starts_with(TOO_MANY) => {
                    DecodeError::TooManyFields
                }
                serde_json::error::Category::Data => DecodeError::NotAnObject,
                _ => DecodeError::Syntax {
                    line: err.line(),
                    column: err.column(),
                },
            });
        }
    }
    if has_duplicates(&reading.fields) {
        return Err(DecodeError::DuplicateField);
    }
    Ok(reading)
}

const TOO_DEEP: &str = "hubgate: nesting too deep";
const TOO_MANY: &str = "hubgate: too many members";

fn has_duplicates(fields: &[(Text, Value)]) -> bool {
    if fields.len() <= 16 {
        fields
            .iter()
            .enumerate()
            .any(|(i, (p, _))| fields[..i].iter().any(|(q, _)| q == p))
    } else {
        let mut seen = std::collections::HashSet::with_capacity(fields.len());
        !fields.iter().all(|(p, _)| seen.insert(p.as_str()))
    }
}

struct Flatten<'a> {
    prefix: &'a mut String,
    out: &'a mut Reading,
    depth: usize,
    /// Members seen so far in the payload, at all levels.
    members: &'a mut usize,
}

/// Visits the top-level object, which must be a map.
struct ObjectVisitor<'a>(Flatten<'a>);

impl<'de> Visitor<'de> for ObjectVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        let Flatten {
            prefix,
            out,
            depth,
            members,
        } = self.0;
        visit_object(prefix, out, depth, members, map)
    }
}

fn visit_object<'de, A: MapAccess<'de>>(
    prefix: &mut String,
    out: &mut Reading,
    depth: usize,
    members: &mut usize,
    mut map: A,
) -> Result<(), A::Error> {
    if depth >= MAX_DEPTH {
        return Err(de::Error::custom(TOO_DEEP));
    }
    let base = prefix.len();
    while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
        *members += 1;
        if *members > MAX_FIELDS {
            return Err(de::Error::custom(TOO_MANY));
        }
        if base > 0 {
            prefix.push('.');
        }
        prefix.push_str(&key);
        map.next_value_seed(Flatten {
            prefix: &mut *prefix,
            out: &mut *out,
            depth: depth + 1,
            members: &mut *members,
        })?;
        prefix.truncate(base);
    }
    Ok(())
}

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Flatten<'_> {
    fn push(self, value: Value) {
        self.out
            .fields
            .push((Text::from(self.prefix.as_str()), value));
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.push(Value::Bool(v));
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.push(Value::Int(v));
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.push(i64::try_from(v).map_or(Value::Float(v as f64), Value::Int));
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.push(Value::Float(v));
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.push(Value::Str(v.into()));
        Ok(())
    }

    fn visit_string<E>(self, v: String) -> Result<(), E> {
        self.push(Value::Str(v.into()));
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.out.unsupported += 1;
        Ok(())
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.out.unsupported += 1;
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        visit_object(self.prefix, self.out, self.depth, self.members, map)
    }
}

/// Bytes written as hexadecimal digits, whitespace allowed between them.
pub fn from_hex(hex: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = hex.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn paths(r: &Reading) -> Vec<&str> {
        r.fields.iter().map(|(p, _)| p.as_str()).collect()
    }

    #[test]
    fn objects_are_flattened_and_typed() {
        let r = json(
            br#"{"id":"aq-1","pm25":12.5,"count":3,"big":18446744073709551615,"ok":true,
                "location":{"district":"north","geo":{"lat":51.5}},"bands":[1,2],"note":null}"#,
        )
        .unwrap();
        assert_eq!(
            paths(&r),
            [
                "id",
                "pm25",
                "count",
                "big",
                "ok",
                "location.district",
                "location.geo.lat"
            ]
        );
        assert_eq!(r.fields[1].1, Value::Float(12.5));
        assert_eq!(r.fields[2].1, Value::Int(3));
        assert_eq!(r.fields[3].1, Value::Float(18446744073709551615.0));
        assert_eq!(r.fields[4].1, Value::Bool(true));
        assert_eq!(r.unsupported, 2, "the array and the null are counted");
    }

    #[test]
    fn malformed_payloads_are_rejected() {
        assert!(matches!(json(b"{\"a\":"), Err(DecodeError::Syntax { .. })));
        assert!(matches!(
            json(b"{\"a\":1} trailing"),
            Err(DecodeError::Syntax { .. })
        ));
        assert!(matches!(json(b"\xff\xfe"), Err(DecodeError::Syntax { .. })));
        assert!(matches!(json(b""), Err(DecodeError::Syntax { .. })));
        assert_eq!(json(b"[1,2]"), Err(DecodeError::NotAnObject));
        assert_eq!(json(b"42"), Err(DecodeError::NotAnObject));
        assert_eq!(json(br#"{"a":1,"a":2}"#), Err(DecodeError::DuplicateField));
        assert_eq!(
            json(br#"{"a.b":1,"a":{"b":2}}"#),
            Err(DecodeError::DuplicateField)
        );
        let deep = format!("{}1{}", "{\"a\":".repeat(40), "}".repeat(40));
        assert_eq!(json(deep.as_bytes()), Err(DecodeError::TooDeep));
        let ok = format!("{}1{}", "{\"a\":".repeat(MAX_DEPTH), "}".repeat(MAX_DEPTH));
        assert!(json(ok.as_bytes()).is_ok());
        // Members are counted at every level, arrays and nulls included.
        let members = |n: usize| {
            let inner: Vec<String> = (0..n).map(|i| format!("\"f{i}\":null")).collect();
            format!("{{\"o\":{{{}}}}}", inner.join(","))
        };
        assert!(json(members(MAX_FIELDS - 1).as_bytes()).is_ok());
        assert_eq!(
            json(members(MAX_FIELDS).as_bytes()),
            Err(DecodeError::TooManyFields)
        );
    }

    #[test]
    fn error_messages_never_quote_the_payload() {
        let secret = "aa:bb:cc:dd:ee:ff";
        for payload in [format!("{{\"mac\":\"{secret}\""), format!("[\"{secret}\"]")] {
            let msg = json(payload.as_bytes()).unwrap_err().to_string();
            assert!(!msg.contains(secret), "{msg}");
        }
    }

    proptest! {
        /// Any bytes: the decoder returns, and an accepted reading has unique, non-empty paths.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(r) = json(&bytes) {
                prop_assert!(!has_duplicates(&r.fields));
            }
        }

        /// Flat objects of scalars decode to exactly their members.
        #[test]
        fn flat_objects_round_trip(members in prop::collection::btree_map("[a-z]{1,8}", any::<i64>(), 0..20)) {
            let payload = serde_json::to_vec(&members).unwrap();
            let r = json(&payload).unwrap();
            let got: Vec<(Text, Value)> = r.fields;
            let want: Vec<(Text, Value)> = members.into_iter().map(|(k, v)| (k.into(), Value::Int(v))).collect();
            prop_assert_eq!(got, want);
        }
    }
}
