//! Decoded readings and filtered records.
//!
//! A payload decoder turns a message into a [`Reading`]: a flat list of `(path, value)` pairs, where
//! nested objects are flattened with `.` separators (`{"location": {"lat": 1}}` becomes
//! `location.lat`). The privacy chain turns a reading into a [`Record`] that holds only what the
//! policy lets through.

use serde::Serialize;

/// A field path or a string value. Strings of up to 24 bytes, nearly all of them, are kept
/// inline, without an allocation of their own: a reading is decoded, filtered and encoded with
/// few allocations.
pub type Text = compact_str::CompactString;

/// A scalar field value.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Value {
    Int(i64),
    Float(f64),
    Str(Text),
    Bool(bool),
}

impl Value {
    /// The value's type, as shown to operators.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Int(_) => "integer",
            Value::Float(_) => "float",
            Value::Str(_) => "string",
            Value::Bool(_) => "boolean",
        }
    }
}

/// A decoded reading, before any privacy stage.
///
/// It holds raw values: it must never be logged, persisted or sent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    /// Flattened field paths and their values, in payload order.
    pub fields: Vec<(Text, Value)>,
    /// Payload values the decoder could not represent (arrays, nulls); they are dropped.
    pub unsupported: u32,
}

/// A filtered record: what remains of a reading after the privacy chain.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Record {
    /// Event time in milliseconds since the Unix epoch, already coarsened where the policy says so.
    pub event_time_ms: i64,
    /// Field paths and values that passed the policy, in payload order.
    pub fields: Vec<(Text, Value)>,
}
