//! A compact binary form of [`WindowState`], for checkpoints.
//!
//! The state is checkpointed often (in every commit that acknowledges a QoS 1 reading it
//! absorbed), so its form must be quick to write: fixed-width little-endian numbers, lengths as
//! `u32`, no field names. It is read only from the gateway's own sealed outbox, but a damaged or
//! truncated input is still an error, never a panic or an unbounded allocation, and an input that
//! would break the state's invariants (sets out of order, windows given twice, a count of entries
//! that is not what the state holds) is refused.
//!
//! ```text
//! state   = closed_before_ms:i64 entries:u64 generation:u32 n:u32 rekey_ms:i64{n}
//!           n:u32 window{n}
//! window  = start:i64 n:u32 group{n} n:u32 (digest:u64 count:u32){n}
//! group   = n:u32 key{n} readings:u64 n:u32 (generation:u32 digest:u64){n} n:u32 acc{n}
//! key     = 0 i64 | 1 n:u32 utf8{n} | 2 u8
//! acc     = n:u64 sum:f64 min:f64 max:f64 n:u32 digest:u64{n}
//! ```

use std::collections::{BTreeMap, BTreeSet};

use super::{Acc, Group, KeyValue, Window, WindowState};

/// The input is not a state this module wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed window state at byte {0}")]
pub struct Malformed(pub usize);

fn len(n: usize) -> u32 {
    // Bounded far below 2^32 by `max_state_entries` and the key length limits.
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl WindowState {
    /// Appends the state's binary form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.closed_before_ms.to_le_bytes());
        out.extend_from_slice(&self.entries.to_le_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&len(self.rekeys_ms.len()).to_le_bytes());
        for t in &self.rekeys_ms {
            out.extend_from_slice(&t.to_le_bytes());
        }
        out.extend_from_slice(&len(self.windows.len()).to_le_bytes());
        for (start, window) in &self.windows {
            out.extend_from_slice(&start.to_le_bytes());
            out.extend_from_slice(&len(window.groups.len()).to_le_bytes());
            for (key, group) in &window.groups {
                out.extend_from_slice(&len(key.len()).to_le_bytes());
                for k in key {
                    match k {
                        KeyValue::Int(i) => {
                            out.push(0);
                            out.extend_from_slice(&i.to_le_bytes());
                        }
                        KeyValue::Str(s) => {
                            out.push(1);
                            out.extend_from_slice(&len(s.len()).to_le_bytes());
                            out.extend_from_slice(s.as_bytes());
                        }
                        KeyValue::Bool(b) => {
                            out.push(2);
                            out.push(u8::from(*b));
                        }
                    }
                }
                out.extend_from_slice(&group.readings.to_le_bytes());
                out.extend_from_slice(&len(group.contributors.len()).to_le_bytes());
                for (generation, digest) in &group.contributors {
                    out.extend_from_slice(&generation.to_le_bytes());
                    out.extend_from_slice(&digest.to_le_bytes());
                }
                out.extend_from_slice(&len(group.measures.len()).to_le_bytes());
                for acc in &group.measures {
                    out.extend_from_slice(&acc.n.to_le_bytes());
                    for x in [acc.sum, acc.min, acc.max] {
                        out.extend_from_slice(&x.to_bits().to_le_bytes());
                    }
                    out.extend_from_slice(&len(acc.distinct.len()).to_le_bytes());
                    for d in &acc.distinct {
                        out.extend_from_slice(&d.to_le_bytes());
                    }
                }
            }
            out.extend_from_slice(&len(window.contributions.len()).to_le_bytes());
            for (digest, count) in &window.contributions {
                out.extend_from_slice(&digest.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
        }
    }

    /// Reads a state written by [`WindowState::encode`]; the whole input must be one state.
    pub fn decode(bytes: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader { bytes, at: 0 };
        let mut state = WindowState {
            closed_before_ms: r.i64()?,
            entries: r.u64()?,
            generation: r.u32()?,
            ..WindowState::default()
        };
        for _ in 0..r.count(8)? {
            state.rekeys_ms.push(r.i64()?);
        }
        for _ in 0..r.count(12)? {
            let start = r.i64()?;
            let mut window = Window::default();
            let groups = r.count(14)?;
            window.groups.reserve(groups);
            for _ in 0..groups {
                let mut key = Vec::new();
                for _ in 0..r.count(2)? {
                    key.push(match r.u8()? {
                        0 => KeyValue::Int(r.i64()?),
                        1 => {
                            let n = r.count(1)?;
                            let at = r.at;
                            let s = std::str::from_utf8(r.take(n)?).map_err(|_| Malformed(at))?;
                            KeyValue::Str(s.to_owned())
                        }
                        2 => KeyValue::Bool(r.u8()? != 0),
                        _ => return Err(Malformed(r.at - 1)),
                    });
                }
                let mut group = Group {
                    readings: r.u64()?,
                    ..Group::default()
                };
                let mut contributors = Vec::new();
                for _ in 0..r.count(12)? {
                    contributors.push((r.u32()?, r.u64()?));
                }
                group.contributors = r.strictly_increasing(contributors)?;
                for _ in 0..r.count(36)? {
                    let mut acc = Acc {
                        n: r.u64()?,
                        sum: f64::from_bits(r.u64()?),
                        min: f64::from_bits(r.u64()?),
                        max: f64::from_bits(r.u64()?),
                        distinct: BTreeSet::new(),
                    };
                    let mut distinct = Vec::new();
                    for _ in 0..r.count(8)? {
                        distinct.push(r.u64()?);
                    }
                    acc.distinct = r.strictly_increasing(distinct)?;
                    group.measures.push(acc);
                }
                window.groups.push((key, group));
            }
            let mut contributions = Vec::new();
            for _ in 0..r.count(12)? {
                contributions.push((r.u64()?, r.u32()?));
            }
            if !contributions.is_sorted_by(|a, b| a.0 < b.0)
                || !window.groups.is_sorted_by(|a, b| a.0 < b.0)
                || state
                    .windows
                    .last_key_value()
                    .is_some_and(|(last, _)| *last >= start)
            {
                return Err(Malformed(r.at));
            }
            window.contributions = BTreeMap::from_iter(contributions);
            state.windows.insert(start, window);
        }
        // What the state holds must be what it counts, or `max_state_entries` would not hold.
        let held: u64 = state.windows.values().map(super::window_entries).sum();
        if r.at != bytes.len() || held != state.entries {
            return Err(Malformed(r.at));
        }
        Ok(state)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], Malformed> {
        let end = self.at.checked_add(n).ok_or(Malformed(self.at))?;
        let taken = self.bytes.get(self.at..end).ok_or(Malformed(self.at))?;
        self.at = end;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, Malformed> {
        self.array().map(u64::from_le_bytes)
    }

    fn i64(&mut self) -> Result<i64, Malformed> {
        self.array().map(i64::from_le_bytes)
    }

    /// The items as a set, which they must be already: in strictly increasing order.
    fn strictly_increasing<T: Ord>(&self, items: Vec<T>) -> Result<BTreeSet<T>, Malformed> {
        if items.is_sorted_by(|a, b| a < b) {
            Ok(BTreeSet::from_iter(items))
        } else {
            Err(Malformed(self.at))
        }
    }

    /// A count of items of at least `min_size` bytes each, which the rest of the input can hold.
    fn count(&mut self, min_size: usize) -> Result<usize, Malformed> {
        let at = self.at;
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size) > self.bytes.len() - self.at {
            return Err(Malformed(at));
        }
        Ok(n)
    }
}
