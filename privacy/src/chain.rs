//! The privacy chain: the stages a reading goes through before anything of it is kept.
//!
//! Each stage is a small synchronous function over one reading. The chain today:
//!
//! 1. **Event time**: the stream's `time_field`, if declared and present, becomes the record's
//!    event time (Unix seconds, or RFC 3339 in UTC); a value that is not a time rejects the reading.
//!    Without it the event time is the time the gateway received the message.
//! 2. **Allow-list** (ISO/IEC 20889 suppression, record-level): only declared field paths pass.
//!    Fail closed: an undeclared field, or a value the decoder could not represent, is dropped and
//!    counted; nothing passes by default.
//!
//! The chain never sees a clock: the receive time comes in through [`Context`].

use crate::policy::{StreamPolicy, Treatment};
use crate::value::{Reading, Record, Value};

/// What the caller knows about the message that the policy may use.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// When the gateway received the message, in milliseconds since the Unix epoch.
    pub received_ms: i64,
}

/// A reading the chain refused as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the event time field holds no valid time")]
    BadTime,
}

impl Rejection {
    /// Short, stable name for metric labels.
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::BadTime => "bad_time",
        }
    }
}

/// The result of the chain for one reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub record: Record,
    /// Fields the allow-list dropped (undeclared, or not representable).
    pub fields_dropped: u32,
}

/// Runs every stage of `policy` over `reading`.
pub fn apply(
    policy: &StreamPolicy,
    mut reading: Reading,
    ctx: &Context,
) -> Result<Outcome, Rejection> {
    let event_time_ms = match &policy.time_field {
        Some(path) => match take_field(&mut reading, path) {
            Some(value) => event_time(&value).ok_or(Rejection::BadTime)?,
            None => ctx.received_ms,
        },
        None => ctx.received_ms,
    };
    let fields_dropped = allow_list(policy, &mut reading);
    Ok(Outcome {
        record: Record {
            event_time_ms,
            fields: reading.fields,
        },
        fields_dropped,
    })
}

/// Keeps only the fields the policy declares; returns how many were dropped.
///
/// Invariant (property-tested): every path in the output is a declared path.
pub fn allow_list(policy: &StreamPolicy, reading: &mut Reading) -> u32 {
    let before = reading.fields.len();
    reading
        .fields
        .retain(|(path, _)| matches!(policy.treatment(path), Some(Treatment::Keep)));
    let dropped = before - reading.fields.len();
    u32::try_from(dropped)
        .unwrap_or(u32::MAX)
        .saturating_add(reading.unsupported)
}

fn take_field(reading: &mut Reading, path: &str) -> Option<Value> {
    let i = reading.fields.iter().position(|(p, _)| p == path)?;
    Some(reading.fields.remove(i).1)
}

/// Latest accepted event time: year 9999. Earliest: the Unix epoch.
const MAX_EVENT_MS: i64 = 253_402_300_799_999;

fn event_time(value: &Value) -> Option<i64> {
    let ms = match value {
        Value::Int(secs) => secs.checked_mul(1000)?,
        Value::Float(secs) if secs.is_finite() => (secs * 1000.0).round() as i64,
        Value::Str(s) => {
            let t = humantime::parse_rfc3339(s).ok()?;
            let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
            i64::try_from(d.as_millis()).ok()?
        }
        _ => return None,
    };
    (0..=MAX_EVENT_MS).contains(&ms).then_some(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy;
    use proptest::prelude::*;

    fn stream(time_field: Option<&str>, fields: &[&str]) -> StreamPolicy {
        let mut src = String::from(
            "[[stream]]\nname = \"s\"\ntopics = [\"t\"]\npurpose = \"p\"\nlegal_basis = \"b\"\nprinciples = [\"shared_prosperity\"]\nretention = \"1d\"\n",
        );
        if let Some(t) = time_field {
            src.push_str(&format!("time_field = \"{t}\"\n"));
        }
        src.push_str("[stream.fields]\n");
        for f in fields {
            src.push_str(&format!("\"{f}\" = \"keep\"\n"));
        }
        policy::from_toml(&src).unwrap().0.streams()[0].clone()
    }

    fn reading(fields: &[(&str, Value)]) -> Reading {
        Reading {
            fields: fields
                .iter()
                .map(|(p, v)| (p.to_string(), v.clone()))
                .collect(),
            unsupported: 0,
        }
    }

    const CTX: Context = Context {
        received_ms: 1_700_000_000_000,
    };

    #[test]
    fn undeclared_fields_are_dropped_and_counted() {
        let policy = stream(None, &["pm25", "location.district"]);
        let mut r = reading(&[
            ("pm25", Value::Float(12.5)),
            ("mac", Value::Str("aa:bb:cc:dd:ee:ff".into())),
            ("location.district", Value::Str("north".into())),
            ("location.lat", Value::Float(51.5)),
        ]);
        r.unsupported = 1;
        let out = apply(&policy, r, &CTX).unwrap();
        assert_eq!(out.fields_dropped, 3);
        assert_eq!(
            out.record.fields,
            vec![
                ("pm25".into(), Value::Float(12.5)),
                ("location.district".into(), Value::Str("north".into()))
            ]
        );
        assert_eq!(out.record.event_time_ms, CTX.received_ms);
    }

    #[test]
    fn event_time_comes_from_the_declared_field() {
        let policy = stream(Some("ts"), &["v"]);
        let r = reading(&[("ts", Value::Int(1_600_000_000)), ("v", Value::Int(1))]);
        let out = apply(&policy, r, &CTX).unwrap();
        assert_eq!(out.record.event_time_ms, 1_600_000_000_000);
        assert_eq!(
            out.fields_dropped, 0,
            "the time field is consumed, not dropped"
        );

        let r = reading(&[("ts", Value::Str("2024-03-01T12:00:00Z".into()))]);
        assert_eq!(
            apply(&policy, r, &CTX).unwrap().record.event_time_ms,
            1_709_294_400_000
        );

        let r = reading(&[("ts", Value::Float(1.5))]);
        assert_eq!(apply(&policy, r, &CTX).unwrap().record.event_time_ms, 1500);

        for bad in [
            Value::Str("yesterday".into()),
            Value::Bool(true),
            Value::Int(-5),
            Value::Int(i64::MAX),
        ] {
            let r = reading(&[("ts", bad.clone())]);
            assert_eq!(apply(&policy, r, &CTX), Err(Rejection::BadTime), "{bad:?}");
        }

        let r = reading(&[("v", Value::Int(1))]);
        assert_eq!(
            apply(&policy, r, &CTX).unwrap().record.event_time_ms,
            CTX.received_ms
        );
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(Value::Int),
            any::<f64>().prop_map(Value::Float),
            "[ -~]{0,12}".prop_map(Value::Str),
            any::<bool>().prop_map(Value::Bool),
        ]
    }

    fn arb_path() -> impl Strategy<Value = String> {
        prop::collection::vec("[a-c]{1,2}", 1..4).prop_map(|segs| segs.join("."))
    }

    proptest! {
        /// Invariant: the output's field paths are a subset of the declared paths, and every
        /// input field is either passed unchanged or counted as dropped, for any input.
        #[test]
        fn output_paths_are_declared_paths(
            declared in prop::collection::btree_set("[a-c]{1,2}", 0..5),
            input in prop::collection::vec((arb_path(), arb_value()), 0..20),
        ) {
            let declared: Vec<&str> = declared.iter().map(String::as_str).collect();
            let policy = stream(None, &declared);
            let r = Reading { fields: input.clone(), unsupported: 0 };
            let out = apply(&policy, r, &CTX).unwrap();
            for (path, _) in &out.record.fields {
                prop_assert!(declared.contains(&path.as_str()), "undeclared path {path} passed");
            }
            let kept: Vec<_> = input.iter().filter(|(p, _)| declared.contains(&p.as_str())).cloned().collect();
            prop_assert_eq!(&out.record.fields, &kept);
            prop_assert_eq!(out.fields_dropped as usize, input.len() - kept.len());
        }
    }
}
