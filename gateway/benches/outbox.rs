//! Durable appends and replay reads of the outbox, on each engine built.
//!
//! `cargo bench -p hubgate --features redb --bench outbox` (without the feature: sled only)
//!
//! Appends are batches of 1,000 records of 200 bytes, each batch committed durably (fsync) before
//! the next: the pattern of the pipeline, which commits once per turn before acknowledging; each
//! batch is sealed under the stream's data key, as always. The
//! outbox is held at 200,000 records (40 MB) by purging the oldest batch, untimed, as retention
//! would: a steady state, and a bounded disk.
//!
//! With redb, it then reports the disk taken when commits are small, as at moderate rates with the
//! default 1 ms commit interval (untimed, `outbox_redb_small_turns`).

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hubgate::outbox::{Append, Commit, Outbox, SledOutbox};

const BATCH: u64 = 1_000;
/// Records held: beyond this, the oldest batch is purged before the next append.
const HELD: u64 = 200_000;

fn records(first: u64) -> Vec<bytes::Bytes> {
    (first..first + BATCH)
        .map(|i| {
            let mut r = format!("record {i:>12} ").into_bytes();
            r.resize(200, b'x');
            r.into()
        })
        .collect()
}

/// Benchmarks `outbox` under `name`; returns how many records it then holds.
fn bench_engine(c: &mut Criterion, name: &str, outbox: &dyn Outbox) -> u64 {
    let mut g = c.benchmark_group(format!("outbox_{name}"));
    g.throughput(Throughput::Elements(BATCH));
    let mut next = 1;
    g.bench_function("append_1000x200B_fsync", |b| {
        b.iter_batched(
            || {
                if next > HELD {
                    let oldest = next - HELD;
                    outbox
                        .purge_while("s", &mut |b| b.first < oldest)
                        .expect("purge");
                }
                let batch = records(next);
                next += BATCH;
                (next - BATCH, batch)
            },
            |(first, records)| {
                let commit = Commit {
                    appends: vec![Append {
                        stream: "s".into(),
                        first,
                        kept_ms: 0,
                        key_period: std::time::Duration::from_secs(3600),
                        records,
                    }],
                    checkpoints: Vec::new(),
                };
                outbox.commit(&commit).expect("commit");
            },
            criterion::BatchSize::PerIteration,
        )
    });
    let oldest = outbox.oldest("s").expect("oldest").map_or(1, |b| b.first);
    let last = next - 1;
    let mut from = oldest;
    g.bench_function("replay_1000", |b| {
        b.iter(|| {
            let read = outbox.read("s", from, BATCH as usize).expect("read");
            from = if from + 2 * BATCH > last {
                oldest
            } else {
                from + BATCH
            };
            black_box(read.records.len())
        })
    });
    g.finish();
    last + 1 - oldest
}

fn report(name: &str, held: u64, on_disk: u64) {
    if held == 0 {
        // The appends were filtered out of this run.
        return;
    }
    eprintln!(
        "outbox_{name}: {held} records of 200 B, {on_disk} bytes on disk ({:.2}x the data)",
        on_disk as f64 / (held as f64 * 200.0)
    );
}

/// Bytes a file, or every file under a directory, takes on disk: allocated blocks, not lengths
/// (redb sets the length of its file ahead of what it writes).
fn disk_size(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    if path.is_file() {
        return std::fs::metadata(path).map_or(0, |m| m.blocks() * 512);
    }
    std::fs::read_dir(path).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => disk_size(&e.path()),
                Ok(m) => m.blocks() * 512,
                Err(_) => 0,
            })
            .sum()
    })
}

/// Disk taken when commits are small: at 10,000 readings/s over four streams with the default
/// 1 ms commit interval, a commit holds about six records of 218 B per stream. Writes 64 MB of
/// such commits, lets the outbox fold what waits, and reports the outbox directory's allocated
/// blocks, and the database file's alone, against the records' bytes.
#[cfg(feature = "redb")]
fn small_turns(dir: &Path) {
    const STREAMS: [&str; 4] = ["air", "noise", "parking", "footfall"];
    const PER_TURN: u64 = 6;
    const RECORD: usize = 218;
    const TARGET: u64 = 64_000_000;
    let outbox = hubgate::outbox::RedbOutbox::open(dir).expect("redb outbox");
    let mut next = 1;
    let mut data = 0;
    let mut kept_ms = 1_800_000_000_000;
    while data < TARGET {
        let appends = STREAMS
            .iter()
            .map(|stream| Append {
                stream: (*stream).into(),
                first: next,
                kept_ms,
                key_period: std::time::Duration::from_secs(3600),
                records: (next..next + PER_TURN)
                    .map(|i| {
                        let mut r = format!("{stream} record {i:>12} ").into_bytes();
                        r.resize(RECORD, b'x');
                        r.into()
                    })
                    .collect(),
            })
            .collect();
        let commit = Commit {
            appends,
            checkpoints: Vec::new(),
        };
        outbox.commit(&commit).expect("commit");
        next += PER_TURN;
        kept_ms += 1;
        data += STREAMS.len() as u64 * PER_TURN * RECORD as u64;
    }
    // What waits in the log is folded once the newest commit is a second old.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let (all, db) = (disk_size(dir), disk_size(&dir.join("outbox.redb")));
    eprintln!(
        "outbox_redb_small_turns: {data} bytes of records in commits of {PER_TURN} records of \
         {RECORD} B per stream over {} streams; {all} bytes on disk ({:.2}x the data), of which \
         the database file {db} ({:.2}x)",
        STREAMS.len(),
        all as f64 / data as f64,
        db as f64 / data as f64,
    );
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let sled = SledOutbox::open(&dir.path().join("sled")).expect("sled outbox");
    let held = bench_engine(c, "sled", &sled);
    report("sled", held, disk_size(&dir.path().join("sled")));

    #[cfg(feature = "redb")]
    {
        let path = dir.path().join("redb");
        let redb = hubgate::outbox::RedbOutbox::open(&path).expect("redb outbox");
        let held = bench_engine(c, "redb", &redb);
        report("redb", held, disk_size(&path));
        small_turns(&dir.path().join("small_turns"));
    }
}

criterion_group!(outbox_benches, benches);
criterion_main!(outbox_benches);
