//! The outbox's on-disk format, shared by both engines: keys, batch values (sealed, with a
//! CRC-32 over each), packed values, and reading them back.

use super::data_keys::{self, DataKeys};
use super::{Append, BatchInfo, OutboxError};

/// Format version of a batch value.
pub(super) const BATCH_VERSION: u8 = 1;
/// Format version of a packed batch value: batches of consecutive sequences in one value.
pub(super) const PACKED_VERSION: u8 = 2;
/// Bytes before the sealed body (or the parts of a packed value): version, CRC, count, kept time.
pub(super) const HEADER: usize = 17;
/// Most bytes of one batch value, unless a single record is larger. redb gives a value larger
/// than a page a power-of-two number of 4 KiB pages, so a 20 KiB batch takes 32 KiB; batches of
/// at most four pages fill them, with fewer `pwrite` calls than batches of one page
/// (BENCHMARKS.md, "Batches of at most 16 KiB"). This is four pages less [`ROOM`].
pub(super) const BATCH_MAX: usize = 4 * PAGE - ROOM;
/// redb's page.
pub(super) const PAGE: usize = 4 * 1024;
/// Room a leaf needs beside a value: for the key (at most 73 bytes) and the leaf's 12 bytes of
/// header.
pub(super) const ROOM: usize = 128;
/// Most bytes of a packed value that fills a page ([`pack`]).
pub(super) const PAGE_MAX: usize = PAGE - ROOM;
/// Most time between the kept times of the batches packed into one value: retention purges a
/// packed value when its oldest part is due, at most this early for the newest.
pub(super) const PACK_SPAN_MS: u64 = 1_000;

/// The batches `append` is stored as, `(first sequence, records)`: consecutive runs of its records,
/// each at most [`BATCH_MAX`] bytes in the outbox (a record larger than that alone in its batch).
pub(super) fn batches(append: &Append) -> impl Iterator<Item = (u64, &[bytes::Bytes])> {
    let mut rest = append.records.as_slice();
    let mut first = append.first;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut len = batch_len(&[]);
        let n = rest
            .iter()
            .take_while(|r| {
                len += 4 + r.len();
                len <= BATCH_MAX
            })
            .count()
            .max(1);
        let (batch, tail) = rest.split_at(n);
        rest = tail;
        first += n as u64;
        Some((first - n as u64, batch))
    })
}

pub(super) fn record_key(stream: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(stream.len() + 10);
    k.push(b'r');
    k.extend_from_slice(stream.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn named_key(kind: u8, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 1);
    k.push(kind);
    k.extend_from_slice(name.as_bytes());
    k
}

pub(super) fn seq_of(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if key.len() >= 8 {
        b.copy_from_slice(&key[key.len() - 8..]);
    }
    u64::from_be_bytes(b)
}

pub(super) fn batch_len(records: &[bytes::Bytes]) -> usize {
    HEADER + data_keys::OVERHEAD + records.iter().map(|r| 4 + r.len()).sum::<usize>()
}

/// The stored value of a batch: its header, and its records framed and sealed. The records are
/// framed into the value and sealed where they are: they are copied once.
pub(super) fn encode(
    keys: &mut DataKeys,
    append: &Append,
    first: u64,
    records: &[bytes::Bytes],
) -> Result<Vec<u8>, OutboxError> {
    let too_large = || OutboxError::TooLarge(records.len());
    let count = u32::try_from(records.len()).map_err(|_| too_large())?;
    let mut value = Vec::with_capacity(batch_len(records));
    value.push(BATCH_VERSION);
    value.extend_from_slice(&[0; 4]);
    value.extend_from_slice(&count.to_le_bytes());
    value.extend_from_slice(&append.kept_ms.to_le_bytes());
    for r in records {
        let Ok(len) = u32::try_from(r.len()) else {
            zeroize::Zeroize::zeroize(&mut value);
            return Err(too_large());
        };
        value.extend_from_slice(&len.to_le_bytes());
        value.extend_from_slice(r);
    }
    if let Err(err) = keys.seal_in_place(
        &append.stream,
        first,
        append.kept_ms,
        append.key_period,
        &mut value,
        HEADER,
    ) {
        // Records in clear are not left behind in freed memory.
        zeroize::Zeroize::zeroize(&mut value);
        return Err(err.into());
    }
    let crc = crc32fast::hash(&value[5..]);
    value[1..5].copy_from_slice(&crc.to_le_bytes());
    Ok(value)
}

/// Whether a batch value, packed or not, is intact: its version is known and its checksum
/// matches.
pub(super) fn intact(value: &[u8]) -> bool {
    value.len() >= HEADER
        && (value[0] == BATCH_VERSION || value[0] == PACKED_VERSION)
        && crc32fast::hash(&value[5..])
            == u32::from_le_bytes([value[1], value[2], value[3], value[4]])
}

/// The count of records in a batch value's header.
pub(super) fn count_of(value: &[u8]) -> u32 {
    u32::from_le_bytes([value[5], value[6], value[7], value[8]])
}

/// The kept time in a batch value's header.
pub(super) fn kept_of(value: &[u8]) -> i64 {
    i64::from_le_bytes(value[9..17].try_into().unwrap_or_default())
}

/// A value to write in place of another: unchanged, or packed.
pub(super) type Packed<'a> = (&'a [u8], std::borrow::Cow<'a, [u8]>);

/// Packs the record batches among `inserts` (sorted by key, as what waits in redb's log) that
/// hold consecutive sequences of one stream, kept at most [`PACK_SPAN_MS`] after the run's first
/// (or before it): each such run becomes values of at most [`BATCH_MAX`] bytes ([`pack_groups`];
/// a group of one batch is written as it was). Other inserts are kept as they are. Returns what
/// to write instead of `inserts`, in the same order, and how many bytes more it holds.
///
/// Why: redb splits a full leaf into halves and never fills the left one again when keys only
/// grow, so batches smaller than a page, as small commits write them, leave the file much larger
/// than their size. Packed, most values fill four pages of their own (BENCHMARKS.md, "Packed
/// batches in the outbox").
pub(super) fn pack<K: AsRef<[u8]>, V: AsRef<[u8]>>(inserts: &[(K, V)]) -> (Vec<Packed<'_>>, u64) {
    let mut out = Vec::with_capacity(inserts.len());
    let mut growth = 0;
    let mut rest = inserts;
    while !rest.is_empty() {
        let mut len = 1;
        if let Some((stream, mut next)) = batch_span(&rest[0]) {
            let kept = kept_of(rest[0].1.as_ref());
            while let Some((s, n)) = rest.get(len).and_then(batch_span) {
                let (key, value) = (rest[len].0.as_ref(), rest[len].1.as_ref());
                if s != stream
                    || seq_of(key) != next
                    || kept_of(value).abs_diff(kept) > PACK_SPAN_MS
                {
                    break;
                }
                next = n;
                len += 1;
            }
        }
        let (run, tail) = rest.split_at(len);
        rest = tail;
        for group in pack_groups(run) {
            let key = group[0].0.as_ref();
            if let [(_, value)] = group {
                out.push((key, std::borrow::Cow::Borrowed(value.as_ref())));
                continue;
            }
            let value = packed_value(group);
            let parts: usize = group.iter().map(|(_, v)| v.as_ref().len()).sum();
            growth += (value.len() - parts) as u64;
            out.push((key, std::borrow::Cow::Owned(value)));
        }
    }
    (out, growth)
}

/// A record batch's stream prefix of its key and the sequence after its last; `None` for other
/// inserts and for anything but an intact, unpacked batch.
pub(super) fn batch_span<K: AsRef<[u8]>, V: AsRef<[u8]>>(
    (key, value): &(K, V),
) -> Option<(&[u8], u64)> {
    let (key, value) = (key.as_ref(), value.as_ref());
    let record = key.first() == Some(&b'r') && key.len() > 9;
    (record && value.first() == Some(&BATCH_VERSION) && intact(value)).then(|| {
        (
            &key[..key.len() - 8],
            seq_of(key) + u64::from(count_of(value)),
        )
    })
}

/// Bytes a packed value of `parts` takes.
pub(super) fn packed_len<K, V: AsRef<[u8]>>(parts: &[(K, V)]) -> usize {
    HEADER
        + parts
            .iter()
            .map(|(_, v)| 4 + v.as_ref().len())
            .sum::<usize>()
}

/// How a run of batches is packed: in order, groups of at most [`BATCH_MAX`] bytes; the last
/// group in values of at most [`PAGE_MAX`] instead if those take fewer pages than it would.
pub(super) fn pack_groups<K, V: AsRef<[u8]>>(run: &[(K, V)]) -> Vec<&[(K, V)]> {
    let mut groups = split_run(run, BATCH_MAX);
    if let Some(last) = groups.pop() {
        let pages = split_run(last, PAGE_MAX);
        if pages.len() < pages_of(packed_len(last)) {
            groups.extend(pages);
        } else {
            groups.push(last);
        }
    }
    groups
}

/// `run` in order, in groups of at most `max` bytes packed (a batch larger than that alone).
pub(super) fn split_run<K, V: AsRef<[u8]>>(mut run: &[(K, V)], max: usize) -> Vec<&[(K, V)]> {
    let mut groups = Vec::new();
    while !run.is_empty() {
        let mut len = HEADER;
        let n = run
            .iter()
            .take_while(|(_, v)| {
                len += 4 + v.as_ref().len();
                len <= max
            })
            .count()
            .max(1);
        let (group, rest) = run.split_at(n);
        groups.push(group);
        run = rest;
    }
    groups
}

/// Pages of 4 KiB that redb gives a value of `len` bytes of its own: a power of two.
pub(super) fn pages_of(len: usize) -> usize {
    (len + ROOM).div_ceil(PAGE).next_power_of_two()
}

/// The packed value of `parts`, intact batches of consecutive sequences.
pub(super) fn packed_value<K, V: AsRef<[u8]>>(parts: &[(K, V)]) -> Vec<u8> {
    let count = parts
        .iter()
        .fold(0u32, |n, (_, v)| n.saturating_add(count_of(v.as_ref())));
    let kept = parts.iter().map(|(_, v)| kept_of(v.as_ref())).min();
    let mut value = Vec::with_capacity(packed_len(parts));
    value.push(PACKED_VERSION);
    value.extend_from_slice(&[0; 4]);
    value.extend_from_slice(&count.to_le_bytes());
    value.extend_from_slice(&kept.unwrap_or_default().to_le_bytes());
    for (_, part) in parts {
        let part = part.as_ref();
        // A part is at most a batch (or one record) long: well within u32.
        value.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_le_bytes());
        value.extend_from_slice(part);
    }
    let crc = crc32fast::hash(&value[5..]);
    value[1..5].copy_from_slice(&crc.to_le_bytes());
    value
}

/// The header of an intact batch value; `count` and `kept_ms` of a damaged one are unknown.
pub(super) fn info(first: u64, value: &[u8], next_first: impl FnOnce() -> u64) -> BatchInfo {
    let bytes = value.len() as u64;
    if intact(value) {
        BatchInfo {
            first,
            count: u64::from(count_of(value)),
            kept_ms: kept_of(value),
            bytes,
            damaged: false,
        }
    } else {
        // The damaged batch ends where the next one starts.
        let count = next_first().saturating_sub(first).max(1);
        BatchInfo {
            first,
            count,
            kept_ms: i64::MIN,
            bytes,
            damaged: true,
        }
    }
}

/// What a stored batch holds for a reader.
pub(super) enum Decoded {
    /// Its records, each with when it was kept.
    Records(Vec<(i64, Vec<u8>)>),
    /// Its data key was destroyed: purged.
    Shredded,
    Damaged,
}

pub(super) fn decode(keys: &DataKeys, stream: &str, first: u64, value: &[u8]) -> Decoded {
    if !intact(value) {
        return Decoded::Damaged;
    }
    if value[0] == BATCH_VERSION {
        return decode_batch(keys, stream, first, value);
    }
    let mut records = Vec::new();
    let mut rest = &value[HEADER..];
    while !rest.is_empty() {
        let Some(part) = next_framed(&mut rest) else {
            return Decoded::Damaged;
        };
        if part.first() != Some(&BATCH_VERSION) {
            return Decoded::Damaged;
        }
        match decode_batch(keys, stream, first + records.len() as u64, part) {
            Decoded::Records(part) => records.extend(part),
            other => return other,
        }
    }
    if records.len() as u64 == u64::from(count_of(value)) {
        Decoded::Records(records)
    } else {
        Decoded::Damaged
    }
}

/// Takes the next `length (u32 LE) | bytes` off the front of `rest`; `None` if it is cut short.
pub(super) fn next_framed<'v>(rest: &mut &'v [u8]) -> Option<&'v [u8]> {
    let len = rest
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)?;
    let framed = rest.get(4..4 + len)?;
    *rest = &rest[4 + len..];
    Some(framed)
}

/// [`decode`] for a batch as a commit writes it.
pub(super) fn decode_batch(keys: &DataKeys, stream: &str, first: u64, value: &[u8]) -> Decoded {
    if !intact(value) {
        return Decoded::Damaged;
    }
    if !keys.holds(stream, first) {
        // A key destroyed by a purge (or lost to damage, which the outbox reports at start).
        return Decoded::Shredded;
    }
    let count = count_of(value);
    let kept_ms = kept_of(value);
    let Some(body) = keys.unseal(stream, first, &value[HEADER..]) else {
        return Decoded::Damaged;
    };
    let body = zeroize::Zeroizing::new(body);
    let mut rest = body.as_slice();
    let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(1 << 16));
    for _ in 0..count {
        let Some(record) = next_framed(&mut rest) else {
            return Decoded::Damaged;
        };
        out.push((kept_ms, record.to_vec()));
    }
    if rest.is_empty() {
        Decoded::Records(out)
    } else {
        Decoded::Damaged
    }
}
