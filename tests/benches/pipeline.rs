//! The gateway's own work per reading, in process: no broker, no sockets, no other process
//! sharing the cores. Readings are the load generator's mixed city traffic, routed through the
//! end-to-end benchmark's policy (`hubgate_tests::bench::POLICY`) in turns of 1,000 messages, as
//! the pipeline takes them from the MQTT client.
//!
//! `cargo bench -p hubgate-tests --bench pipeline`
//!
//! - `process`: decoding, the privacy chain, windows and encoding of one turn (the commit
//!   untimed);
//! - `process_and_commit`: the same and the turn's durable commit to the redb outbox (fsync).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hubgate::governance::audit::AuditLog;
use hubgate::outbox::RedbOutbox;
use hubgate::pipeline::Pipeline;
use hubgate::sources::mqtt::Inbound;
use hubgate::store::Store;
use hubgate::telemetry::{clock::now_ms, stats::Stats};
use hubgate_tests::bench::POLICY;
use hubgate_tests::load::{KINDS, make_message};

const TURN: u64 = 1_000;
const DEVICES: u64 = 10_000;

/// One turn of messages, sent now: kinds in turn, devices spread over [`DEVICES`].
fn turn(first: u64) -> Vec<Inbound> {
    let (mut topic, mut payload) = (String::new(), String::new());
    (first..first + TURN)
        .map(|seq| {
            let kind = (seq % KINDS.len() as u64) as usize;
            let device = (seq.wrapping_mul(7_919) % DEVICES) as u32;
            make_message(kind, device, seq, "", &mut topic, &mut payload);
            Inbound {
                bytes: payload.len(),
                publish: rumqttc::Publish::new(
                    topic.as_str(),
                    rumqttc::QoS::AtMostOnce,
                    payload.clone(),
                ),
                oversized: false,
            }
        })
        .collect()
}

fn pipeline(dir: &std::path::Path) -> Pipeline {
    let streams_at = POLICY.find("[[stream]]").expect("the policy has streams");
    let (policy, _) =
        hubgate_privacy::policy::from_toml(&POLICY[streams_at..]).expect("the bench policy");
    let policy = Arc::new(policy);
    let audit = Arc::new(AuditLog::open(&dir.join("audit.jsonl")).expect("audit log"));
    let outbox = Arc::new(RedbOutbox::open(&dir.join("outbox")).expect("outbox"));
    let streams: Vec<(&str, Duration)> = (policy.streams().iter())
        .map(|s| (s.name.as_str(), s.retention))
        .collect();
    let store = Store::open(
        outbox,
        streams,
        &hubgate::config::StoreConfig::default(),
        Arc::clone(&audit),
    )
    .expect("store");
    let stats = Arc::new(Stats::new(policy.streams().len()));
    Pipeline::new(policy, Arc::new(store), stats, None, audit).expect("pipeline")
}

/// Runs `turns` turns through `p`, each committed; returns the time spent processing them, and
/// committing them too when `commit_timed`.
fn run_turns(p: &mut Pipeline, next: &mut u64, turns: u64, commit_timed: bool) -> Duration {
    let mut spent = Duration::ZERO;
    for _ in 0..turns {
        let messages = turn(*next);
        *next += TURN;
        let now = now_ms();
        let start = Instant::now();
        p.process(&messages, now);
        if !commit_timed {
            spent += start.elapsed();
        }
        p.commit(now).expect("commit");
        if commit_timed {
            spent += start.elapsed();
        }
    }
    spent
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut p = pipeline(dir.path());
    let mut next = 0;
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(TURN));
    g.bench_function("process", |b| {
        b.iter_custom(|iters| run_turns(&mut p, &mut next, iters, false))
    });
    g.bench_function("process_and_commit", |b| {
        b.iter_custom(|iters| run_turns(&mut p, &mut next, iters, true))
    });
    g.finish();
}

criterion_group!(pipeline_benches, benches);
criterion_main!(pipeline_benches);
