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
//! state   = header n:u32 window{n}
//! header  = closed_before_ms:i64 entries:u64 generation:u32 n:u32 rekey_ms:i64{n}
//! window  = start:i64 n:u32 group{n} n:u32 (digest:u64 count:u32){n}
//! group   = n:u32 key{n} readings:u64 n:u32 (generation:u32 digest:u64){n} n:u32 acc{n}
//! key     = 0 i64 | 1 n:u32 utf8{n} | 2 u8
//! acc     = n:u64 sum:f64 min:f64 max:f64 n:u32 digest:u64{n}
//!
//! changes = header n:u32 start:i64{n}                       the open windows
//!           n:u32 (start:i64 group){n}                      groups that changed, in order
//!           n:u32 (start:i64 digest:u64 count:u32){n}       contribution counts that changed
//! ```
//!
//! The changes since the state was last written whole are what a checkpoint writes between two
//! whole states: applied to the last whole state, they give the state they were taken from.

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
        self.encode_header(out);
        out.extend_from_slice(&len(self.windows.len()).to_le_bytes());
        for (start, window) in &self.windows {
            out.extend_from_slice(&start.to_le_bytes());
            out.extend_from_slice(&len(window.groups.len()).to_le_bytes());
            for (key, group) in &window.groups {
                encode_group(key, group, out);
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
        let mut state = WindowState::default();
        state.decode_header(&mut r)?;
        for _ in 0..r.count(12)? {
            let start = r.i64()?;
            let mut window = Window::default();
            let mut groups = Vec::new();
            for _ in 0..r.count(14)? {
                groups.push(decode_group(&mut r)?);
            }
            let mut contributions = Vec::new();
            for _ in 0..r.count(12)? {
                contributions.push((r.u64()?, r.u32()?));
            }
            if !contributions.is_sorted_by(|a, b| a.0 < b.0)
                || !groups.is_sorted_by(|a, b| a.0 < b.0)
                || state
                    .windows
                    .last_key_value()
                    .is_some_and(|(last, _)| *last >= start)
            {
                return Err(Malformed(r.at));
            }
            window.groups = BTreeMap::from_iter(groups);
            window.contributions = BTreeMap::from_iter(contributions);
            state.windows.insert(start, window);
        }
        state.check(&r)?;
        Ok(state)
    }

    /// Appends the binary form of what changed since [`WindowState::forget_changes`]: the
    /// state's scalars and open windows, the groups and contribution counts that changed.
    pub fn encode_changes(&self, out: &mut Vec<u8>) {
        self.encode_header(out);
        out.extend_from_slice(&len(self.windows.len()).to_le_bytes());
        for start in self.windows.keys() {
            out.extend_from_slice(&start.to_le_bytes());
        }
        let changed = || {
            self.windows.iter().flat_map(|(start, w)| {
                w.groups
                    .iter()
                    .filter(|(_, g)| g.changed.0)
                    .map(move |(key, g)| (start, key, g))
            })
        };
        out.extend_from_slice(&len(changed().count()).to_le_bytes());
        for (start, key, group) in changed() {
            out.extend_from_slice(&start.to_le_bytes());
            encode_group(key, group, out);
        }
        out.extend_from_slice(&len(self.changes.contributions.len()).to_le_bytes());
        for (start, digest) in &self.changes.contributions {
            let count = self
                .windows
                .get(start)
                .and_then(|w| w.contributions.get(digest))
                .copied()
                .unwrap_or(0);
            out.extend_from_slice(&start.to_le_bytes());
            out.extend_from_slice(&digest.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
    }

    /// Applies changes written by [`WindowState::encode_changes`] to the state as it was when
    /// its changes were last forgotten, and returns how many groups they changed. On an error the
    /// state is left as it was.
    pub fn apply_changes(&mut self, bytes: &[u8]) -> Result<usize, Malformed> {
        let mut r = Reader { bytes, at: 0 };
        let mut state = self.clone();
        state.decode_header(&mut r)?;
        let mut starts = Vec::new();
        for _ in 0..r.count(8)? {
            starts.push(r.i64()?);
        }
        let starts = r.strictly_increasing(starts)?;
        state.windows.retain(|start, _| starts.contains(start));
        for start in starts {
            state.windows.entry(start).or_default();
        }
        let mut previous = None;
        let groups = r.count(22)?;
        for _ in 0..groups {
            let start = r.i64()?;
            let (key, group) = decode_group(&mut r)?;
            let at = (start, key);
            if previous.as_ref().is_some_and(|p| *p >= at) {
                return Err(Malformed(r.at));
            }
            let window = state.windows.get_mut(&start).ok_or(Malformed(r.at))?;
            window.groups.insert(at.1.clone(), group);
            previous = Some(at);
        }
        let mut previous = None;
        for _ in 0..r.count(20)? {
            let at = (r.i64()?, r.u64()?);
            let count = r.u32()?;
            if previous.is_some_and(|p| p >= at) || count == 0 {
                return Err(Malformed(r.at));
            }
            let window = state.windows.get_mut(&at.0).ok_or(Malformed(r.at))?;
            window.contributions.insert(at.1, count);
            previous = Some(at);
        }
        state.check(&r)?;
        *self = state;
        Ok(groups)
    }

    fn encode_header(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.closed_before_ms.to_le_bytes());
        out.extend_from_slice(&self.entries.to_le_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&len(self.rekeys_ms.len()).to_le_bytes());
        for t in &self.rekeys_ms {
            out.extend_from_slice(&t.to_le_bytes());
        }
    }

    fn decode_header(&mut self, r: &mut Reader<'_>) -> Result<(), Malformed> {
        self.closed_before_ms = r.i64()?;
        self.entries = r.u64()?;
        self.generation = r.u32()?;
        self.rekeys_ms.clear();
        for _ in 0..r.count(8)? {
            self.rekeys_ms.push(r.i64()?);
        }
        Ok(())
    }

    /// The input is used up, and what the state holds is what it counts, or `max_state_entries`
    /// would not hold.
    fn check(&self, r: &Reader<'_>) -> Result<(), Malformed> {
        let held: u64 = self.windows.values().map(super::window_entries).sum();
        if r.at != r.bytes.len() || held != self.entries {
            return Err(Malformed(r.at));
        }
        Ok(())
    }
}

fn encode_group(key: &[KeyValue], group: &Group, out: &mut Vec<u8>) {
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

fn decode_group(r: &mut Reader<'_>) -> Result<(Vec<KeyValue>, Group), Malformed> {
    let mut key = Vec::new();
    for _ in 0..r.count(2)? {
        key.push(match r.u8()? {
            0 => KeyValue::Int(r.i64()?),
            1 => {
                let n = r.count(1)?;
                let at = r.at;
                let s = std::str::from_utf8(r.take(n)?).map_err(|_| Malformed(at))?;
                KeyValue::Str(s.into())
            }
            2 => KeyValue::Bool(r.u8()? != 0),
            _ => return Err(Malformed(r.at - 1)),
        });
    }
    // A group read back is as the state was written, not a change to it.
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
    Ok((key, group))
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
