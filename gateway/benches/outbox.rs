//! Durable appends and replay reads of the outbox.
//!
//! `cargo bench -p hubgate --bench outbox`
//!
//! Appends are batches of 1,000 records of 200 bytes, each batch made durable (fsync) before the
//! next: the pattern of the pipeline, which commits once per batch before acknowledging.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hubgate::outbox::{Append, Commit, Outbox, SledOutbox};

const BATCH: u64 = 1_000;

fn records(first: u64) -> Vec<Vec<u8>> {
    (first..first + BATCH)
        .map(|i| {
            let mut r = format!("record {i:>12} ").into_bytes();
            r.resize(200, b'x');
            r
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let outbox = SledOutbox::open(dir.path()).expect("outbox");
    let mut g = c.benchmark_group("outbox");
    g.throughput(Throughput::Elements(BATCH));
    let mut next = 1;
    g.bench_function("append_1000x200B_fsync", |b| {
        b.iter_batched(
            || {
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
                        records,
                    }],
                    checkpoints: Vec::new(),
                };
                outbox.commit(&commit).expect("commit");
            },
            criterion::BatchSize::PerIteration,
        )
    });
    let held = next - 1;
    let mut from = 1;
    g.bench_function("replay_1000", |b| {
        b.iter(|| {
            let read = outbox.read("s", from, BATCH as usize).expect("read");
            from = if from + 2 * BATCH > held {
                1
            } else {
                from + BATCH
            };
            black_box(read.records.len())
        })
    });
    g.finish();
    eprintln!(
        "outbox: {held} records of 200 B, {} bytes on disk ({:.2}x the data)",
        outbox.size_on_disk().unwrap_or(0),
        outbox.size_on_disk().unwrap_or(0) as f64 / (held as f64 * 200.0)
    );
}

criterion_group!(outbox_benches, benches);
criterion_main!(outbox_benches);
