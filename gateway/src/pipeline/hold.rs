//! Holding back the records of personal-data streams until their time bucket has ended.
//!
//! Time coarsening floors a record's event time to its stream's `time_bucket`, but a record that
//! reaches a subscriber a few milliseconds after it was published tells its arrival time all the
//! same, and records released in the order they came let two streams fed by one topic be matched
//! record by record. So a stream that processes personal data and has a `time_bucket`
//! ([`hubgate_privacy::StreamPolicy::release_delay`]) stages its records in a hold log of the
//! store (durable, sealed, acknowledged to the broker as usual: records wait in the outbox, not
//! in memory), and releases them at the end of each bucket:
//!
//! - at each boundary T of the bucket grid (on the gateway's clock, checked twice a second), the
//!   records that arrived before T are released together, those whose event bucket has ended;
//!   a record whose event time lies ahead (a device clock ahead) is held again for later;
//! - released records are sorted by a keyed hash of their bytes, under a random key per
//!   release, so their order, and the sequence numbers they get in the stream, say nothing of
//!   their arrival; two streams shuffle independently;
//! - a release whose records exceed [`LANE_BYTES`] is cut into lanes by that hash: each lane is
//!   read, sorted and committed on its own (bounded memory), and lanes follow one another within
//!   a second or two, so the order still owes nothing to arrival;
//! - a checkpoint (`hold/<stream>`) committed with each lane says how far the hold log is
//!   released, so a restart neither loses nor repeats a record; released records are purged from
//!   the hold log afterwards. Retention counts from arrival: a release keeps the arrival time of
//!   its oldest record.
//!
//! A stream that is no longer held (a policy change) releases what its hold log still holds at
//! once, in the same shuffled way.

use hubgate_privacy::pseudonym::hmac_sha256;
use hubgate_proto::v1;
use prost::Message as _;

use super::Pipeline;
use crate::record::without_sequence;
use crate::store::{Bodies, Store, Stored};

/// Most bytes of records one lane of a release holds in memory.
pub(super) const LANE_BYTES: u64 = 8 << 20;

/// Records read from a hold log at once.
const READ: usize = 1024;

/// A release cut into lanes, under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Releasing {
    /// The last hold sequence the release covers.
    through: u64,
    /// The arrival boundary of the release (records kept before it).
    boundary_ms: i64,
    lanes: u32,
    /// Lanes committed so far.
    done: u32,
    key: [u8; 32],
}

/// The hold log of one stream and how far it is released.
#[derive(Debug)]
pub(super) struct Held {
    /// The stream's index in the policy, and its hold log's in the store.
    stream: usize,
    hold: usize,
    /// The stream's time bucket; 0 when the stream is no longer held (release everything).
    bucket_ms: i64,
    /// Hold sequences up to this are released, durably or in the turn being taken.
    released_through: u64,
    releasing: Option<Releasing>,
    /// The next boundary of the bucket grid at which a release starts.
    next_boundary_ms: i64,
    /// What the turn being taken, and the turn being committed, move `released_through` to.
    staged_mark: Option<u64>,
    committing_mark: Option<u64>,
}

/// The checkpoint of a hold log: `released_through (u64 BE)`, then, while a release is cut into
/// lanes, `through (u64) | boundary (i64) | lanes (u32) | done (u32) | key (32)`.
fn encode_mark(released_through: u64, releasing: Option<&Releasing>) -> Vec<u8> {
    let mut bytes = released_through.to_be_bytes().to_vec();
    if let Some(r) = releasing {
        bytes.extend_from_slice(&r.through.to_be_bytes());
        bytes.extend_from_slice(&r.boundary_ms.to_be_bytes());
        bytes.extend_from_slice(&r.lanes.to_be_bytes());
        bytes.extend_from_slice(&r.done.to_be_bytes());
        bytes.extend_from_slice(&r.key);
    }
    bytes
}

fn decode_mark(bytes: &[u8]) -> Option<(u64, Option<Releasing>)> {
    let (released, rest) = bytes.split_first_chunk::<8>()?;
    let released = u64::from_be_bytes(*released);
    if rest.is_empty() {
        return Some((released, None));
    }
    let (through, rest) = rest.split_first_chunk::<8>()?;
    let (boundary, rest) = rest.split_first_chunk::<8>()?;
    let (lanes, rest) = rest.split_first_chunk::<4>()?;
    let (done, rest) = rest.split_first_chunk::<4>()?;
    let key: [u8; 32] = rest.try_into().ok()?;
    Some((
        released,
        Some(Releasing {
            through: u64::from_be_bytes(*through),
            boundary_ms: i64::from_be_bytes(*boundary),
            lanes: u32::from_be_bytes(*lanes),
            done: u32::from_be_bytes(*done),
            key,
        }),
    ))
}

fn mark_name(stream: &str) -> String {
    format!("hold/{stream}")
}

/// The keyed hash that orders a release: the first 8 bytes of HMAC-SHA256 over the record.
fn order(key: &[u8; 32], body: &[u8]) -> u64 {
    let digest = hmac_sha256(key, body);
    u64::from_be_bytes(digest[..8].try_into().unwrap_or_default())
}

fn random_key() -> anyhow::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no random source: {e}"))?;
    Ok(key)
}

/// The streams of `policy` that hold their records back, by index: the store keeps a hold log
/// for each ([`Store::open_holding`]).
pub fn held_streams(policy: &hubgate_privacy::Policy) -> Vec<usize> {
    (0..policy.streams().len())
        .filter(|&i| policy.streams()[i].release_delay().is_some())
        .collect()
}

/// The hold logs of `policy`'s streams in `store`, as far as their checkpoints say they are
/// released.
pub(super) fn open_holds(
    policy: &hubgate_privacy::Policy,
    store: &Store,
) -> anyhow::Result<Vec<Held>> {
    let mut held = Vec::new();
    for (stream, s) in policy.streams().iter().enumerate() {
        let Some(hold) = store.hold_of(stream) else {
            continue;
        };
        let (released_through, releasing) = match store.checkpoint(&mark_name(&s.name))? {
            Some(bytes) => decode_mark(&bytes).ok_or_else(|| {
                anyhow::anyhow!("the hold checkpoint of stream '{}' is damaged", s.name)
            })?,
            None => (0, None),
        };
        store.released(hold, released_through);
        let bucket_ms = s.release_delay().map_or(0, |d| {
            i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
        });
        held.push(Held {
            stream,
            hold,
            bucket_ms,
            released_through,
            releasing,
            // The first tick releases what arrived before the bucket it falls in.
            next_boundary_ms: 0,
            staged_mark: None,
            committing_mark: None,
        });
    }
    Ok(held)
}

/// The first boundary of the bucket grid after `now_ms` (`now_ms` itself without a bucket).
fn next_boundary(now_ms: i64, bucket_ms: i64) -> i64 {
    if bucket_ms <= 0 {
        return now_ms;
    }
    (now_ms - now_ms.rem_euclid(bucket_ms)).saturating_add(bucket_ms)
}

/// What one lane of a release came to.
#[derive(Debug, Default)]
struct Lane {
    /// Released records: their order hash, their body, their arrival.
    released: Vec<(u64, bytes::Bytes, i64)>,
    /// Records held again (their event bucket has not ended): body and arrival.
    again: Vec<(bytes::Bytes, i64)>,
}

impl Pipeline {
    /// Whether any stream holds records back (then [`Pipeline::release_held`] must run on a
    /// timer).
    pub fn holds(&self) -> bool {
        !self.held.is_empty()
    }

    /// Releases what the hold logs may release at `now_ms`: a release that is under way goes
    /// on by one lane, and a stream whose bucket boundary has passed starts one.
    pub fn release_held(&mut self, now_ms: i64) {
        for i in 0..self.held.len() {
            if let Err(err) = self.release_one(i, now_ms) {
                let name = &self.policy.streams()[self.held[i].stream].name;
                tracing::error!(stream = %name, %err, "cannot release held records; trying again shortly");
            }
        }
    }

    fn release_one(&mut self, i: usize, now_ms: i64) -> anyhow::Result<()> {
        let h = &self.held[i];
        // One release step per turn: the next waits until this one's marks are staged in order.
        if h.staged_mark.is_some() {
            return Ok(());
        }
        let releasing = match h.releasing {
            Some(r) => r,
            None if now_ms >= h.next_boundary_ms => {
                let boundary_ms = if h.bucket_ms > 0 {
                    now_ms - now_ms.rem_euclid(h.bucket_ms)
                } else {
                    now_ms
                };
                self.held[i].next_boundary_ms = next_boundary(now_ms, h.bucket_ms);
                match self.plan_release(i, boundary_ms)? {
                    Some(r) => r,
                    None => return Ok(()),
                }
            }
            None => return Ok(()),
        };
        let lane = self.read_lane(i, &releasing, now_ms)?;
        self.stage_lane(i, releasing, lane);
        Ok(())
    }

    /// Measures what arrived before `boundary_ms` and is not released yet: a release of it, in
    /// as many lanes as its size needs; `None` when there is nothing to release.
    fn plan_release(&self, i: usize, boundary_ms: i64) -> anyhow::Result<Option<Releasing>> {
        let h = &self.held[i];
        let (mut from, mut through, mut bytes) = (h.released_through + 1, h.released_through, 0u64);
        loop {
            let batch = self.store.read(h.hold, from, READ, boundary_ms);
            if let Some((_, last)) = batch.gap {
                through = through.max(last);
            }
            let before = batch
                .records
                .iter()
                .take_while(|r| r.kept_ms < boundary_ms)
                .count();
            for r in &batch.records[..before] {
                bytes += r.bytes.len() as u64;
                through = r.sequence;
            }
            if before < batch.records.len() || batch.records.is_empty() {
                break;
            }
            from = batch.next;
        }
        if through <= h.released_through {
            return Ok(None);
        }
        let lanes = u32::try_from(bytes.div_ceil(self.lane_bytes).max(1)).unwrap_or(u32::MAX);
        Ok(Some(Releasing {
            through,
            boundary_ms,
            lanes,
            done: 0,
            key: random_key()?,
        }))
    }

    /// Reads the records of the release's next lane.
    fn read_lane(&self, i: usize, r: &Releasing, now_ms: i64) -> anyhow::Result<Lane> {
        let h = &self.held[i];
        let mut lane = Lane::default();
        let mut from = h.released_through + 1;
        while from <= r.through {
            let max = usize::try_from(r.through - from + 1)
                .unwrap_or(READ)
                .min(READ);
            let batch = self.store.read(h.hold, from, max, r.boundary_ms);
            if batch.records.is_empty() && batch.gap.is_none() {
                break;
            }
            for stored in batch.records.iter().filter(|s| s.sequence <= r.through) {
                self.sort_into(&mut lane, stored, r, h.bucket_ms, now_ms)?;
            }
            from = batch.next.max(from + 1);
        }
        Ok(lane)
    }

    /// Puts a held record into the lane when it belongs to it: to release, or to hold again when
    /// its event bucket has not ended.
    fn sort_into(
        &self,
        lane: &mut Lane,
        stored: &Stored,
        r: &Releasing,
        bucket_ms: i64,
        now_ms: i64,
    ) -> anyhow::Result<()> {
        let body = stored
            .bytes
            .slice_ref(without_sequence(&stored.bytes, stored.sequence));
        let hash = order(&r.key, &body);
        if hash % u64::from(r.lanes.max(1)) != u64::from(r.done) {
            return Ok(());
        }
        let record = v1::Record::decode(body.as_ref())?;
        let event_ms = record.event_time.map_or(0, |t| {
            t.seconds
                .saturating_mul(1000)
                .saturating_add(i64::from(t.nanos / 1_000_000))
        });
        if bucket_ms > 0 && event_ms.saturating_add(bucket_ms) > now_ms {
            lane.again.push((body, stored.kept_ms));
        } else {
            lane.released.push((hash, body, stored.kept_ms));
        }
        Ok(())
    }

    /// Stages a lane: its records in hash order into the stream, those held again back into the
    /// hold log, and the checkpoint that says so, in one turn.
    fn stage_lane(&mut self, i: usize, mut r: Releasing, mut lane: Lane) {
        let (stream, hold) = (self.held[i].stream, self.held[i].hold);
        lane.released.sort_unstable_by_key(|(hash, _, _)| *hash);
        if let Some(kept_ms) = lane.released.iter().map(|(_, _, k)| *k).min() {
            let mut bodies = Bodies::default();
            for (_, body, _) in &lane.released {
                bodies.push_with(|buf| buf.extend_from_slice(body));
            }
            // Counted as kept when they arrived, in the hold log.
            self.store
                .stage_encoded(&mut self.pending, stream, &bodies, kept_ms);
        }
        if let Some(kept_ms) = lane.again.iter().map(|(_, k)| *k).min() {
            let mut bodies = Bodies::default();
            for (body, _) in &lane.again {
                bodies.push_with(|buf| buf.extend_from_slice(body));
            }
            self.store
                .stage_encoded(&mut self.pending, hold, &bodies, kept_ms);
        }
        r.done += 1;
        let h = &mut self.held[i];
        let releasing = (r.done < r.lanes).then_some(r);
        if releasing.is_none() {
            h.released_through = r.through;
        }
        h.releasing = releasing;
        h.staged_mark = Some(h.released_through);
        let name = mark_name(&self.policy.streams()[stream].name);
        self.pending
            .checkpoint(name, encode_mark(h.released_through, releasing.as_ref()));
    }

    /// The turn being taken goes to the outbox: its release marks with it.
    pub(super) fn holds_taken(&mut self) {
        for h in &mut self.held {
            if let Some(mark) = h.staged_mark.take() {
                h.committing_mark = Some(mark);
            }
        }
    }

    /// The turn taken last is durable: what it released may leave the hold logs.
    pub(super) fn holds_committed(&mut self) {
        for h in &mut self.held {
            if let Some(mark) = h.committing_mark.take() {
                self.store.released(h.hold, mark);
            }
        }
    }

    /// A turn could not be committed and is staged again: so are its release marks.
    pub(super) fn holds_not_taken(&mut self) {
        for h in &mut self.held {
            if let Some(mark) = h.committing_mark.take() {
                h.staged_mark = Some(mark);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip_with_and_without_a_release_under_way() {
        assert_eq!(decode_mark(&encode_mark(7, None)), Some((7, None)));
        let r = Releasing {
            through: 90,
            boundary_ms: 1_700_000_000_000,
            lanes: 3,
            done: 1,
            key: [4; 32],
        };
        assert_eq!(decode_mark(&encode_mark(7, Some(&r))), Some((7, Some(r))));
        assert_eq!(decode_mark(&[1, 2, 3]), None);
        assert_eq!(decode_mark(&encode_mark(7, Some(&r))[..20]), None);
    }

    #[test]
    fn boundaries_lie_on_the_bucket_grid() {
        assert_eq!(next_boundary(1_000_500, 1_000), 1_001_000);
        assert_eq!(next_boundary(1_001_000, 1_000), 1_002_000);
        assert_eq!(next_boundary(5, 0), 5);
    }
}
