//! The end-to-end benchmark, briefly and gently, on the test build: the pipeline moves data through
//! every phase and the figures are read. No timing is asserted here; `cargo bench -p
//! hubgate-tests --bench e2e` measures (BENCHMARKS.md).

use std::time::Duration;

use hubgate_tests::bench::{self, Settings};
use hubgate_tests::gateway_bin;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_moves_data_through_every_phase() {
    let settings = Settings {
        phase: Duration::from_secs(2),
        devices: 200,
        rates: vec![1_000],
        connections: 1,
        soak: None,
        full_rate: Some(3_000),
        extra_config: String::new(),
        broker_inflight: 1_000,
    };
    let figures = bench::run(gateway_bin!(), &settings).await;
    let table = figures.table(&settings);
    assert!(figures.bare_rate > 0.0, "{table}");
    assert!(figures.bare_qos1_rate > 0.0, "{table}");
    assert!(figures.peak_rate > 0.0, "{table}");
    assert!(figures.peak_grpc_rate > 0.0, "{table}");
    assert!(figures.cpu_s_per_million > 0.0, "{table}");
    // The outbox is durable: what the gateway keeps reaches the disk.
    assert!(figures.disk_bytes_per_reading > 0.0, "{table}");
    let at_rate = &figures.latency[0];
    assert!(at_rate.samples > 0, "{table}");
    assert!(at_rate.cpu_us_per_reading > 0.0, "{table}");
    assert_eq!(at_rate.received, at_rate.published, "{table}");
    assert!(
        at_rate.p50_ms > 0.0 && at_rate.p50_ms <= at_rate.max_ms,
        "{table}"
    );
    // QoS 1 with acknowledgement after commit loses nothing: every message is taken in, and each
    // becomes one record on its pass-through stream.
    assert!(figures.qos1_published > 0, "{table}");
    assert_eq!(figures.qos1_broker_acked, figures.qos1_published, "{table}");
    assert_eq!(figures.qos1_received, figures.qos1_published, "{table}");
    assert_eq!(figures.qos1_records, figures.qos1_published, "{table}");
    assert!(
        figures.outbox_records > 0 && figures.outbox_disk_bytes > 0,
        "{table}"
    );
    assert!(figures.peak_rss_kib > 0, "{table}");
    assert!(
        table.contains("QoS 1, acknowledged after commit"),
        "{table}"
    );
}
