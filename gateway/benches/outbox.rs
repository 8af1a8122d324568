//! Durable appends and replay reads of the outbox, on each engine built.
//!
//! `cargo bench -p hubgate --features redb --bench outbox` (without the feature: sled only)
//!
//! Appends are batches of 1,000 records of 200 bytes, each batch committed durably (fsync) before
//! the next: the pattern of the pipeline, which commits once per turn before acknowledging; each
//! batch is sealed under the stream's data key, as always. The
//! outbox is held at 200,000 records (40 MB) by purging the oldest batch, untimed, as retention
//! would: a steady state, and a bounded disk.

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
    }
}

criterion_group!(outbox_benches, benches);
criterion_main!(outbox_benches);
