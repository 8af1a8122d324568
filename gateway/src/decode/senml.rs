//! SenML (RFC 8428, Sensor Measurement Lists) in its JSON and CBOR representations.
//!
//! A SenML pack is an array of records. Base fields (`bn`, `bt`, `bu`, `bv`, `bs`, `bver`) apply
//! to the record they appear in and to every later record until changed, and each record is
//! resolved as the RFC's section 4.6 says: name = base name + name, time = base time + time (a
//! time below 2^28 s is relative to when the gateway received the pack), unit = unit or base unit,
//! value = base value + value, sum = base sum + sum.
//!
//! Resolved records become readings. Consecutive records with the same base name and the same
//! resolved time make one reading, so a device reporting several measurements at once gives one
//! record downstream:
//!
//! | reading field | from |
//! |---|---|
//! | `bn` | the base name, when there is one (usually the device: pseudonymise it, or leave it out) |
//! | `t` | the resolved time, in seconds since the Unix epoch (declare `time_field = "t"`) |
//! | `<n>.v`, `<n>.vs`, `<n>.vb`, `<n>.vd` | the record's value, string, boolean or data value (`vd` as base64url text) |
//! | `<n>.s`, `<n>.u`, `<n>.ut` | the record's sum, unit and update time |
//!
//! `<n>` is the record's own name as written (`temperature`), without the base name; a record
//! with no name of its own gives `v`, `u`, … at the top level. A name the base name does not
//! carry (a whole device URN in `n`) therefore appears in the field path: the allow-list drops it
//! unless the policy declares it.
//!
//! Rejected whole (dropped and counted, like any payload that does not decode): a payload that is
//! not an array of maps; a record with an invalid resolved name, with more than one value field,
//! with neither value nor sum, with a field of the wrong type, or with an unknown field whose
//! name ends in `_` (RFC 8428 §4.4: such fields must be understood); a base version above 10;
//! more than [`MAX_FIELDS`](super::MAX_FIELDS) records. Unknown fields without the `_` suffix are
//! ignored and counted as unsupported values.

use std::fmt;

use base64::Engine as _;
use compact_str::format_compact;
use hubgate_privacy::{Reading, Text, Value};
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{DecodeError, MAX_FIELDS};

/// The SenML version hubgate implements (RFC 8428).
const VERSION: i64 = 10;

/// Times below this many seconds are relative to "now" (RFC 8428 §4.5.3).
const RELATIVE_BELOW: f64 = 268_435_456.0; // 2^28

/// Decodes a SenML JSON pack received at `received_ms`.
pub fn json(payload: &[u8], received_ms: i64) -> Result<Vec<Reading>, DecodeError> {
    let pack: Pack = serde_json::from_slice(payload).map_err(|err| match err.classify() {
        serde_json::error::Category::Data => DecodeError::NotAPack,
        _ => DecodeError::Syntax {
            line: err.line(),
            column: err.column(),
        },
    })?;
    resolve(pack, received_ms)
}

/// Decodes a SenML CBOR pack received at `received_ms`.
pub fn cbor(payload: &[u8], received_ms: i64) -> Result<Vec<Reading>, DecodeError> {
    let mut rest = payload;
    let pack: Pack = ciborium::from_reader(&mut rest).map_err(|err| match err {
        ciborium::de::Error::Semantic(..) => DecodeError::NotAPack,
        ciborium::de::Error::RecursionLimitExceeded => DecodeError::TooDeep,
        ciborium::de::Error::Io(_) | ciborium::de::Error::Syntax(_) => DecodeError::Cbor,
    })?;
    // One pack per payload: bytes after it are an error, as for JSON.
    if !rest.is_empty() {
        return Err(DecodeError::Cbor);
    }
    resolve(pack, received_ms)
}

/// A field label: the JSON name or the CBOR integer of RFC 8428 §6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    BaseVersion,
    BaseName,
    BaseTime,
    BaseUnit,
    BaseValue,
    BaseSum,
    Name,
    Unit,
    Value,
    StringValue,
    BoolValue,
    DataValue,
    Sum,
    Time,
    UpdateTime,
    /// A field hubgate does not know; `true` if it must be understood (name ends in `_`).
    Unknown(bool),
}

impl Label {
    fn from_name(name: &str) -> Label {
        match name {
            "bver" => Label::BaseVersion,
            "bn" => Label::BaseName,
            "bt" => Label::BaseTime,
            "bu" => Label::BaseUnit,
            "bv" => Label::BaseValue,
            "bs" => Label::BaseSum,
            "n" => Label::Name,
            "u" => Label::Unit,
            "v" => Label::Value,
            "vs" => Label::StringValue,
            "vb" => Label::BoolValue,
            "vd" => Label::DataValue,
            "s" => Label::Sum,
            "t" => Label::Time,
            "ut" => Label::UpdateTime,
            other => Label::Unknown(other.ends_with('_')),
        }
    }

    fn from_cbor(label: i64) -> Label {
        match label {
            -1 => Label::BaseVersion,
            -2 => Label::BaseName,
            -3 => Label::BaseTime,
            -4 => Label::BaseUnit,
            -5 => Label::BaseValue,
            -6 => Label::BaseSum,
            0 => Label::Name,
            1 => Label::Unit,
            2 => Label::Value,
            3 => Label::StringValue,
            4 => Label::BoolValue,
            8 => Label::DataValue,
            5 => Label::Sum,
            6 => Label::Time,
            7 => Label::UpdateTime,
            // Negative labels are base fields, which must be understood (RFC 8428 §12.2).
            other => Label::Unknown(other < 0),
        }
    }
}

impl<'de> Deserialize<'de> for Label {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct LabelVisitor;
        impl Visitor<'_> for LabelVisitor {
            type Value = Label;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a SenML field label")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Label, E> {
                Ok(Label::from_name(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Label, E> {
                Ok(Label::from_cbor(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Label, E> {
                Ok(i64::try_from(v).map_or(Label::Unknown(false), Label::from_cbor))
            }
        }
        d.deserialize_any(LabelVisitor)
    }
}

/// A field's value, before its type is checked against its label.
#[derive(Debug, Clone, PartialEq)]
enum Item {
    Int(i64),
    Float(f64),
    Text(String),
    Bool(bool),
    Bytes(Vec<u8>),
    /// Arrays, maps, nulls and other values no SenML field takes.
    Other,
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ItemVisitor;
        impl<'de> Visitor<'de> for ItemVisitor {
            type Value = Item;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a SenML field value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Item, E> {
                Ok(Item::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Item, E> {
                Ok(Item::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Item, E> {
                Ok(i64::try_from(v).map_or(Item::Float(v as f64), Item::Int))
            }
            fn visit_i128<E>(self, v: i128) -> Result<Item, E> {
                Ok(i64::try_from(v).map_or(Item::Float(v as f64), Item::Int))
            }
            fn visit_u128<E>(self, v: u128) -> Result<Item, E> {
                Ok(i64::try_from(v).map_or(Item::Float(v as f64), Item::Int))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Item, E> {
                Ok(Item::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Item, E> {
                Ok(Item::Text(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Item, E> {
                Ok(Item::Text(v))
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Item, E> {
                Ok(Item::Bytes(v.to_vec()))
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Item, E> {
                Ok(Item::Bytes(v))
            }
            fn visit_unit<E>(self) -> Result<Item, E> {
                Ok(Item::Other)
            }
            fn visit_none<E>(self) -> Result<Item, E> {
                Ok(Item::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Item::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Item, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Item::Other)
            }
        }
        d.deserialize_any(ItemVisitor)
    }
}

/// One record's fields in payload order, duplicates kept so that they can be refused.
#[derive(Debug)]
struct RawRecord(Vec<(Label, Item)>);

impl<'de> Deserialize<'de> for RawRecord {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RecordVisitor;
        impl<'de> Visitor<'de> for RecordVisitor {
            type Value = RawRecord;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a SenML record (a map)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawRecord, A::Error> {
                let mut fields = Vec::new();
                while let Some(entry) = map.next_entry::<Label, Item>()? {
                    if fields.len() >= 32 {
                        return Err(de::Error::custom("too many fields in a SenML record"));
                    }
                    fields.push(entry);
                }
                Ok(RawRecord(fields))
            }
        }
        d.deserialize_map(RecordVisitor)
    }
}

/// A pack: at most [`MAX_FIELDS`] records.
#[derive(Debug)]
struct Pack(Vec<RawRecord>);

impl<'de> Deserialize<'de> for Pack {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PackVisitor;
        impl<'de> Visitor<'de> for PackVisitor {
            type Value = Pack;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a SenML pack (an array of records)")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Pack, A::Error> {
                let mut records = Vec::new();
                while let Some(record) = seq.next_element::<RawRecord>()? {
                    if records.len() >= MAX_FIELDS {
                        return Err(de::Error::custom("too many records in a SenML pack"));
                    }
                    records.push(record);
                }
                Ok(Pack(records))
            }
        }
        d.deserialize_seq(PackVisitor)
    }
}

/// A number as SenML carries it: integers stay integers while the arithmetic allows.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Number {
    Int(i64),
    Float(f64),
}

impl Number {
    fn from_item(item: Item, what: &'static str) -> Result<Number, DecodeError> {
        match item {
            Item::Int(i) => Ok(Number::Int(i)),
            Item::Float(f) if f.is_finite() => Ok(Number::Float(f)),
            _ => Err(DecodeError::Senml(what)),
        }
    }

    fn add(self, other: Number) -> Number {
        match (self, other) {
            (Number::Int(a), Number::Int(b)) => a
                .checked_add(b)
                .map_or(Number::Float(a as f64 + b as f64), Number::Int),
            (a, b) => Number::Float(a.as_f64() + b.as_f64()),
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
        }
    }

    fn into_value(self) -> Value {
        match self {
            Number::Int(i) => Value::Int(i),
            Number::Float(f) => Value::Float(f),
        }
    }
}

impl Default for Number {
    fn default() -> Self {
        Number::Int(0)
    }
}

/// The base fields in force.
#[derive(Debug, Default)]
struct Base {
    /// The pack's version, once a record gave one: every record must give the same.
    version: Option<i64>,
    name: String,
    time: Option<Number>,
    unit: Option<String>,
    value: Option<Number>,
    sum: Option<Number>,
}

/// A record after resolution, before it joins a reading.
#[derive(Debug, Default)]
struct Resolved {
    name: String,
    unit: Option<String>,
    value: Option<Value>,
    value_label: &'static str,
    sum: Option<Number>,
    time: Number,
    update_time: Option<Number>,
    unsupported: u32,
}

fn text(item: Item, what: &'static str) -> Result<String, DecodeError> {
    match item {
        Item::Text(s) => Ok(s),
        _ => Err(DecodeError::Senml(what)),
    }
}

fn resolve(pack: Pack, received_ms: i64) -> Result<Vec<Reading>, DecodeError> {
    let now = received_ms as f64 / 1000.0;
    let mut base = Base::default();
    let mut readings: Vec<Reading> = Vec::new();
    // Base name and resolved time of the reading being filled.
    let mut current: Option<(String, f64)> = None;
    for RawRecord(fields) in pack.0 {
        let record = resolve_record(fields, &mut base)?;
        // The first record fixes the pack's version: its own bver, or 10 (RFC 8428 §4.4).
        base.version.get_or_insert(VERSION);
        let Some(record) = record else {
            continue;
        };
        let resolved_name = format!("{}{}", base.name, record.name);
        if !valid_name(&resolved_name) {
            return Err(DecodeError::Senml(
                "a record's resolved name is not a valid SenML name",
            ));
        }
        let time = match record.time.as_f64() {
            t if t < RELATIVE_BELOW => now + t,
            t => t,
        };
        let prefix = if record.name.is_empty() {
            String::new()
        } else {
            format!("{}.", record.name)
        };
        let mut own: Vec<(Text, Value)> = Vec::with_capacity(4);
        if let Some(value) = record.value {
            own.push((format_compact!("{prefix}{}", record.value_label), value));
        }
        if let Some(sum) = record.sum {
            own.push((format_compact!("{prefix}s"), sum.into_value()));
        }
        if let Some(unit) = record.unit {
            own.push((format_compact!("{prefix}u"), Value::Str(unit.into())));
        }
        if let Some(ut) = record.update_time {
            own.push((format_compact!("{prefix}ut"), ut.into_value()));
        }
        // A measurement named again, or a path given again, starts another reading.
        let starts_new = match (&current, readings.last()) {
            (Some((name, t)), Some(reading)) => {
                *name != base.name
                    || *t != time
                    || reading.fields.iter().any(|(p, _)| {
                        (!prefix.is_empty() && p.starts_with(&prefix))
                            || own.iter().any(|(q, _)| q == p)
                    })
            }
            _ => true,
        };
        if starts_new {
            let mut reading = Reading::default();
            if !base.name.is_empty() {
                reading
                    .fields
                    .push(("bn".into(), Value::Str(base.name.as_str().into())));
            }
            reading.fields.push(("t".into(), seconds(time)));
            readings.push(reading);
            current = Some((base.name.clone(), time));
        }
        let reading = readings.last_mut().ok_or(DecodeError::NotAPack)?;
        reading.unsupported += record.unsupported;
        reading.fields.append(&mut own);
        if reading.fields.len() > MAX_FIELDS {
            return Err(DecodeError::TooManyFields);
        }
    }
    if readings.is_empty() {
        return Err(DecodeError::Senml("the pack has no records"));
    }
    Ok(readings)
}

/// Seconds as a value: an integer when whole.
fn seconds(t: f64) -> Value {
    if t.fract() == 0.0 && t.abs() < 9.0e15 {
        Value::Int(t as i64)
    } else {
        Value::Float(t)
    }
}

/// Applies one record's base fields to `base` and resolves the rest. A record of base fields alone
/// (RFC 8428 §5.1.7 opens a pack with one) gives nothing.
fn resolve_record(
    fields: Vec<(Label, Item)>,
    base: &mut Base,
) -> Result<Option<Resolved>, DecodeError> {
    let mut seen: Vec<Label> = Vec::with_capacity(fields.len());
    let mut regular = false;
    let mut out = Resolved::default();
    let mut own = Own::default();
    for (label, item) in fields {
        if !matches!(label, Label::Unknown(_)) {
            if seen.contains(&label) {
                return Err(DecodeError::DuplicateField);
            }
            seen.push(label);
        }
        regular |= !matches!(
            label,
            Label::BaseVersion
                | Label::BaseName
                | Label::BaseTime
                | Label::BaseUnit
                | Label::BaseValue
                | Label::BaseSum
                | Label::Unknown(false)
        );
        read_field(label, item, base, &mut out, &mut own)?;
    }
    if own.values > 1 {
        return Err(DecodeError::Senml("a record has more than one value"));
    }
    if let Some(v) = own.value {
        out.value = Some(base.value.map_or(v, |b| b.add(v)).into_value());
    }
    out.sum = match (base.sum, own.sum) {
        (Some(b), Some(s)) => Some(b.add(s)),
        (None, Some(s)) => Some(s),
        // A base sum alone gives the record its sum (RFC 8428 §4.6).
        (Some(b), None) => Some(b),
        (None, None) => None,
    };
    if out.value.is_none() && out.sum.is_none() {
        if !regular {
            return Ok(None);
        }
        return Err(DecodeError::Senml("a record has neither a value nor a sum"));
    }
    if out.unit.is_none() {
        out.unit.clone_from(&base.unit);
    }
    out.time = match (base.time, own.time) {
        (Some(b), Some(t)) => b.add(t),
        (Some(b), None) => b,
        (None, Some(t)) => t,
        (None, None) => Number::Int(0),
    };
    Ok(Some(out))
}

/// A record's own fields that the base fields in force add to, as read.
#[derive(Debug, Default)]
struct Own {
    value: Option<Number>,
    sum: Option<Number>,
    time: Option<Number>,
    /// Value fields given (`v`, `vs`, `vb`, `vd`): a record may have one.
    values: u32,
}

/// Reads one field of a record: a base field into `base`, one of the record's own into `out`,
/// or into `own` if a base field adds to it.
fn read_field(
    label: Label,
    item: Item,
    base: &mut Base,
    out: &mut Resolved,
    own: &mut Own,
) -> Result<(), DecodeError> {
    match label {
        Label::BaseVersion => base.version = Some(version(item, base.version)?),
        Label::BaseName => base.name = text(item, "bn must be a string")?,
        Label::BaseTime => base.time = Some(Number::from_item(item, "bt must be a number")?),
        Label::BaseUnit => base.unit = Some(text(item, "bu must be a string")?),
        Label::BaseValue => base.value = Some(Number::from_item(item, "bv must be a number")?),
        Label::BaseSum => base.sum = Some(Number::from_item(item, "bs must be a number")?),
        Label::Name => out.name = text(item, "n must be a string")?,
        Label::Unit => out.unit = Some(text(item, "u must be a string")?),
        Label::Value => {
            own.values += 1;
            own.value = Some(Number::from_item(item, "v must be a number")?);
            out.value_label = "v";
        }
        Label::StringValue => {
            own.values += 1;
            out.value = Some(Value::Str(text(item, "vs must be a string")?.into()));
            out.value_label = "vs";
        }
        Label::BoolValue => {
            own.values += 1;
            let Item::Bool(b) = item else {
                return Err(DecodeError::Senml("vb must be a boolean"));
            };
            out.value = Some(Value::Bool(b));
            out.value_label = "vb";
        }
        Label::DataValue => {
            own.values += 1;
            out.value = Some(Value::Str(data(item)?.into()));
            out.value_label = "vd";
        }
        Label::Sum => own.sum = Some(Number::from_item(item, "s must be a number")?),
        Label::Time => own.time = Some(Number::from_item(item, "t must be a number")?),
        Label::UpdateTime => {
            out.update_time = Some(Number::from_item(item, "ut must be a number")?)
        }
        Label::Unknown(true) => {
            return Err(DecodeError::Senml(
                "a field that must be understood is not known",
            ));
        }
        Label::Unknown(false) => out.unsupported += 1,
    }
    Ok(())
}

/// A record's `bver`, which must agree with the version of the pack's records so far.
fn version(item: Item, pack: Option<i64>) -> Result<i64, DecodeError> {
    match item {
        Item::Int(v) if v > VERSION => Err(DecodeError::Senml(
            "the pack's SenML version is newer than 10",
        )),
        Item::Int(v) if v >= 1 && pack.is_none_or(|w| w == v) => Ok(v),
        Item::Int(v) if v >= 1 => Err(DecodeError::Senml(
            "records of one pack give different versions",
        )),
        _ => Err(DecodeError::Senml("bver must be a positive integer")),
    }
}

/// A `vd` value as base64url text.
fn data(item: Item) -> Result<String, DecodeError> {
    match item {
        // JSON carries data as base64url text (RFC 8428 §4.3); it passes as written once it is
        // known to be base64url.
        Item::Text(s) if BASE64URL.decode(&s).is_ok() => Ok(s),
        // CBOR carries it as a byte string; it is written as base64url text.
        Item::Bytes(b) => Ok(BASE64URL.encode(b)),
        _ => Err(DecodeError::Senml("vd must be base64url data")),
    }
}

/// RFC 8428 §4.5.1: letters, digits and `-:./_`, starting with a letter or digit.
fn valid_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-:./_".contains(&b))
}

/// Data values in JSON are base64url, padding optional (RFC 8428 §4.3, RFC 4648 §5).
const BASE64URL: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

#[cfg(test)]
mod tests;
