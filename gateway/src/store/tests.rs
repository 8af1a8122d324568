use super::*;
use crate::outbox::SledOutbox;

fn rec(n: i64) -> v1::Record {
    v1::Record {
        stream: "s".into(),
        event_time: Some(prost_types::Timestamp {
            seconds: n,
            nanos: 0,
        }),
        ..Default::default()
    }
}

fn seqs(b: &Batch) -> Vec<u64> {
    b.records.iter().map(|r| r.sequence).collect()
}

fn config(memory: usize, max_bytes: u64, on_full: OnFull) -> StoreConfig {
    StoreConfig {
        memory_records_per_stream: memory,
        max_bytes,
        on_full,
        ..StoreConfig::default()
    }
}

fn open(dir: &std::path::Path, config: &StoreConfig) -> Store {
    let outbox = Arc::new(SledOutbox::open(dir).unwrap());
    let audit = Arc::new(AuditLog::open(&dir.join("audit.jsonl")).unwrap());
    Store::open(outbox, [("s", Duration::from_secs(60))], config, audit).unwrap()
}

fn append(store: &Store, events: std::ops::Range<i64>, now_ms: i64) {
    let mut pending = Pending::default();
    store.stage(&mut pending, 0, events.map(rec), now_ms);
    store.commit(&mut pending, now_ms).unwrap();
}

#[test]
fn sequences_start_at_one_and_reads_resume_without_gaps_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), &config(100, 1 << 20, OnFull::DropOldest));
    assert_eq!(s.positions(0), (0, 0));
    append(&s, 0..5, 0);
    let b = s.read(0, 1, 3, 0);
    assert_eq!(seqs(&b), [1, 2, 3]);
    assert_eq!(b.gap, None);
    append(&s, 5..7, 0);
    let b2 = s.read(0, b.next, 100, 0);
    assert_eq!(seqs(&b2), [4, 5, 6, 7]);
    assert_eq!(s.read(0, b2.next, 100, 0).records.len(), 0);
    assert_eq!(s.positions(0), (1, 7));
    assert_eq!(s.next_sequence(0), 8);
}

/// Each record's bytes decode to the record with the store's sequence, in memory and on
/// disk, for sequences of one to three varint bytes, whatever sequence it was staged with.
#[test]
fn stored_bytes_carry_the_stores_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), &config(64, 1 << 24, OnFull::DropOldest));
    let mut pending = Pending::default();
    let staged = (0..20_000).map(|n| v1::Record {
        sequence: 7,
        ..rec(n)
    });
    s.stage(&mut pending, 0, staged, 0);
    s.commit(&mut pending, 0).unwrap();
    for from in [1, 127, 128, 16_383, 16_384, 19_937] {
        let b = s.read(0, from, 64, 0);
        assert_eq!(b.records.len(), 64.min(20_001 - from as usize));
        for r in &b.records {
            let record = r.record().unwrap();
            assert_eq!(record.sequence, r.sequence);
            let n = i64::try_from(r.sequence).unwrap() - 1;
            assert_eq!(
                record,
                v1::Record {
                    sequence: r.sequence,
                    ..rec(n)
                }
            );
        }
    }
    assert!(s.reads_disk(0, 1) && !s.reads_disk(0, 19_937));
}

#[test]
fn staged_records_are_invisible_until_committed() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), &config(100, 1 << 20, OnFull::DropOldest));
    let mut w = s.watch(0);
    let mut pending = Pending::default();
    s.stage(&mut pending, 0, (0..3).map(rec), 0);
    assert_eq!(s.read(0, 1, 10, 0).records.len(), 0);
    assert_eq!(s.next_sequence(0), 1);
    assert!(!w.has_changed().unwrap());
    s.commit(&mut pending, 0).unwrap();
    assert!(pending.is_empty());
    assert!(w.has_changed().unwrap());
    assert_eq!(*w.borrow_and_update(), 3);
    assert_eq!(seqs(&s.read(0, 1, 10, 0)), [1, 2, 3]);
}

#[test]
fn older_records_are_read_from_disk_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path(), &config(3, 1 << 20, OnFull::DropOldest));
        append(&s, 0..10, 0);
        assert!(s.reads_disk(0, 2));
        assert!(!s.reads_disk(0, 8));
        let b = s.read(0, 2, 100, 0);
        assert_eq!(b.gap, None);
        assert_eq!(seqs(&b), (2..=10).collect::<Vec<_>>());
        assert_eq!(
            b.records[0]
                .record()
                .expect("decodes")
                .event_time
                .unwrap()
                .seconds,
            1
        );
    }
    let s = open(dir.path(), &config(3, 1 << 20, OnFull::DropOldest));
    assert_eq!(s.positions(0), (1, 10));
    assert_eq!(seqs(&s.read(0, 9, 100, 0)), [9, 10]);
    append(&s, 10..11, 0);
    assert_eq!(seqs(&s.read(0, 10, 100, 0)), [10, 11]);
}

#[test]
fn records_older_than_retention_are_purged_from_disk_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), &config(100, 1 << 20, OnFull::DropOldest));
    append(&s, 0..2, 0);
    append(&s, 2..3, 30_000);
    // At 61 s the first two are within one key period and a purge tick (3.5 s) of the 60 s
    // limit; the third is not. Reads leave expired records out even before the purge runs.
    let b = s.read(0, 1, 100, 61_000);
    assert_eq!(b.gap, Some((1, 2)));
    assert_eq!(seqs(&b), [3]);
    s.purge_expired_all(61_000);
    assert_eq!(s.positions(0), (3, 3));
    assert_eq!(s.outbox.read("s", 1, 10).unwrap().records.len(), 1);
    s.purge_expired_all(91_000);
    assert_eq!(s.outbox.record_bytes(), 0);
    let b = s.read(0, 1, 100, 91_000);
    assert_eq!(seqs(&b), Vec::<u64>::new());
    assert_eq!(b.gap, Some((1, 3)));
    assert_eq!(b.next, 4);
}

#[test]
fn a_gap_for_expired_records_never_covers_fresh_ones() {
    // From memory (capacity 100) and from disk (capacity 3).
    for memory in [100, 3] {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), &config(memory, 1 << 20, OnFull::DropOldest));
        append(&s, 0..10, 0);
        append(&s, 10..20, 30_000);
        // At 61 s the first ten are expired but not purged yet; reads of five at a time
        // report exactly those ten as gone, and every fresh one.
        let (mut gone, mut got, mut next) = (Vec::new(), Vec::new(), 1);
        while next <= 20 {
            let b = s.read(0, next, 5, 61_000);
            if let Some((first, last)) = b.gap {
                gone.extend(first..=last);
            }
            got.extend(seqs(&b));
            next = b.next;
        }
        assert_eq!(gone, (1..=10).collect::<Vec<_>>(), "memory {memory}");
        assert_eq!(got, (11..=20).collect::<Vec<_>>(), "memory {memory}");
    }
}

#[test]
fn a_stream_the_policy_no_longer_declares_is_purged_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), &config(100, 1 << 20, OnFull::DropOldest));
    append(&s, 0..5, 0);
    drop(s);
    let outbox = Arc::new(SledOutbox::open(dir.path()).unwrap());
    let audit = Arc::new(AuditLog::open(&dir.path().join("audit.jsonl")).unwrap());
    let config = StoreConfig {
        data_dir: dir.path().to_owned(),
        ..StoreConfig::default()
    };
    let s = Store::open(
        Arc::clone(&outbox) as Arc<dyn Outbox>,
        [("renamed", Duration::from_secs(60))],
        &config,
        audit,
    )
    .unwrap();
    assert_eq!(outbox.oldest("s").unwrap(), None);
    assert_eq!(outbox.record_bytes(), 0);
    drop(s);
    let log = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(log.contains("\"reason\":\"stream_removed\""), "{log}");
    assert!(log.contains("\"records\":5"), "{log}");
}

/// Bytes a batch of ten records takes in the outbox (event times from 10 s on all encode
/// alike).
fn ten_records_bytes() -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let mut one = Pending::default();
    let probe = open(dir.path(), &config(100, 1 << 20, OnFull::DropOldest));
    probe.stage(&mut one, 0, (10..20).map(rec), 0);
    one.commit.record_bytes()
}

/// Turns alternating between two streams into an outbox with room for 640 of them: it never
/// holds more than its cap, purges a few times rather than before every commit, and takes the
/// oldest batches of either stream first.
#[test]
fn a_full_outbox_purges_in_steps_oldest_first_across_streams() {
    const TURNS: i64 = 1_200;
    let batch = ten_records_bytes();
    let dir = tempfile::tempdir().unwrap();
    let outbox = Arc::new(SledOutbox::open(dir.path()).unwrap());
    let audit = Arc::new(AuditLog::open(&dir.path().join("audit.jsonl")).unwrap());
    let streams = [
        ("a", Duration::from_secs(3600)),
        ("b", Duration::from_secs(3600)),
    ];
    let cap = 640 * batch;
    let config = config(100, cap, OnFull::DropOldest);
    let s = Store::open(outbox.clone(), streams, &config, audit).unwrap();
    for turn in 0..TURNS {
        let mut pending = Pending::default();
        s.stage(&mut pending, (turn % 2) as usize, (10..20).map(rec), turn);
        s.commit(&mut pending, turn).unwrap();
        assert!(outbox.record_bytes() <= cap, "turn {turn}");
    }
    assert!(outbox.record_bytes() >= cap - cap / 64 - batch);
    let log = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let purges = log
        .lines()
        .filter(|l| l.contains("\"event\":\"purge\"") && l.contains("\"capacity\""))
        .count();
    // One purge before each of the last 560 commits without steps; with them, at most one per
    // stream in each round, and a round every 10 turns or so.
    assert!((2..=140).contains(&purges), "{purges} purges");
    let oldest = |stream| outbox.oldest(stream).unwrap().unwrap().kept_ms;
    assert!(
        (oldest("a") - oldest("b")).abs() <= 3,
        "{} {}",
        oldest("a"),
        oldest("b")
    );
    assert_eq!(s.positions(0).1, TURNS as u64 / 2 * 10);
}

#[test]
fn a_full_outbox_drops_the_oldest_or_refuses() {
    let batch = ten_records_bytes();
    let dir = tempfile::tempdir().unwrap();
    // Room for three batches of ten records.
    let s = open(dir.path(), &config(100, 3 * batch + 1, OnFull::DropOldest));
    for i in 1..5 {
        append(&s, i * 10..i * 10 + 10, i);
    }
    // Making room for the fourth batch purged a 64th of the cap more than it needed: two.
    assert_eq!(s.positions(0), (21, 40));
    append(&s, 50..60, 5);
    assert_eq!(s.positions(0), (21, 50));
    let b = s.read(0, 1, 100, 10);
    assert_eq!(b.gap, Some((1, 20)));
    assert_eq!(b.records.len(), 30);

    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), &config(100, 3 * batch + 1, OnFull::StopAcking));
    for i in 0..3 {
        append(&s, 10 + i * 10..20 + i * 10, i);
    }
    let mut pending = Pending::default();
    s.stage(&mut pending, 0, (40..50).map(rec), 3);
    assert!(matches!(
        s.commit(&mut pending, 3),
        Err(CommitError::Full { .. })
    ));
    assert!(!pending.is_empty());
    assert_eq!(s.positions(0), (1, 30));
    // Retention frees room; the same pending commit then goes through with its sequences.
    // (Records go one key period and a purge tick, 3.5 s of the 60 s retention, early.)
    s.purge_expired_all(56_501);
    s.commit(&mut pending, 56_501).unwrap();
    let b = s.read(0, 1, 100, 56_501);
    assert_eq!(b.gap, Some((1, 10)));
    assert_eq!(seqs(&b), (11..=40).collect::<Vec<_>>());
}

/// When the engine's newest data is lost (as damage to its log would lose it), numbering goes
/// on from the sequence noted apart from the data: no number is handed out twice, readers get a
/// Gap for what is lost, and the loss is audited.
#[test]
fn lost_newest_data_never_makes_a_sequence_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(1, u64::MAX, OnFull::DropOldest);
    let now = now_ms();
    {
        let store = open(dir.path(), &cfg);
        append(&store, 0..3, now);
        assert_eq!(
            store.outbox.high_water().next("s"),
            Some(4),
            "noted before the records are shown"
        );
    }
    // Records 4 to 9 were shown, then the engine lost them.
    SledOutbox::open(dir.path())
        .unwrap()
        .high_water()
        .note([("s".to_owned(), 10)])
        .unwrap();
    let store = open(dir.path(), &cfg);
    assert_eq!(store.next_sequence(0), 10);
    append(&store, 3..5, now);
    let old = store.read(0, 1, 100, now);
    assert_eq!(seqs(&old), [1, 2, 3]);
    let after = store.read(0, old.next, 100, now);
    assert_eq!(after.gap, Some((4, 9)));
    assert_eq!(seqs(&after), [10, 11]);
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"event\":\"outbox_records_lost\""),
        "{audit}"
    );
    assert!(audit.contains("\"first_sequence\":4") && audit.contains("\"last_sequence\":9"));
}

/// Damaged ranges are counted once however they overlap what was found before.
#[test]
fn damaged_ranges_are_counted_once() {
    let mut known = Vec::new();
    assert_eq!(newly_damaged(&mut known, 1, 5), 5);
    assert_eq!(newly_damaged(&mut known, 3, 10), 5);
    assert_eq!(newly_damaged(&mut known, 1, 5), 0);
    assert_eq!(newly_damaged(&mut known, 2, 9), 0);
    assert_eq!(newly_damaged(&mut known, 8, 12), 2);
    assert_eq!(newly_damaged(&mut known, 20, 20), 1);
    assert_eq!(newly_damaged(&mut known, 1, 20), 7);
}
