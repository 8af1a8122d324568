//! Records another hub forwarded (gRPC Push), admitted under this hub's policy for the stream.
//!
//! A forwarded record was filtered by the origin's chain, but nothing proves it: whoever holds a
//! push token can send any record. [`admit`] therefore applies this hub's policy to it again, so
//! that what it lets through is a record this hub's own chain could have produced, and then
//! checks it against the stream's output invariants ([`crate::invariants::check`]):
//!
//! - a field the stream does not declare is dropped (fail closed), as the chain drops it;
//! - a `keep` value is scanned for direct identifiers, in strings and numbers, and one that holds
//!   one is dropped or pseudonymised, as the stream says;
//! - a `pseudonymise` value must be a well-formed pseudonym, and is pseudonymised again under this
//!   hub's key: whatever the origin sent (a raw identifier padded to a pseudonym's shape), what
//!   leaves this hub is an HMAC under a key only this hub holds;
//! - an `h3` value must be a cell at the declared resolution or finer, and is generalised to the
//!   declared resolution; a `grid` value must be a corner, and is floored to this hub's step;
//! - the event time is floored to this hub's time bucket.
//!
//! A value that cannot be made to fit (not a cell, not a corner, not a pseudonym, a time out of
//! range, a repeated field) refuses the record with the [`Violation`], which the gateway returns
//! to the origin. The policy hash is checked by the caller ([`crate::invariants::check_policy_hash`]).

use h3o::Resolution;

use crate::chain::{coarsen, grid_corner};
use crate::invariants::{self, MAX_EVENT_MS, Violation, is_pseudonym, parse_cell, parse_grid};
use crate::policy::{IdAction, StreamPolicy, Treatment};
use crate::pseudonym::{Key, pseudonymise, pseudonymise_canonical};
use crate::value::{Record, Text, Value};

/// What [`admit`] did to a forwarded record.
#[derive(Debug, Default, PartialEq)]
pub struct Admitted {
    /// The record as this hub serves it.
    pub record: Record,
    /// Fields the stream does not declare, and identifiers dropped.
    pub fields_dropped: u32,
    /// Values in which a direct identifier was found (dropped or pseudonymised).
    pub identifiers_suppressed: u32,
    /// Values pseudonymised under this hub's key.
    pub pseudonymised: u32,
}

/// Admits a forwarded record under `stream`'s policy with this hub's current `key` at this hub's
/// `now_ms` (see the module's description), or refuses it.
pub fn admit(
    stream: &StreamPolicy,
    record: Record,
    key: Option<&Key>,
    now_ms: i64,
) -> Result<Admitted, Violation> {
    if !(0..=MAX_EVENT_MS).contains(&record.event_time_ms) {
        return Err(Violation::TimeOutOfRange);
    }
    let bucket_ms = stream
        .time_bucket
        .map_or(0, |b| i64::try_from(b.as_millis()).unwrap_or(i64::MAX));
    let mut out = Admitted {
        record: Record {
            event_time_ms: coarsen(record.event_time_ms, bucket_ms),
            fields: Vec::with_capacity(record.fields.len()),
        },
        ..Admitted::default()
    };
    for (i, (path, value)) in record.fields.iter().enumerate() {
        if record.fields[..i].iter().any(|(p, _)| p == path) {
            return Err(Violation::Repeated(path.to_string()));
        }
        let admitted = match stream.treatment(path) {
            None => None,
            Some(Treatment::Keep) => keep(stream, value, key, now_ms, &mut out),
            Some(Treatment::Pseudonymise) => match value {
                Value::Str(s) if is_pseudonym(s) => key.map(|key| {
                    out.pseudonymised += 1;
                    Value::Str(pseudonymise(key, s).into())
                }),
                _ => return Err(Violation::NotAPseudonym(path.to_string())),
            },
            Some(Treatment::H3(cell)) => {
                let generalised = match value {
                    Value::Str(s) => parse_cell(s).and_then(|c| {
                        let resolution = Resolution::try_from(cell.resolution).ok()?;
                        c.parent(resolution)
                    }),
                    _ => None,
                };
                let Some(parent) = generalised else {
                    return Err(Violation::NotACell {
                        path: path.to_string(),
                        resolution: cell.resolution,
                    });
                };
                Some(Value::Str(parent.to_string().into()))
            }
            Some(Treatment::Grid(grid)) => {
                let corner = match value {
                    Value::Str(s) => parse_grid(s).map(|(lat, lon)| grid_corner(lat, lon, grid)),
                    _ => None,
                };
                let Some(corner) = corner else {
                    return Err(Violation::NotAGridCorner {
                        path: path.to_string(),
                        step: grid.step,
                    });
                };
                Some(Value::Str(corner))
            }
        };
        match admitted {
            Some(value) => out.record.fields.push((Text::from(path.as_str()), value)),
            None => out.fields_dropped += 1,
        }
    }
    invariants::check(stream, &out.record, now_ms)?;
    Ok(out)
}

/// A `keep` value: unchanged, unless it holds a direct identifier (then pseudonymised under this
/// hub's key when the stream says so, else dropped).
fn keep(
    stream: &StreamPolicy,
    value: &Value,
    key: Option<&Key>,
    now_ms: i64,
    out: &mut Admitted,
) -> Option<Value> {
    let Some(found) = stream
        .identifiers
        .detector
        .identify_value(value, Some(now_ms))
    else {
        return Some(value.clone());
    };
    out.identifiers_suppressed += 1;
    match (stream.identifiers.action, key) {
        (IdAction::Pseudonymise, Some(key)) => {
            out.pseudonymised += 1;
            Some(Value::Str(
                pseudonymise_canonical(key, &found.canonical).into(),
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
