//! What every record a stream serves satisfies, whatever path it took.
//!
//! Records leave a hub by several paths: the stream's own privacy chain, a window's release,
//! Push from another hub, and then replay, the upstream hub and NATS. They all answer to this one
//! statement, [`check`]:
//!
//! - every field path is one the stream's policy outputs (its declared fields; for an aggregated
//!   stream its group keys and measures), and none is repeated;
//! - an `h3` field holds a valid H3 cell index at exactly the declared resolution;
//! - a `grid` field holds the `"lat,lon"` south-west corner of a cell of the declared step,
//!   written as the chain writes it;
//! - a `pseudonymise` field holds a well-formed pseudonym: [`PSEUDONYM_BYTES`] bytes in lowercase
//!   hex;
//! - a `keep` field holds no direct identifier in any spelling the detectors know, in a string or
//!   a number ([`crate::identifiers`]);
//! - an aggregated stream's measures are numbers;
//! - the event time lies on the stream's time bucket (an aggregated stream's: on its window) and
//!   between the Unix epoch and the year 9999.
//!
//! The record's policy hash is checked by [`check_policy_hash`]: 64 lowercase hex digits, of a
//! policy the caller knows.
//!
//! The gateway checks the chain's output and every pushed record with it, and drops (or refuses)
//! what fails; the property tests assert that whatever the chain or [`crate::forwarded::admit`]
//! produces from arbitrary input passes.

use std::fmt;

use h3o::{CellIndex, Resolution};

use crate::identifiers::IdKind;
use crate::policy::{GridCell, StreamPolicy, Treatment};
use crate::pseudonym::PSEUDONYM_BYTES;
use crate::value::{Record, Text, Value};

/// Latest event time a record may carry: the end of the year 9999. The earliest: the Unix epoch.
pub const MAX_EVENT_MS: i64 = 253_402_300_799_999;

/// Why a record breaks its stream's output invariants. It names field paths and kinds, never a
/// value.
#[derive(Debug, Clone, PartialEq)]
pub enum Violation {
    /// A field the stream does not output.
    Undeclared(String),
    /// A field given twice.
    Repeated(String),
    /// An `h3` field that is not a cell index at the declared resolution.
    NotACell { path: String, resolution: u8 },
    /// A `grid` field that is not a cell corner on the declared step.
    NotAGridCorner { path: String, step: f64 },
    /// A `pseudonymise` field that is not a well-formed pseudonym.
    NotAPseudonym(String),
    /// A `keep` field that holds a direct identifier.
    Identifier { path: String, kind: IdKind },
    /// A measure of an aggregated record that is not a number.
    NotAMeasure(String),
    /// An event time off the stream's bucket (or window), in milliseconds.
    OffBucket { bucket_ms: i64 },
    /// An event time before the Unix epoch or after the year 9999.
    TimeOutOfRange,
    /// A policy hash that is not 64 lowercase hex digits of a policy known here.
    PolicyHash,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Undeclared(p) => write!(f, "field '{p}' is not one the stream outputs"),
            Violation::Repeated(p) => write!(f, "field '{p}' is given twice"),
            Violation::NotACell { path, resolution } => write!(
                f,
                "field '{path}' is not an H3 cell index at resolution {resolution}"
            ),
            Violation::NotAGridCorner { path, step } => write!(
                f,
                "field '{path}' is not a grid cell corner \"lat,lon\" on a step of {step} degrees"
            ),
            Violation::NotAPseudonym(p) => write!(
                f,
                "field '{p}' is not a pseudonym ({} lowercase hex digits)",
                2 * PSEUDONYM_BYTES
            ),
            Violation::Identifier { path, kind } => write!(
                f,
                "field '{path}' holds a direct identifier ({})",
                kind.name()
            ),
            Violation::NotAMeasure(p) => write!(f, "measure '{p}' is not a number"),
            Violation::OffBucket { bucket_ms } => write!(
                f,
                "the event time is not on the stream's time bucket of {bucket_ms} ms"
            ),
            Violation::TimeOutOfRange => {
                f.write_str("the event time is before 1970 or after the year 9999")
            }
            Violation::PolicyHash => f.write_str(
                "the policy hash is not 64 lowercase hex digits of a policy known to this hub",
            ),
        }
    }
}

impl std::error::Error for Violation {}

/// Checks `record` against the output invariants of `stream` (see the module's description).
/// `now_ms` is when it is checked: a kept number within a year of it may be a time.
pub fn check(stream: &StreamPolicy, record: &Record, now_ms: i64) -> Result<(), Violation> {
    check_time(stream, record.event_time_ms)?;
    for (i, (path, value)) in record.fields.iter().enumerate() {
        if record.fields[..i].iter().any(|(p, _)| p == path) {
            return Err(Violation::Repeated(path.to_string()));
        }
        check_field(stream, path, value, now_ms)?;
    }
    Ok(())
}

/// The event time is in range, and on the stream's bucket (an aggregated stream's: its window).
fn check_time(stream: &StreamPolicy, t_ms: i64) -> Result<(), Violation> {
    if !(0..=MAX_EVENT_MS).contains(&t_ms) {
        return Err(Violation::TimeOutOfRange);
    }
    let bucket_ms = match &stream.aggregate {
        Some(a) => a.window_ms(),
        None => stream.time_bucket.map_or(1, |b| {
            i64::try_from(b.as_millis()).unwrap_or(i64::MAX).max(1)
        }),
    };
    if t_ms.rem_euclid(bucket_ms) != 0 {
        return Err(Violation::OffBucket { bucket_ms });
    }
    Ok(())
}

fn check_field(
    stream: &StreamPolicy,
    path: &Text,
    value: &Value,
    now_ms: i64,
) -> Result<(), Violation> {
    if let Some(a) = &stream.aggregate {
        if a.measures.iter().any(|m| m.name == path.as_str()) {
            return match value {
                Value::Int(_) => Ok(()),
                Value::Float(f) if f.is_finite() => Ok(()),
                _ => Err(Violation::NotAMeasure(path.to_string())),
            };
        }
        if !a.group_by.iter().any(|g| g == path.as_str()) {
            return Err(Violation::Undeclared(path.to_string()));
        }
    }
    let Some(treatment) = stream.treatment(path) else {
        return Err(Violation::Undeclared(path.to_string()));
    };
    let ok = match (treatment, value) {
        (Treatment::Keep, value) => {
            if let Some(kind) = stream.identifiers.detector.find_value(value, now_ms) {
                return Err(Violation::Identifier {
                    path: path.to_string(),
                    kind,
                });
            }
            true
        }
        (Treatment::Pseudonymise, Value::Str(s)) => is_pseudonym(s),
        (Treatment::H3(cell), Value::Str(s)) => is_cell(s, cell.resolution),
        (Treatment::Grid(grid), Value::Str(s)) => is_grid_corner(s, grid),
        (Treatment::Pseudonymise | Treatment::H3(_) | Treatment::Grid(_), _) => false,
    };
    if ok {
        return Ok(());
    }
    Err(match treatment {
        Treatment::H3(cell) => Violation::NotACell {
            path: path.to_string(),
            resolution: cell.resolution,
        },
        Treatment::Grid(grid) => Violation::NotAGridCorner {
            path: path.to_string(),
            step: grid.step,
        },
        _ => Violation::NotAPseudonym(path.to_string()),
    })
}

/// Whether `s` is a pseudonym as [`crate::pseudonym::pseudonymise`] writes one.
pub fn is_pseudonym(s: &str) -> bool {
    s.len() == 2 * PSEUDONYM_BYTES && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The H3 cell `s` names, if it is one, as the chain writes it (lowercase hex).
pub fn parse_cell(s: &str) -> Option<CellIndex> {
    let cell: CellIndex = s.parse().ok()?;
    (cell.to_string() == s).then_some(cell)
}

/// Whether `s` is a cell index at `resolution`, as the chain writes it.
fn is_cell(s: &str, resolution: u8) -> bool {
    parse_cell(s).is_some_and(|c| Resolution::try_from(resolution) == Ok(c.resolution()))
}

/// The coordinates a `"lat,lon"` grid value names, if they are in range.
pub fn parse_grid(s: &str) -> Option<(f64, f64)> {
    let (lat, lon) = s.split_once(',')?;
    let (lat, lon): (f64, f64) = (lat.parse().ok()?, lon.parse().ok()?);
    ((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon)).then_some((lat, lon))
}

/// Whether `s` is the corner of a cell of `grid`, written as the chain writes it.
fn is_grid_corner(s: &str, grid: &GridCell) -> bool {
    parse_grid(s).is_some_and(|(lat, lon)| crate::chain::grid_corner(lat, lon, grid) == s)
}

/// Checks a record's policy hash: 64 lowercase hex digits, of a policy `known` accepts.
pub fn check_policy_hash(hash: &str, known: impl Fn(&str) -> bool) -> Result<(), Violation> {
    let hex = hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if hex && known(hash) {
        Ok(())
    } else {
        Err(Violation::PolicyHash)
    }
}

#[cfg(test)]
mod tests;
