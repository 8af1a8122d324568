use super::*;
use crate::outbox::Append;

fn append(first: u64, n: u64) -> Append {
    Append {
        stream: "s".into(),
        first,
        kept_ms: 0,
        key_period: Duration::from_secs(10),
        records: (first..first + n)
            .map(|s| format!("{s:0200}").into_bytes().into())
            .collect(),
    }
}

fn commit(outbox: &RedbOutbox, first: u64, n: u64) {
    let commit = Commit {
        appends: vec![append(first, n)],
        checkpoints: Vec::new(),
    };
    outbox.commit(&commit).unwrap();
}

fn sequences(outbox: &RedbOutbox, from: u64) -> Vec<u64> {
    let read = outbox.read("s", from, usize::MAX).unwrap();
    assert!(read.damaged.is_empty());
    for r in &read.records {
        assert_eq!(r.bytes, format!("{:0200}", r.sequence).into_bytes());
    }
    read.records.iter().map(|r| r.sequence).collect()
}

/// Waits for a fold being written, and says whether anything waits in memory; checks that
/// the bytes shown as waiting are those of what waits.
fn settled(outbox: &RedbOutbox) -> bool {
    drop(outbox.shared.no_fold(outbox.shared.lock_log()));
    let waiting = outbox.shared.lock_waiting();
    let bytes: usize = (waiting.inserts.iter())
        .map(|(k, (_, v))| k.len() + v.len())
        .sum();
    assert_eq!(waiting.bytes, bytes as u64);
    !waiting.inserts.is_empty()
}

#[test]
fn commits_wait_in_the_log_and_fold_into_redb_on_a_thread_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let db_file = dir.path().join("outbox.redb");
    let outbox = RedbOutbox::open(dir.path()).unwrap();
    no_idle_folds(&outbox);
    let untouched = std::fs::read(&db_file).unwrap();
    // Commits of ten records of 200 bytes, up to just below a fold: redb's file is not
    // written, and reads find every record.
    let mut next = 1;
    while outbox.shared.lock_log().active_bytes + 2 * 2_300 < FOLD_BYTES {
        commit(&outbox, next, 10);
        next += 10;
    }
    assert!(next > 400, "{next}");
    assert_eq!(std::fs::read(&db_file).unwrap(), untouched);
    assert_eq!(sequences(&outbox, 1), (1..next).collect::<Vec<_>>());
    assert_eq!(outbox.next_sequence("s").unwrap(), next);
    assert_eq!(outbox.streams().unwrap(), ["s"]);
    // A commit past the fold's size hands everything to the fold thread, which writes it
    // to redb.
    let mut commits = 0;
    while outbox.shared.lock_log().active_bytes > 0 {
        commit(&outbox, next, 10);
        next += 10;
        commits += 1;
    }
    assert!(commits <= 2, "{commits}");
    assert!(!settled(&outbox), "all of it was folded");
    assert_ne!(std::fs::read(&db_file).unwrap(), untouched);
    commit(&outbox, next, 10);
    next += 10;
    assert!(settled(&outbox));
    // Reads go on across what is in redb and what waits, from any sequence.
    assert_eq!(sequences(&outbox, 1), (1..next).collect::<Vec<_>>());
    assert_eq!(
        sequences(&outbox, next - 15),
        (next - 15..next).collect::<Vec<_>>()
    );
    assert_eq!(outbox.oldest("s").unwrap().map(|b| b.first), Some(1));
    let bytes = outbox.record_bytes();
    // What waits survives a reopen (the log is folded on open).
    drop(outbox);
    let outbox = RedbOutbox::open(dir.path()).unwrap();
    assert!(!settled(&outbox));
    assert_eq!(sequences(&outbox, 1), (1..next).collect::<Vec<_>>());
    assert_eq!(outbox.next_sequence("s").unwrap(), next);
    assert_eq!(outbox.record_bytes(), bytes);
}

/// Turns off the folds the fold thread makes when commits stop, for tests that check what
/// waits in memory across pauses a slow machine could make longer than [`FOLD_AFTER`].
fn no_idle_folds(outbox: &RedbOutbox) {
    (outbox.shared.faults.no_idle_folds).store(true, Ordering::SeqCst);
}

#[test]
fn checkpoints_go_through_the_log_and_large_commits_write_through_as_purges_of_what_waits() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = RedbOutbox::open(dir.path()).unwrap();
    no_idle_folds(&outbox);
    commit(&outbox, 1, 10);
    for state in [&b"first"[..], b"second"] {
        let with_checkpoint = Commit {
            appends: Vec::new(),
            checkpoints: vec![("window/s".into(), state.to_vec())],
        };
        outbox.commit(&with_checkpoint).unwrap();
    }
    assert!(settled(&outbox), "in the log");
    assert_eq!(
        outbox.checkpoint("window/s").unwrap().as_deref(),
        Some(&b"second"[..])
    );
    drop(outbox);
    let outbox = RedbOutbox::open(dir.path()).unwrap();
    assert_eq!(
        outbox.checkpoint("window/s").unwrap().as_deref(),
        Some(&b"second"[..])
    );
    // More than half the log (4 MiB) goes to redb at once, with what waits.
    commit(&outbox, 11, 5);
    commit(&outbox, 16, 21_000);
    assert!(!settled(&outbox));
    assert_eq!(sequences(&outbox, 1), (1..21_016).collect::<Vec<_>>());
    // A purge of batches in redb leaves what waits in memory alone; one that reaches a
    // batch waiting in memory writes it to redb first.
    commit(&outbox, 21_016, 10);
    let purged = outbox.purge_while("s", &mut |b| b.first < 11).unwrap();
    assert_eq!(purged.records, 10);
    assert!(settled(&outbox));
    assert_eq!(outbox.purge_while("s", &mut |_| false).unwrap().records, 0);
    assert!(settled(&outbox));
    assert_eq!(sequences(&outbox, 1), (11..21_026).collect::<Vec<_>>());
    let purged = outbox.purge_while("s", &mut |b| b.first <= 21_016).unwrap();
    assert_eq!(purged.records, 21_015);
    assert!(!settled(&outbox));
    commit(&outbox, 21_026, 5);
    drop(outbox);
    let outbox = RedbOutbox::open(dir.path()).unwrap();
    assert_eq!(sequences(&outbox, 1), (21_026..21_031).collect::<Vec<_>>());
    assert_eq!(outbox.next_sequence("s").unwrap(), 21_031);
    assert_eq!(
        outbox.checkpoint("window/s").unwrap().as_deref(),
        Some(&b"second"[..])
    );
}

#[test]
fn readers_see_every_record_once_while_folds_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Arc::new(RedbOutbox::open(dir.path()).unwrap());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (outbox, done) = (Arc::clone(&outbox), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut reads = 0;
            while !done.load(Ordering::Relaxed) {
                let seen = sequences(&outbox, 1);
                assert_eq!(seen, (1..=seen.len() as u64).collect::<Vec<_>>());
                reads += 1;
            }
            reads
        })
    };
    // About three folds' worth.
    let mut next = 1;
    while next < 15_000 {
        commit(&outbox, next, 10);
        next += 10;
    }
    done.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    assert_eq!(sequences(&outbox, 1), (1..next).collect::<Vec<_>>());
}

#[test]
fn what_waits_is_folded_once_commits_stop() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = RedbOutbox::open(dir.path()).unwrap();
    commit(&outbox, 1, 10);
    let committed = Instant::now();
    assert!(settled(&outbox), "the commit waits in the log");
    // No other commit comes: the fold thread folds it once it is due.
    while settled(&outbox) {
        assert!(committed.elapsed() < 4 * FOLD_AFTER, "never folded");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(committed.elapsed() >= FOLD_AFTER);
    assert_eq!(sequences(&outbox, 1), (1..11).collect::<Vec<_>>());
    commit(&outbox, 11, 10);
    assert!(settled(&outbox), "the log takes commits again");
    assert_eq!(sequences(&outbox, 1), (1..21).collect::<Vec<_>>());

    // An append that fails, and no commit after it: the fold thread writes what waits
    // through, with an id past the failed entry, which then does not come back on open.
    outbox.shared.faults.appends.store(1, Ordering::SeqCst);
    assert!(outbox.commit(&commit_of(21, 10)).is_err());
    let failed = Instant::now();
    while outbox.shared.lock_log().failed {
        assert!(failed.elapsed() < 4 * FOLD_AFTER, "never written through");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!settled(&outbox), "written through");
    drop(outbox);
    let outbox = RedbOutbox::open(dir.path()).unwrap();
    assert_eq!(sequences(&outbox, 1), (1..21).collect::<Vec<_>>());
    assert_eq!(outbox.next_sequence("s").unwrap(), 21);
}

fn commit_of(first: u64, n: u64) -> Commit {
    Commit {
        appends: vec![append(first, n)],
        checkpoints: Vec::new(),
    }
}

/// Appends and redb writes that fail lose no committed record, bring back none that was
/// written over, and leave the outbox usable: each failed commit is retried as the store
/// retries it, and the records and next sequence are whole, before and after a reopen.
#[test]
fn failed_appends_folds_and_write_throughs_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = RedbOutbox::open(dir.path()).unwrap();
    no_idle_folds(&outbox);
    let faults = |outbox: &RedbOutbox, appends, redb_writes| {
        let f = &outbox.shared.faults;
        f.appends.store(appends, Ordering::SeqCst);
        f.redb_writes.store(redb_writes, Ordering::SeqCst);
    };
    commit(&outbox, 1, 10);

    // An append whose sync fails: the commit fails, though its entry is on disk.
    faults(&outbox, 1, 0);
    assert!(matches!(
        outbox.commit(&commit_of(11, 10)),
        Err(OutboxError::Log(_))
    ));
    assert!(outbox.shared.lock_log().failed);
    assert_eq!(sequences(&outbox, 1), (1..11).collect::<Vec<_>>());
    assert_eq!(outbox.next_sequence("s").unwrap(), 11);
    // Retried, it is written through to redb with an id past the failed entry; the next
    // commit goes through the log again.
    commit(&outbox, 11, 10);
    assert!(!settled(&outbox), "written through");
    assert!(!outbox.shared.lock_log().failed);
    commit(&outbox, 21, 10);
    assert!(settled(&outbox), "back in the log");

    // A fold that fails: what it held still waits and is read; the next commit writes it
    // through.
    faults(&outbox, 0, 1);
    let mut log = outbox.shared.lock_log();
    outbox.start_fold(&mut log);
    drop(log);
    assert!(settled(&outbox), "the fold wrote nothing");
    assert!(outbox.shared.lock_log().failed);
    assert_eq!(sequences(&outbox, 1), (1..31).collect::<Vec<_>>());
    commit(&outbox, 31, 10);
    assert!(!settled(&outbox), "written through");

    // A write-through that fails too: the commit fails again, and the third try writes.
    commit(&outbox, 41, 10);
    faults(&outbox, 1, 1);
    assert!(outbox.commit(&commit_of(51, 10)).is_err());
    assert!(matches!(
        outbox.commit(&commit_of(51, 10)),
        Err(OutboxError::Log(_))
    ));
    assert_eq!(sequences(&outbox, 1), (1..51).collect::<Vec<_>>());
    commit(&outbox, 51, 10);
    commit(&outbox, 61, 10);
    assert_eq!(sequences(&outbox, 1), (1..71).collect::<Vec<_>>());
    assert_eq!(outbox.next_sequence("s").unwrap(), 71);
    let bytes = outbox.record_bytes();

    // None of the failed entries comes back on reopen: redb's folded id is past them.
    drop(outbox);
    let outbox = RedbOutbox::open(dir.path()).unwrap();
    no_idle_folds(&outbox);
    assert_eq!(sequences(&outbox, 1), (1..71).collect::<Vec<_>>());
    assert_eq!(outbox.next_sequence("s").unwrap(), 71);
    assert_eq!(outbox.record_bytes(), bytes);

    // A failed append not retried before the process ends: its entry, synced, may come
    // back on open, whole and in sequence (as a write whose outcome was not known), and
    // nothing after it is lost.
    faults(&outbox, 1, 0);
    assert!(outbox.commit(&commit_of(71, 10)).is_err());
    drop(outbox);
    let outbox = RedbOutbox::open(dir.path()).unwrap();
    // The injected failure comes after the sync, so here the entry is on disk.
    let next = outbox.next_sequence("s").unwrap();
    assert_eq!(next, 81);
    assert_eq!(sequences(&outbox, 1), (1..next).collect::<Vec<_>>());
    commit(&outbox, next, 10);
    assert_eq!(sequences(&outbox, 1), (1..next + 10).collect::<Vec<_>>());
}

/// `stream`'s batch values as redb holds them.
fn in_redb(outbox: &RedbOutbox, stream: &str) -> Vec<(u64, Vec<u8>)> {
    let tx = outbox.shared.db().unwrap().begin_read().unwrap();
    let table = tx.open_table(TABLE).unwrap();
    let (lo, hi) = (record_key(stream, 0), record_key(stream, u64::MAX));
    let range = table.range(lo.as_slice()..=hi.as_slice()).unwrap();
    range
        .map(|item| {
            let (k, v) = item.unwrap();
            (seq_of(k.value()), v.value().to_vec())
        })
        .collect()
}

#[test]
fn small_batches_are_packed_and_read_counted_purged_and_reopened_as_one() {
    use crate::outbox::{BATCH_MAX, PACKED_VERSION, count_of};
    let dir = tempfile::tempdir().unwrap();
    let outbox = RedbOutbox::open(dir.path()).unwrap();
    no_idle_folds(&outbox);
    // 300 commits, each of three records of stream `s` and one of `t`, kept a ms apart.
    for i in 0..300 {
        let kept_ms = 1_000 + i as i64;
        let commit = Commit {
            appends: vec![
                Append {
                    kept_ms,
                    ..append(1 + 3 * i, 3)
                },
                Append {
                    stream: "t".into(),
                    kept_ms,
                    ..append(1 + i, 1)
                },
            ],
            checkpoints: Vec::new(),
        };
        outbox.commit(&commit).unwrap();
    }
    let unpacked = outbox.record_bytes();
    outbox.fold_packed();

    // Values of 25 batches of 645 bytes (16,242 bytes packed), in sequence; the last holds
    // the 25 left whole, which split into values of a page would take five pages.
    let values = in_redb(&outbox, "s");
    assert_eq!(values.len(), 12);
    assert!(values.iter().all(|(_, v)| v[0] == PACKED_VERSION));
    assert!(values.iter().all(|(_, v)| v.len() <= BATCH_MAX));
    let mut next = 1;
    for (first, value) in &values {
        assert_eq!(*first, next);
        next += u64::from(count_of(value));
    }
    assert_eq!(next, 901);
    // The byte count is that of the values now held.
    let held: usize = (in_redb(&outbox, "s").iter().chain(&in_redb(&outbox, "t")))
        .map(|(_, v)| v.len())
        .sum();
    assert_eq!(outbox.record_bytes(), held as u64);
    assert!(outbox.record_bytes() > unpacked);

    // Every record reads back from any sequence, with its own kept time.
    let check = |outbox: &RedbOutbox, stream: &str, per_commit: u64, from: u64, last: u64| {
        let read = outbox.read(stream, from, 100).unwrap();
        assert!(read.damaged.is_empty());
        let want: Vec<u64> = (from..=last).take(100).collect();
        assert_eq!(
            read.records.iter().map(|r| r.sequence).collect::<Vec<_>>(),
            want
        );
        for r in &read.records {
            assert_eq!(r.bytes, format!("{:0200}", r.sequence).into_bytes());
            assert_eq!(r.kept_ms, 1_000 + ((r.sequence - 1) / per_commit) as i64);
        }
    };
    let reads = |outbox: &RedbOutbox, s_from: u64| {
        for from in [s_from, s_from + 1, 74, 75, 76, 77, 450, 899, 900] {
            check(outbox, "s", 3, from.max(s_from), 900);
        }
        for from in [1, 2, 150, 300] {
            check(outbox, "t", 1, from, 300);
        }
    };
    reads(&outbox, 1);
    // The oldest batch is a packed value, with its oldest part's kept time.
    let oldest = outbox.oldest("s").unwrap().unwrap();
    assert_eq!((oldest.first, oldest.kept_ms), (1, 1_000));
    assert_eq!(oldest.count, u64::from(count_of(&values[0].1)));
    assert_eq!(oldest.bytes, values[0].1.len() as u64);

    // The same after a reopen.
    let bytes = outbox.record_bytes();
    drop(outbox);
    let outbox = RedbOutbox::open(dir.path()).unwrap();
    no_idle_folds(&outbox);
    assert_eq!(outbox.record_bytes(), bytes);
    reads(&outbox, 1);

    // A purge by age takes a packed value whole, once its oldest part is due.
    let purged = outbox.purge_while("s", &mut |b| b.kept_ms < 1_001).unwrap();
    assert_eq!(purged.records, oldest.count);
    assert_eq!(purged.sequences, Some((1, oldest.count)));
    assert_eq!(purged.bytes, oldest.bytes);
    assert_eq!(outbox.record_bytes(), bytes - oldest.bytes);
    let s_from = oldest.count + 1;
    assert_eq!(sequences(&outbox, 1)[0], s_from);
    reads(&outbox, s_from);

    // Damage anywhere in a packed value loses that value's records, and reports them.
    let (first, mut value) = values[1].clone();
    let end = first + u64::from(count_of(&value)) - 1;
    let middle = value.len() / 2;
    value[middle] ^= 1;
    outbox.raw_insert("s", first, &value);
    let read = outbox.read("s", first, 10).unwrap();
    assert_eq!(read.damaged, [(first, end)]);
    assert_eq!(read.records.first().map(|r| r.sequence), Some(end + 1));
}

/// Makes folds wait before writing, or lets them go on.
fn hold_folds(outbox: &RedbOutbox, hold: bool) {
    (outbox.shared.faults.hold_folds).store(hold, Ordering::SeqCst);
}

/// Commits `n` batches of three records from `first`, each its own commit.
fn small_commits(outbox: &RedbOutbox, first: u64, n: u64) {
    for i in 0..n {
        commit(outbox, first + 3 * i, 3);
    }
}

#[test]
fn a_purge_removes_what_it_reports_while_a_fold_packs() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Arc::new(RedbOutbox::open(dir.path()).unwrap());
    no_idle_folds(&outbox);
    small_commits(&outbox, 1, 20);
    // A commit once the oldest waits for a second hands the 21 batches to the fold thread,
    // which holds them there.
    std::thread::sleep(FOLD_AFTER);
    hold_folds(&outbox, true);
    commit(&outbox, 61, 3);
    assert!(outbox.shared.lock_log().folding.is_some());
    // A purge of the first batch, meanwhile: it decides on what the fold leaves, one value
    // of all 21 batches.
    let purge = {
        let outbox = Arc::clone(&outbox);
        std::thread::spawn(move || outbox.purge_while("s", &mut |b| b.first == 1).unwrap())
    };
    std::thread::sleep(Duration::from_millis(200));
    hold_folds(&outbox, false);
    let purged = purge.join().unwrap();
    assert_eq!(purged.records, 63);
    assert_eq!(sequences(&outbox, 1), Vec::<u64>::new());
    assert_eq!(outbox.record_bytes(), 0);
    commit(&outbox, 64, 3);
    assert_eq!(sequences(&outbox, 1), [64, 65, 66]);
}

#[test]
fn a_fold_that_landed_but_failed_is_written_again_without_doubles() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = RedbOutbox::open(dir.path()).unwrap();
    no_idle_folds(&outbox);
    small_commits(&outbox, 1, 13);
    // The 14th commit, a second on, hands 14 batches to the fold thread, which holds them
    // while 11 more come, and then packs them into three values of a page, commits, and
    // reports a failure.
    std::thread::sleep(FOLD_AFTER);
    hold_folds(&outbox, true);
    commit(&outbox, 40, 3);
    small_commits(&outbox, 43, 11);
    (outbox.shared.faults.redb_writes_landed).store(1, Ordering::SeqCst);
    hold_folds(&outbox, false);
    assert!(settled(&outbox), "what the failed fold held still waits");
    assert!(outbox.shared.lock_log().failed);
    assert_eq!(in_redb(&outbox, "s").len(), 3);
    // The next commit writes all 25 batches, and its own, through: every record once.
    commit(&outbox, 76, 3);
    assert_eq!(sequences(&outbox, 1), (1..79).collect::<Vec<_>>());
    let held: usize = in_redb(&outbox, "s").iter().map(|(_, v)| v.len()).sum();
    assert_eq!(outbox.record_bytes(), held as u64);
    drop(outbox);
    let outbox = RedbOutbox::open(dir.path()).unwrap();
    assert_eq!(sequences(&outbox, 1), (1..79).collect::<Vec<_>>());
}
