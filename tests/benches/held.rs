//! How long after its bucket ends a record of a personal-data stream reaches a live subscriber,
//! against the publish-to-subscriber latency of a stream without personal data over the same
//! readings, in the same run (see BENCHMARKS.md):
//!
//! ```text
//! cargo bench -p hubgate-tests --bench held                 # 20 s at 2,000 readings/s
//! cargo bench -p hubgate-tests --bench held -- --seconds 60 --rate 5000
//! ```
//!
//! Needs `mosquitto` on PATH. The goal (issue "every way out of the hub obeys the policy"): a held
//! record reaches the subscriber at most 1 s after its bucket ends.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hubgate_proto::v1::{self, start_position::Position, subscribe_response::Event};
use hubgate_tests::{Gateway, Mosquitto, Publisher, config, fields, subscribe_request};
use tokio_stream::StreamExt;

/// The bucket of the personal-data stream.
const BUCKET_MS: i64 = 2_000;

const STREAMS: &str = r#"
[[stream]]
name = "probes"
topics = ["city/probes/+/seen"]
purpose = "How busy public spaces are"
legal_basis = "public task"
principles = ["community_participation"]
retention = "1d"
time_bucket = "2s"

[stream.fields]
n = "keep"
mac = "pseudonymise"

[[stream]]
name = "levels"
topics = ["city/probes/+/seen"]
purpose = "How loud the probes are"
legal_basis = "public task"
principles = ["community_participation"]
retention = "1d"

[stream.fields]
n = "keep"
sent_ms = "keep"
"#;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Delays in ms, sorted: p50, p99 and the largest.
fn summary(mut delays: Vec<i64>) -> String {
    delays.sort_unstable();
    let at = |q: f64| delays[((delays.len() - 1) as f64 * q).round() as usize];
    if delays.is_empty() {
        return "none".to_owned();
    }
    format!(
        "{} / {} / {} ms ({} records)",
        at(0.5),
        at(0.99),
        delays[delays.len() - 1],
        delays.len()
    )
}

fn main() {
    let (mut seconds, mut rate) = (20u64, 2_000u64);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} wants a number"))
        };
        match arg.as_str() {
            "--seconds" => seconds = number("--seconds"),
            "--rate" => rate = number("--rate"),
            _ => {}
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(seconds, rate));
}

async fn run(seconds: u64, rate: u64) {
    let gateway = std::path::Path::new(env!("CARGO_BIN_EXE_hubgate-e2e-gateway"));
    let broker = Mosquitto::start();
    let gw = Gateway::start(gateway, &config(broker.port, "gw-held-bench", STREAMS));
    gw.wait_ready();
    let mut client = gw.client().await;
    let request = subscribe_request(&["probes", "levels"], Position::Live(v1::Live {}));
    let mut stream = client
        .subscribe(request)
        .await
        .expect("subscribe")
        .into_inner();
    let after_bucket = Arc::new(Mutex::new(Vec::new()));
    let latency = Arc::new(Mutex::new(Vec::new()));
    let (held, live) = (Arc::clone(&after_bucket), Arc::clone(&latency));
    let expected = seconds * rate;
    let reader = tokio::spawn(async move {
        let mut seen = 0;
        while seen < 2 * expected {
            let Ok(Some(Ok(message))) =
                tokio::time::timeout(Duration::from_secs(10), stream.next()).await
            else {
                break;
            };
            let arrived = now_ms();
            let Some(Event::Record(record)) = message.event else {
                continue;
            };
            seen += 1;
            if record.stream == "probes" {
                let start = record
                    .event_time
                    .map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000);
                held.lock()
                    .expect("delays")
                    .push(arrived - (start + BUCKET_MS));
            } else if let Some(sent) = fields(&record).get("sent_ms") {
                let sent: i64 = sent.parse().unwrap_or(arrived);
                live.lock().expect("latencies").push(arrived - sent);
            }
        }
    });
    let mut publisher = Publisher::connect(broker.port, "pub-held-bench");
    let per_tick = (rate / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut sent = 0u64;
    while sent < expected {
        tick.tick().await;
        for _ in 0..per_tick.min(expected - sent) {
            let payload = serde_json::json!({
                "n": sent, "sent_ms": now_ms(), "mac": format!("3c:22:fb:{:02x}:{:02x}:{:02x}", sent >> 16 & 0xff, sent >> 8 & 0xff, sent & 0xff),
            });
            publisher
                .publish("city/probes/p1/seen", payload.to_string())
                .await;
            sent += 1;
        }
    }
    publisher.wait_acked(sent).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), reader).await;
    let held = std::mem::take(&mut *after_bucket.lock().expect("delays"));
    let live = std::mem::take(&mut *latency.lock().expect("latencies"));
    let late = held.iter().filter(|d| **d > 1_000).count();
    let early = held.iter().filter(|d| **d < 0).count();
    println!("| figure | value | goal | met |");
    println!("|---|---|---|---|");
    println!("| readings published ({rate}/s for {seconds} s, 2 s buckets) | {sent} | | |");
    println!(
        "| personal-data stream: record after its bucket's end, p50 / p99 / max | {} | ≤ 1,000 ms | {} |",
        summary(held.clone()),
        if late == 0 && !held.is_empty() {
            "yes"
        } else {
            "NO"
        }
    );
    println!(
        "| of which before the bucket's end | {early} | 0 | {} |",
        if early == 0 { "yes" } else { "NO" }
    );
    println!(
        "| stream without personal data, same readings: publish to subscriber, p50 / p99 / max | {} | | |",
        summary(live)
    );
}
