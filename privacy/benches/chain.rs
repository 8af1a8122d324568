//! Per-record cost of the privacy chain and of its stages.
//!
//! `cargo bench -p hubgate-privacy --bench chain`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hubgate_privacy::chain::{self, Context};
use hubgate_privacy::pseudonym::{Key, pseudonymise};
use hubgate_privacy::window::WindowState;
use hubgate_privacy::{Reading, Record, StreamPolicy, Value, policy};

const POLICY: &str = r#"
[[stream]]
name = "footfall"
topics = ["city/footfall/+/probe"]
purpose = "p"
legal_basis = "b"
principles = ["community_participation"]
retention = "7d"
time_field = "ts"
time_bucket = "1m"

[stream.fields]
counter_id = "keep"
note = "keep"
mac = "pseudonymise"
cell = { h3 = { resolution = 9, lat = "location.lat", lon = "location.lon" } }
"#;

const AGGREGATE: &str = r#"
[stream.aggregate]
window = "15m"
group_by = ["counter_id"]
contributor = "mac"
accept_exact_counts = true

[stream.aggregate.measures]
readings = "count"
devices = "contributors"
"#;

fn stream() -> StreamPolicy {
    policy::from_toml(POLICY).expect("bench policy").0.streams()[0].clone()
}

fn reading() -> Reading {
    let s = |v: &str| Value::Str(v.into());
    Reading {
        fields: vec![
            ("counter_id".into(), s("pc-01")),
            ("ts".into(), Value::Int(1_704_067_245)),
            ("mac".into(), s("3c:22:fb:12:34:56")),
            ("rssi".into(), Value::Int(-61)),
            ("channel".into(), Value::Int(6)),
            ("note".into(), s("probe request seen at the north gate")),
            ("location.lat".into(), Value::Float(52.3731)),
            ("location.lon".into(), Value::Float(4.8922)),
        ],
        unsupported: 0,
    }
}

fn benches(c: &mut Criterion) {
    let policy = stream();
    let key = Key::new([7; 32]);
    let ctx = Context {
        received_ms: 1_704_067_300_000,
        key: Some(&key),
    };
    let input = reading();

    let mut g = c.benchmark_group("privacy");
    g.throughput(Throughput::Elements(1));
    g.bench_function("whole_chain", |b| {
        b.iter_batched(
            || input.clone(),
            |r| chain::apply(&policy, black_box(r), &ctx),
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("allow_list", |b| {
        b.iter_batched(
            || input.clone(),
            |mut r| chain::allow_list(&policy, black_box(&mut r)),
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("identifier_scan", |b| {
        b.iter(|| {
            policy
                .identifiers
                .detector
                .find(black_box("probe request seen at the north gate"), 0)
        })
    });
    g.bench_function("pseudonymise", |b| {
        b.iter(|| pseudonymise(&key, black_box("3c:22:fb:12:34:56")))
    });
    g.bench_function("reading_clone", |b| b.iter(|| black_box(&input).clone()));

    // One window of 50 counters and 200,000 devices: the cost of counting a filtered record.
    let aggregated = policy::from_toml(&format!("{POLICY}{AGGREGATE}"))
        .expect("bench policy")
        .0
        .streams()[0]
        .clone();
    let spec = aggregated.aggregate.as_ref().expect("aggregate");
    let records: Vec<Record> = (0..200_000)
        .map(|i| Record {
            event_time_ms: 1_704_067_200_000,
            fields: vec![
                (
                    "counter_id".into(),
                    Value::Str(compact_str::format_compact!("pc-{:02}", i % 50)),
                ),
                (
                    "mac".into(),
                    Value::Str(compact_str::format_compact!("{i:032x}")),
                ),
            ],
        })
        .collect();
    let mut state = WindowState::default();
    let mut next = 0;
    g.bench_function("window_absorb", |b| {
        b.iter(|| {
            next = (next + 1) % records.len();
            state.absorb(spec, black_box(&records[next]), 1_704_067_200_000)
        })
    });
    g.finish();

    // A window of 20,000 counters, filled from empty: each reading opens a group of its own, the
    // counters in no particular order.
    const COUNTERS: usize = 20_000;
    let opening: Vec<Record> = (0..COUNTERS)
        .map(|i| i * 7_919 % COUNTERS)
        .map(|i| Record {
            event_time_ms: 1_704_067_200_000,
            fields: vec![
                (
                    "counter_id".into(),
                    Value::Str(compact_str::format_compact!("pc-{i:05}")),
                ),
                (
                    "mac".into(),
                    Value::Str(compact_str::format_compact!("{i:032x}")),
                ),
            ],
        })
        .collect();
    let mut g = c.benchmark_group("window");
    g.throughput(Throughput::Elements(COUNTERS as u64));
    g.sample_size(10);
    g.bench_function("open_20000_groups", |b| {
        b.iter_custom(|iters| {
            let mut spent = std::time::Duration::ZERO;
            for _ in 0..iters {
                let mut state = WindowState::default();
                let start = std::time::Instant::now();
                for record in &opening {
                    state.absorb(spec, black_box(record), 1_704_067_200_000);
                }
                spent += start.elapsed();
            }
            spent
        })
    });
    g.finish();
}

criterion_group!(chain_benches, benches);
criterion_main!(chain_benches);
