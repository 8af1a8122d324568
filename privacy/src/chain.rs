//! The privacy chain: the stages a reading goes through before anything of it is kept.
//!
//! Each stage is a small synchronous function over one reading, labelled with its ISO/IEC 20889
//! technique class:
//!
//! 1. **Event time**: the stream's `time_field`, if declared and present, becomes the record's
//!    event time (Unix seconds, or RFC 3339 in UTC); a value that is not a time rejects the reading.
//!    Without it, the event time is when the gateway received the message.
//! 2. **Time coarsening** (generalisation): the event time is floored to the stream's
//!    `time_bucket`. The result depends on the reading alone, so arrival order and jitter cannot
//!    change it.
//! 3. **Location generalisation** (generalisation): each `h3` or `grid` field is computed from the
//!    reading's coordinates; the coordinates themselves are not declared, so they never pass.
//! 4. **Allow-list** (suppression): only declared field paths pass. Fail closed: an undeclared
//!    field, or a value the decoder could not represent, is dropped and counted.
//! 5. **Pseudonymisation** (pseudonymisation): `pseudonymise` fields are replaced by their keyed
//!    pseudonym under the stream's current key. Without a key they are dropped.
//! 6. **Identifier suppression** (suppression): every value that passes as `keep`, string or
//!    number, is scanned for direct identifiers ([`crate::identifiers`], on the folded text); a
//!    value holding one is dropped, or replaced by the pseudonym of the identifier found, as the
//!    stream says.
//!
//! The chain never reads a clock or a random source: time and the key come in through [`Context`].

use h3o::{LatLng, Resolution};

use crate::identifiers::IdKind;
use crate::invariants::MAX_EVENT_MS;
use crate::policy::{GridCell, H3Cell, IdAction, StreamPolicy, Treatment};
use crate::pseudonym::{Key, pseudonymise_canonical, pseudonymise_value};
use crate::value::{Reading, Record, Text, Value};
use compact_str::ToCompactString as _;

/// What the caller knows about the message that the policy may use.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// When the gateway received the message, in milliseconds since the Unix epoch.
    pub received_ms: i64,
    /// The stream's pseudonymisation key for the current epoch, if it has one.
    pub key: Option<&'a Key>,
}

/// A reading the chain refused as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the event time field holds no valid time")]
    BadTime,
}

/// The result of the chain for one reading.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    pub record: Record,
    /// Fields the allow-list dropped (undeclared, or not representable).
    pub fields_dropped: u32,
    /// String values in which a direct identifier was found (dropped or pseudonymised).
    pub identifiers_suppressed: u32,
    /// The kind of the last identifier found, for counting by kind.
    pub last_identifier: Option<IdKind>,
    /// Values replaced by a pseudonym.
    pub pseudonymised: u32,
    /// Locations generalised to a cell.
    pub locations_generalised: u32,
    /// Locations whose coordinates were present but invalid (the cell is left out).
    pub locations_invalid: u32,
}

/// What the chain did with one input field (for `hubgate dry-run`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Read as the event time, then consumed.
    EventTime,
    /// Passed unchanged.
    Kept,
    /// Replaced by its pseudonym.
    Pseudonymised,
    /// A coordinate, generalised into the cell at this output path; it does not pass itself.
    Generalised(String),
    /// Not declared by the policy: dropped.
    Undeclared,
    /// Held a direct identifier of this kind: dropped.
    IdentifierDropped(IdKind),
    /// Held a direct identifier of this kind: pseudonymised.
    IdentifierPseudonymised(IdKind),
    /// To be pseudonymised, but no key was available: dropped.
    NoKey,
}

/// Runs every stage of `policy` over `reading`.
pub fn apply(
    policy: &StreamPolicy,
    reading: Reading,
    ctx: &Context<'_>,
) -> Result<Outcome, Rejection> {
    stages::<false>(policy, reading, ctx, |_, _| {})
}

/// Runs every stage of `policy` over `reading`, telling `trace` what happened to each input field.
pub fn apply_traced(
    policy: &StreamPolicy,
    reading: Reading,
    ctx: &Context<'_>,
    trace: impl FnMut(&str, Fate),
) -> Result<Outcome, Rejection> {
    stages::<true>(policy, reading, ctx, trace)
}

/// The stages; with `TRACE` false, what only the trace needs is not worked out.
fn stages<const TRACE: bool>(
    policy: &StreamPolicy,
    mut reading: Reading,
    ctx: &Context<'_>,
    mut trace: impl FnMut(&str, Fate),
) -> Result<Outcome, Rejection> {
    let mut out = Outcome::default();
    let mut event_time_ms = match &policy.time_field {
        Some(path) => match take_field(&mut reading, path) {
            Some(value) => {
                trace(path, Fate::EventTime);
                event_time(&value).ok_or(Rejection::BadTime)?
            }
            None => ctx.received_ms,
        },
        None => ctx.received_ms,
    };
    if let Some(bucket) = policy.time_bucket {
        event_time_ms = coarsen(
            event_time_ms,
            i64::try_from(bucket.as_millis()).unwrap_or(i64::MAX),
        );
    }

    let mut fields = Vec::with_capacity(policy.fields.len());
    for (path, treatment) in &policy.fields {
        let cell = match treatment {
            Treatment::H3(cell) => h3_cell(&reading, cell),
            Treatment::Grid(grid) => grid_cell(&reading, grid),
            Treatment::Keep | Treatment::Pseudonymise => continue,
        };
        match cell {
            Some(Ok(cell)) => {
                fields.push((Text::from(path.as_str()), Value::Str(cell)));
                out.locations_generalised += 1;
            }
            Some(Err(())) => out.locations_invalid += 1,
            None => {}
        }
    }

    out.fields_dropped = reading.unsupported;
    for (path, value) in reading.fields {
        match policy.treatment(&path) {
            Some(Treatment::Keep) => {
                let found = policy
                    .identifiers
                    .detector
                    .identify_value(&value, Some(ctx.received_ms));
                let Some(found) = found else {
                    trace(&path, Fate::Kept);
                    fields.push((path, value));
                    continue;
                };
                out.identifiers_suppressed += 1;
                out.last_identifier = Some(found.kind);
                // Dropped, unless the stream pseudonymises hits and has a key: then the value is
                // the pseudonym of the identifier found in it, in its canonical form.
                match (policy.identifiers.action, ctx.key) {
                    (IdAction::Pseudonymise, Some(key)) => {
                        trace(&path, Fate::IdentifierPseudonymised(found.kind));
                        let pseudonym = pseudonymise_canonical(key, &found.canonical);
                        fields.push((path, Value::Str(pseudonym.into())));
                        out.pseudonymised += 1;
                    }
                    _ => trace(&path, Fate::IdentifierDropped(found.kind)),
                }
            }
            Some(Treatment::Pseudonymise) => match ctx.key {
                Some(key) => {
                    trace(&path, Fate::Pseudonymised);
                    fields.push((path, Value::Str(pseudonym_of(key, &value))));
                    out.pseudonymised += 1;
                }
                None => {
                    trace(&path, Fate::NoKey);
                    out.fields_dropped += 1;
                }
            },
            // An input field at an h3 output path is not the cell: it is dropped like any other.
            Some(Treatment::H3(_) | Treatment::Grid(_)) | None => {
                out.fields_dropped += 1;
                if TRACE {
                    let cell = policy.fields.iter().find_map(|(out_path, t)| {
                        t.coordinates()
                            .filter(|(lat, lon)| *lat == path || *lon == path)
                            .map(|_| out_path.clone())
                    });
                    trace(&path, cell.map_or(Fate::Undeclared, Fate::Generalised));
                }
            }
        }
    }
    out.record = Record {
        event_time_ms,
        fields,
    };
    Ok(out)
}

/// Keeps only the fields the policy declares `keep`; returns how many were dropped.
///
/// This is the allow-list on its own, for callers that need no other stage.
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

/// Floors a time to a multiple of `bucket_ms`.
pub fn coarsen(t_ms: i64, bucket_ms: i64) -> i64 {
    if bucket_ms <= 0 {
        t_ms
    } else {
        t_ms - t_ms.rem_euclid(bucket_ms)
    }
}

/// The pseudonym of a value: of its canonical form ([`crate::identifiers::canonical`]).
pub(crate) fn pseudonym_of(key: &Key, value: &Value) -> Text {
    pseudonymise_value(key, value).into()
}

/// The reading's coordinates at these paths: `None` when both are absent, `Err` when invalid.
fn coordinates(reading: &Reading, lat: &str, lon: &str) -> Option<Result<(f64, f64), ()>> {
    let number = |path: &str| {
        reading
            .fields
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, v)| match v {
                Value::Float(f) => Some(*f),
                Value::Int(i) => Some(*i as f64),
                _ => None,
            })
    };
    let (lat, lon) = (number(lat), number(lon));
    if lat.is_none() && lon.is_none() {
        return None;
    }
    let result = (|| {
        let (lat, lon) = (lat.flatten()?, lon.flatten()?);
        ((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon)).then_some((lat, lon))
    })();
    Some(result.ok_or(()))
}

/// The H3 cell of the reading's coordinates: `None` when they are absent, `Err` when invalid.
fn h3_cell(reading: &Reading, cell: &H3Cell) -> Option<Result<Text, ()>> {
    let coords = coordinates(reading, &cell.lat, &cell.lon)?;
    Some(coords.and_then(|(lat, lon)| {
        let res = Resolution::try_from(cell.resolution).map_err(|_| ())?;
        let point = LatLng::new(lat, lon).map_err(|_| ())?;
        Ok(point.to_cell(res).to_compact_string())
    }))
}

/// The grid cell of the reading's coordinates, as `"lat,lon"` of its south-west corner.
fn grid_cell(reading: &Reading, grid: &GridCell) -> Option<Result<Text, ()>> {
    let coords = coordinates(reading, &grid.lat, &grid.lon)?;
    Some(coords.map(|(lat, lon)| grid_corner(lat, lon, grid)))
}

/// The `"lat,lon"` south-west corner of the cell of `grid` that holds a point.
pub(crate) fn grid_corner(lat: f64, lon: f64, grid: &GridCell) -> Text {
    // The nudge keeps a coordinate on a cell's edge (52.37 at 0.01) out of the cell below it.
    let corner = |x: f64| (x / grid.step + 1e-9).floor() * grid.step;
    let d = grid.decimals();
    compact_str::format_compact!("{:.d$},{:.d$}", corner(lat), corner(lon))
}

fn take_field(reading: &mut Reading, path: &str) -> Option<Value> {
    let i = reading.fields.iter().position(|(p, _)| p == path)?;
    Some(reading.fields.remove(i).1)
}

fn event_time(value: &Value) -> Option<i64> {
    let ms = match value {
        Value::Int(secs) => secs.checked_mul(1000)?,
        Value::Float(secs) if secs.is_finite() => (secs * 1000.0).round() as i64,
        Value::Str(s) => rfc3339_ms(s)?,
        _ => return None,
    };
    (0..=MAX_EVENT_MS).contains(&ms).then_some(ms)
}

/// Milliseconds since the Unix epoch of an RFC 3339 time with `Z` or a `±hh:mm` offset
/// (`2022-07-18T11:34:15.775+02:00`), fractions beyond the millisecond dropped.
pub fn rfc3339_ms(s: &str) -> Option<i64> {
    let (base, offset_secs) = if let Some(base) = s.strip_suffix(['Z', 'z']) {
        (base, 0)
    } else {
        let at = s.len().checked_sub(6)?;
        let (base, offset) = (s.get(..at)?, s.get(at..)?);
        let sign = match offset.as_bytes().first()? {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let (h, m) = offset[1..].split_once(':')?;
        let (h, m) = (h.parse::<i64>().ok()?, m.parse::<i64>().ok()?);
        if h > 23 || m > 59 {
            return None;
        }
        (base, sign * (h * 3600 + m * 60))
    };
    let utc = humantime::parse_rfc3339(&format!("{base}Z")).ok()?;
    let ms = i64::try_from(utc.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis()).ok()?;
    ms.checked_sub(offset_secs * 1000)
}

#[cfg(test)]
mod tests;
