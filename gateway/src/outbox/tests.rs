use std::collections::BTreeMap;

use proptest::prelude::*;

use super::data_keys::DataKeys;
use super::vault::checkpoint_series;
use super::*;

/// What the tests need from each backend beyond the trait.
trait Backend: Outbox + Sized {
    fn open_in(dir: &Path) -> Self;
    /// Overwrites a stored batch value (tests of damage detection).
    fn raw(&self, stream: &str, first: u64, value: &[u8]);
    /// A stored batch value.
    fn raw_value(&self, stream: &str, first: u64) -> Vec<u8>;
    fn vault(&self) -> &Vault;
    /// Moves what a commit made durable elsewhere into the engine's main store (redb's log).
    fn fold(&self);
}

impl Backend for SledOutbox {
    fn open_in(dir: &Path) -> Self {
        SledOutbox::open(dir).unwrap()
    }
    fn raw(&self, stream: &str, first: u64, value: &[u8]) {
        self.raw_insert(stream, first, value);
    }
    fn raw_value(&self, stream: &str, first: u64) -> Vec<u8> {
        self.raw_get(stream, first)
    }
    fn vault(&self) -> &Vault {
        &self.vault
    }
    fn fold(&self) {}
}

#[cfg(feature = "redb")]
impl Backend for RedbOutbox {
    fn open_in(dir: &Path) -> Self {
        RedbOutbox::open(dir).unwrap()
    }
    fn raw(&self, stream: &str, first: u64, value: &[u8]) {
        self.raw_insert(stream, first, value);
    }
    fn raw_value(&self, stream: &str, first: u64) -> Vec<u8> {
        self.raw_get(stream, first)
    }
    fn vault(&self) -> &Vault {
        self.vault_for_tests()
    }
    fn fold(&self) {
        RedbOutbox::fold(self);
    }
}

/// Runs each generic test on every backend built.
macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        mod sled {
            $(#[test] fn $test() { super::$test::<super::SledOutbox>() })*
        }
        #[cfg(feature = "redb")]
        mod redb {
            $(#[test] fn $test() { super::$test::<super::RedbOutbox>() })*
        }
    };
}

on_every_backend!(
    records_and_checkpoints_survive_a_reopen_and_read_from_any_sequence,
    purges_by_age_keep_sequences_moving_forward,
    a_damaged_batch_is_reported_not_returned,
    purged_records_cannot_be_read_back_from_the_disk,
    checkpoints_are_sealed_and_old_versions_shredded,
    a_large_append_is_stored_in_bounded_batches,
);

fn rec(seq: u64) -> Vec<u8> {
    format!("record {seq}").into_bytes()
}

fn append(stream: &str, first: u64, last: u64, kept_ms: i64) -> Append {
    Append {
        stream: stream.into(),
        first,
        kept_ms,
        key_period: Duration::from_secs(10),
        records: (first..=last).map(|s| rec(s).into()).collect(),
    }
}

fn commit(outbox: &impl Outbox, appends: Vec<Append>) {
    outbox
        .commit(&Commit {
            appends,
            checkpoints: Vec::new(),
        })
        .unwrap();
}

fn seqs(read: &ReadBatch) -> Vec<u64> {
    read.records.iter().map(|r| r.sequence).collect()
}

fn records_and_checkpoints_survive_a_reopen_and_read_from_any_sequence<B: Backend>() {
    let dir = tempfile::tempdir().unwrap();
    {
        let outbox = B::open_in(dir.path());
        outbox
            .commit(&Commit {
                appends: vec![append("noise", 1, 5, 10), append("air", 1, 1, 10)],
                checkpoints: vec![("window/footfall".into(), b"{\"windows\":{}}".to_vec())],
            })
            .unwrap();
        commit(&outbox, vec![append("noise", 6, 8, 20)]);
    }
    let outbox = B::open_in(dir.path());
    assert_eq!(outbox.next_sequence("noise").unwrap(), 9);
    assert_eq!(outbox.next_sequence("air").unwrap(), 2);
    assert_eq!(outbox.next_sequence("parking").unwrap(), 1);
    assert_eq!(
        outbox
            .oldest("noise")
            .unwrap()
            .map(|b| (b.first, b.count, b.kept_ms)),
        Some((1, 5, 10))
    );
    let read = outbox.read("noise", 4, 3).unwrap();
    assert_eq!(seqs(&read), [4, 5, 6]);
    assert_eq!(read.records[0].bytes, rec(4));
    assert_eq!((read.records[1].kept_ms, read.records[2].kept_ms), (10, 20));
    assert_eq!(outbox.read("noise", 9, 10).unwrap(), ReadBatch::default());
    assert_eq!(
        outbox.checkpoint("window/footfall").unwrap().as_deref(),
        Some(&b"{\"windows\":{}}"[..])
    );
    // The byte count is rebuilt from the batches on open.
    let expected = [
        append("noise", 1, 5, 10),
        append("air", 1, 1, 10),
        append("noise", 6, 8, 20),
    ]
    .iter()
    .map(|a| batch_len(&a.records) as u64)
    .sum::<u64>();
    assert_eq!(outbox.record_bytes(), expected);
}

fn a_large_append_is_stored_in_bounded_batches<B: Backend>() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = B::open_in(dir.path());
    // 300 records of 200 bytes, and in their midst one of 20 KiB: larger than a batch.
    let mut records: Vec<bytes::Bytes> = (1..=300)
        .map(|s| {
            let mut r = rec(s);
            r.resize(200, b'x');
            r.into()
        })
        .collect();
    records.insert(150, vec![7; 20 * 1024].into());
    let commit = Commit {
        appends: vec![Append {
            records: records.clone(),
            ..append("s", 1, 1, 10)
        }],
        checkpoints: Vec::new(),
    };
    outbox.commit(&commit).unwrap();
    assert_eq!(outbox.record_bytes(), commit.record_bytes());
    assert_eq!(outbox.next_sequence("s").unwrap(), 302);
    let read = outbox.read("s", 1, 1_000).unwrap();
    assert_eq!(seqs(&read), (1..=301).collect::<Vec<_>>());
    assert!(
        read.records
            .iter()
            .zip(&records)
            .all(|(r, b)| r.bytes == **b)
    );

    // The batches, oldest first, by taking them off one by one.
    let mut batches = Vec::new();
    while let Some(b) = outbox.oldest("s").unwrap() {
        outbox
            .purge_while("s", &mut |p| p.first == b.first)
            .unwrap();
        batches.push(b);
    }
    assert!(batches.len() >= 5, "{batches:?}");
    assert!(
        batches
            .windows(2)
            .all(|w| w[0].first + w[0].count == w[1].first)
    );
    assert_eq!(batches.iter().map(|b| b.count).sum::<u64>(), 301);
    assert_eq!(
        batches.iter().map(|b| b.bytes).sum::<u64>(),
        commit.record_bytes()
    );
    for (i, b) in batches.iter().enumerate() {
        if b.first == 151 {
            assert_eq!(b.count, 1, "the large record is alone: {b:?}");
            continue;
        }
        assert!(b.bytes <= BATCH_MAX as u64, "{b:?}");
        // Each batch is filled, but the last before the large record and the last of all.
        let followed_by_large = batches.get(i + 1).is_some_and(|n| n.first == 151);
        if !followed_by_large && i + 1 < batches.len() {
            assert!(b.bytes + 204 > BATCH_MAX as u64, "{b:?}");
        }
    }
}

fn purges_by_age_keep_sequences_moving_forward<B: Backend>() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = B::open_in(dir.path());
    commit(&outbox, vec![append("s", 1, 3, 1_000)]);
    commit(&outbox, vec![append("s", 4, 4, 2_000)]);
    commit(&outbox, vec![append("s", 5, 6, 3_000)]);
    let purged = outbox.purge_while("s", &mut |b| b.kept_ms < 2_500).unwrap();
    assert_eq!(purged.records, 4);
    assert_eq!(purged.sequences, Some((1, 4)));
    assert_eq!(purged.kept_ms, Some((1_000, 2_000)));
    assert_eq!(seqs(&outbox.read("s", 1, 10).unwrap()), [5, 6]);
    outbox.purge_while("s", &mut |_| true).unwrap();
    assert_eq!(outbox.oldest("s").unwrap(), None);
    assert_eq!(outbox.record_bytes(), 0);
    drop(outbox);
    // Emptied by retention, the stream still continues from 7 after a restart.
    let outbox = B::open_in(dir.path());
    assert_eq!(outbox.next_sequence("s").unwrap(), 7);
}

fn a_damaged_batch_is_reported_not_returned<B: Backend>() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = B::open_in(dir.path());
    for (f, l) in [(1, 3), (4, 6), (7, 9)] {
        commit(&outbox, vec![append("noise", f, l, 5)]);
    }
    // A flipped bit in the middle batch, and a torn (truncated) last batch.
    let mut value = outbox.raw_value("noise", 4);
    value[HEADER + 6] ^= 0x10;
    outbox.raw("noise", 4, &value);
    let torn = outbox.raw_value("noise", 7);
    outbox.raw("noise", 7, &torn[..torn.len() - 3]);
    // A read stops before the damage once it has records …
    let read = outbox.read("noise", 2, 100).unwrap();
    assert_eq!(seqs(&read), [2, 3]);
    assert!(read.damaged.is_empty());
    // … and reports it when it starts there.
    let read = outbox.read("noise", 4, 100).unwrap();
    assert_eq!(seqs(&read), Vec::<u64>::new());
    assert_eq!(read.damaged, vec![(4, 6), (7, 9)]);
    // Retention removes damaged batches first.
    let purged = outbox.purge_while("noise", &mut |b| b.kept_ms < 0).unwrap();
    assert_eq!(purged, Purged::default());
    let mut seen = Vec::new();
    outbox
        .purge_while("noise", &mut |b| {
            seen.push((b.first, b.count, b.damaged));
            true
        })
        .unwrap();
    assert_eq!(seen, [(1, 3, false), (4, 3, true), (7, 3, true)]);
}

/// Every file under `dir`, concatenated.
fn disk_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(disk_bytes(&path));
        } else {
            out.extend(std::fs::read(&path).unwrap());
        }
    }
    out
}

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Neither engine overwrites what it deletes; the destroyed data key makes what is left of a
/// purged record unreadable.
fn purged_records_cannot_be_read_back_from_the_disk<B: Backend>() {
    let dir = tempfile::tempdir().unwrap();
    let marked = |first: u64, kept_ms: i64| {
        let mut a = append("s", first, first + 99, kept_ms);
        for (i, r) in a.records.iter_mut().enumerate() {
            *r = format!("MARKER-{:05}", first + i as u64)
                .into_bytes()
                .into();
        }
        a
    };
    let outbox = B::open_in(dir.path());
    // Two key periods (10 s each): records 1..=200 under one key, 201..=300 under the next.
    commit(&outbox, vec![marked(1, 0)]);
    commit(&outbox, vec![marked(101, 5_000)]);
    let key_path = dir.path().join("keys");
    let old_key = outbox.vault().lock().raw_key(&key_path, "s", 1).unwrap();
    commit(&outbox, vec![marked(201, 10_000)]);
    // Sealed: no record is on disk in clear.
    assert!(!holds(&disk_bytes(dir.path()), b"MARKER-"));
    // Purging the first batch leaves the key: the second batch still needs it.
    let purged = outbox.purge_while("s", &mut |b| b.first == 1).unwrap();
    assert!(purged.keys_destroyed.is_empty());
    assert!(holds(&disk_bytes(dir.path()), &old_key));
    // Purging the second destroys it, in the key file too.
    let purged = outbox.purge_while("s", &mut |b| b.first == 101).unwrap();
    assert_eq!(purged.keys_destroyed, [1]);
    assert!(!holds(&disk_bytes(dir.path()), &old_key));
    // The records still held read as before, also after a reopen.
    drop(outbox);
    let outbox = B::open_in(dir.path());
    let read = outbox.read("s", 1, 1000).unwrap();
    assert_eq!(seqs(&read), (201..=300).collect::<Vec<_>>());
    assert_eq!(read.records[0].bytes, b"MARKER-00201");
    assert!(read.damaged.is_empty());
}

/// A packed value holds only sealed parts, and a purge of it destroys the keys its parts
/// alone needed, also where its parts were sealed under two keys.
#[cfg(feature = "redb")]
#[test]
fn packed_values_hold_sealed_parts_and_their_purge_destroys_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = RedbOutbox::open(dir.path()).unwrap();
    let marked = |first: u64, kept_ms: i64| Append {
        records: (first..first + 10)
            .map(|s| format!("MARKER-{s:05}").into_bytes().into())
            .collect(),
        key_period: Duration::from_secs(1),
        ..append("s", first, first, kept_ms)
    };
    // Keys rotate every second: 1..=20 under the first key, 21..=40 under the next; the
    // three batches kept within a second of each other are packed into one value.
    for (first, kept_ms) in [(1, 500), (11, 900), (21, 1_500), (31, 2_400)] {
        commit(&outbox, vec![marked(first, kept_ms)]);
    }
    outbox.fold_packed();
    let oldest = outbox.oldest("s").unwrap().unwrap();
    assert_eq!((oldest.first, oldest.count), (1, 30));
    assert!(!holds(&disk_bytes(dir.path()), b"MARKER-"));
    let key_path = dir.path().join("keys");
    let first_key = outbox.vault().lock().raw_key(&key_path, "s", 1).unwrap();
    let second_key = outbox.vault().lock().raw_key(&key_path, "s", 21).unwrap();
    // The packed value goes whole; the first key with it, the second stays for 31..=40.
    let purged = outbox.purge_while("s", &mut |b| b.kept_ms < 600).unwrap();
    assert_eq!(
        (purged.records, purged.keys_destroyed.clone()),
        (30, vec![1])
    );
    let disk = disk_bytes(dir.path());
    assert!(!holds(&disk, &first_key));
    assert!(holds(&disk, &second_key));
    let read = outbox.read("s", 1, 100).unwrap();
    assert_eq!(seqs(&read), (31..=40).collect::<Vec<_>>());
}

fn checkpoint_commit(outbox: &impl Outbox, name: &str, bytes: &[u8]) {
    outbox
        .commit(&Commit {
            appends: Vec::new(),
            checkpoints: vec![(name.into(), bytes.to_vec())],
        })
        .unwrap();
}

fn checkpoints_are_sealed_and_old_versions_shredded<B: Backend>() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("keys");
    let series = checkpoint_series("window/footfall");
    let first_key = {
        let outbox = B::open_in(dir.path());
        checkpoint_commit(&outbox, "window/footfall", b"GROUPS-v1");
        checkpoint_commit(&outbox, "window/footfall", b"GROUPS-v2");
        assert_eq!(
            outbox.checkpoint("window/footfall").unwrap().as_deref(),
            Some(&b"GROUPS-v2"[..])
        );
        outbox
            .vault()
            .lock()
            .raw_key(&key_path, &series, 1)
            .unwrap()
    };
    assert!(!holds(&disk_bytes(dir.path()), b"GROUPS-"));
    // A new process seals the next version under a key of its own; once it is durable, the
    // key of the older versions is destroyed.
    let outbox = B::open_in(dir.path());
    assert_eq!(
        outbox.checkpoint("window/footfall").unwrap().as_deref(),
        Some(&b"GROUPS-v2"[..])
    );
    checkpoint_commit(&outbox, "window/footfall", b"GROUPS-v3");
    assert!(!holds(&disk_bytes(dir.path()), &first_key));
    assert_eq!(
        outbox.checkpoint("window/footfall").unwrap().as_deref(),
        Some(&b"GROUPS-v3"[..])
    );
    assert_eq!(outbox.checkpoint("window/other").unwrap(), None);
}

#[derive(Debug, Clone)]
enum Op {
    Append(u8),
    Purge(u8),
    Read(u8, u8),
    Reopen,
    Fold,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..20).prop_map(Op::Append),
        1 => any::<u8>().prop_map(Op::Purge),
        2 => (any::<u8>(), 1u8..50).prop_map(|(f, m)| Op::Read(f, m)),
        1 => Just(Op::Reopen),
        1 => Just(Op::Fold),
    ]
}

/// The outbox behaves like an ordered map of sequence to record, across reopens.
fn the_outbox_matches_a_model<B: Backend>(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = B::open_in(dir.path());
    let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut next = 1u64;
    // Batches as (first, count), to model purges of whole batches.
    let mut batches: Vec<(u64, u64)> = Vec::new();
    for op in ops {
        match op {
            Op::Append(n) => {
                let n = u64::from(n);
                commit(&outbox, vec![append("s", next, next + n - 1, 0)]);
                for s in next..next + n {
                    model.insert(s, rec(s));
                }
                batches.push((next, n));
                next += n;
            }
            Op::Purge(before) => {
                let before = u64::from(before);
                let removed = outbox
                    .purge_while("s", &mut |b| b.first + b.count <= before)
                    .unwrap();
                let mut expected = 0;
                while let Some(&(f, c)) = batches.first() {
                    if f + c > before {
                        break;
                    }
                    for s in f..f + c {
                        model.remove(&s);
                    }
                    expected += c;
                    batches.remove(0);
                }
                prop_assert_eq!(removed.records, expected);
            }
            Op::Read(from, max) => {
                let read = outbox.read("s", u64::from(from), usize::from(max)).unwrap();
                let want: Vec<(u64, Vec<u8>)> = model
                    .range(u64::from(from)..)
                    .take(usize::from(max))
                    .map(|(s, r)| (*s, r.clone()))
                    .collect();
                let got: Vec<(u64, Vec<u8>)> = read
                    .records
                    .into_iter()
                    .map(|r| (r.sequence, r.bytes))
                    .collect();
                prop_assert_eq!(got, want);
                prop_assert!(read.damaged.is_empty());
            }
            Op::Reopen => {
                drop(outbox);
                outbox = B::open_in(dir.path());
            }
            Op::Fold => outbox.fold(),
        }
        prop_assert_eq!(outbox.next_sequence("s").unwrap(), next);
        prop_assert_eq!(
            outbox.oldest("s").unwrap().map(|b| b.first),
            batches.first().map(|b| b.0)
        );
        let bytes: u64 = batches
            .iter()
            .map(|&(f, c)| batch_len(&(f..f + c).map(|s| rec(s).into()).collect::<Vec<_>>()) as u64)
            .sum();
        prop_assert_eq!(outbox.record_bytes(), bytes);
    }
    Ok(())
}

/// Records of a stream as `values` hold them, by stream: sequence, kept time, bytes; and the
/// values of other keys.
type Contents = (
    BTreeMap<Vec<u8>, Vec<(u64, i64, Vec<u8>)>>,
    Vec<(Vec<u8>, Vec<u8>)>,
);

fn contents<'v>(keys: &DataKeys, values: impl Iterator<Item = (&'v [u8], &'v [u8])>) -> Contents {
    let (mut records, mut others) = (BTreeMap::new(), Vec::new());
    for (key, value) in values {
        if key[0] != b'r' {
            others.push((key.to_vec(), value.to_vec()));
            continue;
        }
        let stream = &key[1..key.len() - 9];
        let first = seq_of(key);
        let name = std::str::from_utf8(stream).unwrap();
        let Decoded::Records(held) = decode(keys, name, first, value) else {
            panic!("a value of {name} from {first} does not decode");
        };
        let list: &mut Vec<_> = records.entry(stream.to_vec()).or_default();
        list.extend(
            (first..)
                .zip(held)
                .map(|(seq, (kept, bytes))| (seq, kept, bytes)),
        );
    }
    (records, others)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Batches as commits write them (of two streams, with gaps in the sequences), packed:
    /// every record reads back as it was, with its kept time, other values are kept as they
    /// are, and packed values are at most a batch long and span at most a second of kept
    /// times.
    #[test]
    fn packing_keeps_every_record_in_bounded_values(
        specs in prop::collection::vec((0usize..2, 1u64..8, 1usize..2_500, prop::bool::weighted(0.1)), 1..60)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::open(dir.path()).unwrap();
        let mut keys = vault.lock();
        let mut next = [1u64; 2];
        let mut inserts = BTreeMap::new();
        inserts.insert(named_key(b'c', "window"), b"checkpoint".to_vec());
        for (i, (stream, n, size, gap)) in specs.into_iter().enumerate() {
            let name = ["a", "b"][stream];
            let first = next[stream] + u64::from(gap);
            let records = (first..first + n).map(|q| {
                let mut r = rec(q);
                r.resize(size, b'.');
                r.into()
            });
            let a = Append {
                stream: name.into(),
                first,
                kept_ms: 100 * i as i64,
                // A new data key every second: some packed values hold parts of two.
                key_period: Duration::from_secs(1),
                records: records.collect(),
            };
            for (first, batch) in batches(&a) {
                inserts.insert(record_key(name, first), encode(&mut keys, &a, first, batch).unwrap());
            }
            next[stream] = first + n;
            inserts.insert(named_key(b'n', name), next[stream].to_be_bytes().to_vec());
        }
        let inserts: Vec<(Vec<u8>, Vec<u8>)> = inserts.into_iter().collect();
        let (packed, growth) = pack(&inserts);

        let before = contents(&keys, inserts.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
        let after = contents(&keys, packed.iter().map(|(k, v)| (*k, v.as_ref())));
        prop_assert_eq!(&after, &before);
        let bytes = |values: &mut dyn Iterator<Item = usize>| values.sum::<usize>() as u64;
        prop_assert_eq!(
            bytes(&mut packed.iter().map(|(_, v)| v.len())),
            bytes(&mut inserts.iter().map(|(_, v)| v.len())) + growth
        );
        for (key, value) in &packed {
            if value[0] != PACKED_VERSION || key[0] != b'r' {
                continue;
            }
            prop_assert!(value.len() <= BATCH_MAX, "{}", value.len());
            let name = std::str::from_utf8(&key[1..key.len() - 9]).unwrap();
            let Decoded::Records(held) = decode(&keys, name, seq_of(key), value) else {
                unreachable!("checked above");
            };
            let kept = held.iter().map(|(kept, _)| *kept);
            let span = kept.clone().max().unwrap() - kept.min().unwrap();
            prop_assert!(span <= PACK_SPAN_MS as i64, "{}", span);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn sled_matches_the_model(ops in prop::collection::vec(op(), 1..40)) {
        the_outbox_matches_a_model::<SledOutbox>(ops)?;
    }

    #[cfg(feature = "redb")]
    #[test]
    fn redb_matches_the_model(ops in prop::collection::vec(op(), 1..40)) {
        the_outbox_matches_a_model::<RedbOutbox>(ops)?;
    }
}

/// A snapshot sled began and did not finish (killed while the disk was full) no longer stops
/// the start: it is removed, and every record is still there.
#[test]
fn an_unfinished_sled_snapshot_is_removed_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    {
        let outbox = SledOutbox::open(dir.path()).unwrap();
        commit(&outbox, vec![append("s", 1, 5, 5)]);
    }
    let unfinished = dir.path().join("sled/snap.FFFFFFFFFFFFFFFF.generating");
    std::fs::write(&unfinished, b"").unwrap();
    let outbox = SledOutbox::open(dir.path()).unwrap();
    assert!(!unfinished.exists());
    assert_eq!(seqs(&outbox.read("s", 1, 100).unwrap()), [1, 2, 3, 4, 5]);
}

/// Damaged sled files give an error naming the directory, or a database that opens; never a
/// panic out of the open.
#[test]
fn damaged_sled_files_never_make_the_open_panic() {
    for (file, at) in [("db", 0.0), ("db", 0.3), ("db", 0.7), ("conf", 0.5)] {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = SledOutbox::open(dir.path()).unwrap();
            for first in (1..200).step_by(10) {
                commit(&outbox, vec![append("s", first, first + 9, 5)]);
            }
        }
        let path = dir.path().join("sled").join(file);
        let mut bytes = std::fs::read(&path).unwrap();
        let i = ((bytes.len() as f64 * at) as usize).min(bytes.len() - 1);
        let end = (i + 64).min(bytes.len());
        for b in &mut bytes[i..end] {
            *b ^= 0x5a;
        }
        std::fs::write(&path, &bytes).unwrap();
        let opened = std::panic::catch_unwind(|| SledOutbox::open(dir.path()).map(|_| ()));
        match opened {
            Ok(Ok(())) => {}
            Ok(Err(err)) => assert!(!err.to_string().is_empty()),
            Err(_) => panic!("opening {file} damaged at {at} panicked"),
        }
    }
}
