//! End to end: the durable outbox under process kills, retention and a full disk budget. Real
//! mosquitto, the gateway as its own process (killed with SIGKILL), a real gRPC client.

use std::path::Path;
use std::time::{Duration, Instant};

use hubgate_proto::v1::{self, start_position::Position, subscribe_response::Event};
use hubgate_tests::durable::{READER_TOKEN, durable_config, replay};
use hubgate_tests::{
    Gateway, Mosquitto, Publisher, fields, gateway_bin, sequence_stream, subscribe_request,
    wait_for,
};
use tokio_stream::StreamExt;

/// Whether any file under `dir` holds `needle`.
fn disk_holds(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir)
        .expect("read the data directory")
        .flatten()
        .any(|entry| {
            let path = entry.path();
            if path.is_dir() {
                disk_holds(&path, needle)
            } else {
                std::fs::read(&path)
                    .expect("read a data file")
                    .windows(needle.len())
                    .any(|w| w == needle)
            }
        })
}

/// A small xorshift generator: the kill moments vary from run to run, and the seed is printed so
/// a failing run can be replayed.
struct Moments(u64);

impl Moments {
    fn between(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(lo_ms + self.0 % (hi_ms - lo_ms))
    }
}

/// The crash test: a numbered sequence at QoS 1 while the gateway is killed with SIGKILL five
/// times at random moments and restarted. Every number reaches the subscriber (duplicates are
/// allowed and counted), sequence numbers are never reused and never skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_acknowledged_message_on_sled() {
    crash_test("sled").await;
}

/// The crash test on the redb outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_acknowledged_message_on_redb() {
    crash_test("redb").await;
}

async fn crash_test(engine: &str) {
    const N: u64 = 6000;
    const KILLS: usize = 5;
    let seed = std::env::var("HUBGATE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash test on {engine}: seed {seed} (HUBGATE_CRASH_SEED={seed} replays it)");
    let mut moments = Moments(seed);
    let broker = Mosquitto::start();
    let data = hubgate_tests::private_dir();
    let cfg = durable_config(
        broker.port,
        "gw-crash",
        data.path(),
        &format!("engine = \"{engine}\""),
        &sequence_stream("1d"),
    );
    let mut gw = Gateway::start(gateway_bin!(), &cfg);
    gw.wait_ready();

    let mut publisher = Publisher::connect(broker.port, "pub-crash");
    let publishing = tokio::spawn(async move {
        for n in 1..=N {
            publisher
                .publish(
                    "test/seq",
                    format!("{{\"n\": {n}, \"pad\": \"{:0>64}\"}}", n),
                )
                .await;
            if n % 25 == 0 {
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        }
        publisher.wait_acked(N).await;
    });
    for _ in 0..KILLS {
        tokio::time::sleep(moments.between(150, 900)).await;
        gw.kill();
        gw = Gateway::start(gateway_bin!(), &cfg);
    }
    publishing.await.expect("every message published");
    gw.wait_ready();

    let started = Instant::now();
    let seen = replay(&gw, "seq", Duration::from_secs(20), |s| {
        s.numbers.len() as u64 == N
    })
    .await;
    let missing: Vec<u64> = (1..=N).filter(|n| !seen.numbers.contains_key(n)).collect();
    if !missing.is_empty() {
        eprintln!("{}", gw.log());
    }
    assert!(
        missing.is_empty(),
        "{engine}, seed {seed}: lost {} of {N} numbers, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let duplicates: u32 = seen.numbers.values().map(|c| c - 1).sum();
    // Sequences run 1, 2, 3, … with no hole and no repeat across the restarts.
    assert!(seen.gaps.is_empty(), "gaps: {:?}", seen.gaps);
    let expected: Vec<u64> = (1..=seen.sequences.len() as u64).collect();
    assert!(
        seen.sequences == expected,
        "sequences are not 1..={}",
        seen.sequences.len()
    );
    eprintln!(
        "crash test on {engine}: {N} messages, {KILLS} SIGKILLs, {duplicates} duplicates, replayed in {:?}",
        started.elapsed()
    );
}

fn footfall_windowed() -> String {
    hubgate_tests::footfall_aggregated(
        "",
        "10s",
        "1s",
        5,
        "readings = \"count\"\ndevices = \"contributors\"\n",
    )
}

/// Readings absorbed into an open window survive a SIGKILL: the restarted gateway resumes the
/// window from its checkpoint and releases the group, though the broker sends nothing again. The
/// readings that matter reach the checkpoint as changes to a whole state written before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_windows_survive_a_sigkill() {
    let broker = Mosquitto::start();
    let data = hubgate_tests::private_dir();
    let cfg = durable_config(
        broker.port,
        "gw-window",
        data.path(),
        "",
        &footfall_windowed(),
    );
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    // Start early in a 10 s window, so that it is still open when the gateway is killed.
    while now() % 10_000 > 2_000 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gw = Gateway::start(gateway_bin!(), &cfg);
    gw.wait_ready();
    let mut publisher = Publisher::connect(broker.port, "pub-window");
    let ts = now() / 1000;
    // Eight other counters first, heard once each (too few to be released): the whole state.
    for c in 10..18u8 {
        let payload = format!(
            "{{\"counter_id\": \"pc-{c}\", \"ts\": {ts}, \"mac\": \"3c:22:fb:00:01:{c:02x}\"}}"
        );
        publisher
            .publish(&format!("city/footfall/pc-{c}/probe"), payload)
            .await;
    }
    publisher.wait_acked(8).await;
    // The state that counted them is committed (the acknowledgement says so) before the next
    // readings come.
    wait_for(
        "eight readings acknowledged",
        Duration::from_secs(10),
        || gw.metric("hubgate_mqtt_messages_acknowledged_total", &[]) == 8.0,
    );
    for d in 0..6u8 {
        let payload = format!(
            "{{\"counter_id\": \"pc-01\", \"ts\": {ts}, \"mac\": \"3c:22:fb:00:00:{d:02x}\"}}"
        );
        publisher
            .publish("city/footfall/pc-01/probe", payload)
            .await;
    }
    publisher.wait_acked(14).await;
    // Counted, committed and acknowledged: the broker holds nothing more for the gateway.
    wait_for(
        "six more readings acknowledged",
        Duration::from_secs(10),
        || gw.metric("hubgate_mqtt_messages_acknowledged_total", &[]) == 14.0,
    );
    // The broker reads the acknowledgements before the kill resets the connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        now() / 10_000 == ts / 10,
        "the window closed before the kill"
    );
    gw.kill();

    let gw = Gateway::start(gateway_bin!(), &cfg);
    gw.wait_ready();
    let released = [("stream", "footfall"), ("outcome", "released")];
    wait_for(
        "the resumed window released",
        Duration::from_secs(20),
        || gw.metric("hubgate_aggregate_groups_total", &released) == 1.0,
    );
    assert_eq!(
        gw.metric("hubgate_mqtt_messages_received_total", &[]),
        0.0,
        "the broker sent readings again: the test proves nothing"
    );
    let log = gw.log();
    assert!(log.contains("resumed open windows from the checkpoint"));
    // The readings of pc-01 came back from the changes, not from a whole state.
    let changed: u32 = log
        .split("changed_groups=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no changed_groups in the log:\n{log}"));
    assert!(changed >= 1, "{log}");
    let mut client = gw.client().await;
    let mut events = client
        .subscribe(subscribe_request(
            &["footfall"],
            Position::Oldest(v1::Oldest {}),
        ))
        .await
        .unwrap()
        .into_inner();
    let message = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("a record")
        .unwrap()
        .unwrap();
    let Some(Event::Record(record)) = message.event else {
        panic!("expected a record, got {message:?}");
    };
    let f = fields(&record);
    assert_eq!((f["readings"].as_str(), f["devices"].as_str()), ("6", "6"));
}

/// Records older than the retention limit are purged from disk and replay, with metrics and an
/// audit event; nothing is returned from before the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_records_from_disk_and_replay() {
    let broker = Mosquitto::start();
    let data = hubgate_tests::private_dir();
    let cfg = durable_config(
        broker.port,
        "gw-retention",
        data.path(),
        "",
        &sequence_stream("2s"),
    );
    let gw = Gateway::start(gateway_bin!(), &cfg);
    gw.wait_ready();
    let mut publisher = Publisher::connect(broker.port, "pub-retention");
    for n in 1..=100 {
        publisher
            .publish(
                "test/seq",
                format!("{{\"n\": {n}, \"pad\": \"RETAINED-{n:04}\"}}"),
            )
            .await;
    }
    publisher.wait_acked(100).await;
    let kept = [("stream", "seq")];
    wait_for(
        "100 records kept and committed",
        Duration::from_secs(10),
        || {
            gw.metric("hubgate_records_kept_total", &kept) == 100.0
                && gw.metric("hubgate_mqtt_messages_acknowledged_total", &[]) >= 100.0
        },
    );
    assert!(gw.metric("hubgate_outbox_bytes", &[]) > 0.0);
    let purged = [("stream", "seq"), ("reason", "retention")];
    wait_for("the records purged", Duration::from_secs(10), || {
        gw.metric("hubgate_store_records_purged_total", &purged) == 100.0
    });
    assert_eq!(gw.metric("hubgate_outbox_bytes", &[]), 0.0);
    // The data keys of the purged records are destroyed, and no record was ever on disk in clear.
    wait_for("the data keys destroyed", Duration::from_secs(10), || {
        gw.metric("hubgate_outbox_keys_destroyed_total", &kept) >= 1.0
    });
    assert!(!disk_holds(data.path(), b"RETAINED-"));
    let seen = replay(&gw, "seq", Duration::from_secs(1), |s| !s.gaps.is_empty()).await;
    assert_eq!(seen.gaps, [(1, 100)]);
    assert!(seen.numbers.is_empty());
    // The audit log holds the purges, 100 records in all, and its chain verifies.
    let audit_path = data.path().join("audit.jsonl");
    let audit = std::fs::read_to_string(&audit_path).unwrap();
    let purges: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"] == "purge")
        .collect();
    assert!(
        purges
            .iter()
            .all(|e| e["data"]["stream"] == "seq" && e["data"]["reason"] == "retention")
    );
    let purged: u64 = purges
        .iter()
        .map(|e| e["data"]["records"].as_u64().unwrap())
        .sum();
    assert_eq!(purged, 100, "{audit}");
    assert!(audit.contains("\"event\":\"outbox_key_destroyed\""));
    assert!(!audit.contains("RETAINED-"));
    let verify = |path: &Path| {
        std::process::Command::new(gateway_bin!())
            .args(["audit", "verify"])
            .arg(path)
            .output()
            .unwrap()
    };
    let out = verify(&audit_path);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("intact"));
    // One changed count, and verification fails at that entry.
    let tampered = data.path().join("tampered.jsonl");
    let first_purge = audit
        .lines()
        .position(|l| l.contains("\"event\":\"purge\""))
        .unwrap();
    let lines: Vec<String> = audit
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == first_purge {
                l.replacen("\"records\":", "\"records\":1", 1)
            } else {
                l.to_owned()
            }
        })
        .collect();
    std::fs::write(&tampered, lines.join("\n") + "\n").unwrap();
    let out = verify(&tampered);
    assert!(!out.status.success());
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        report.contains(&format!(":{}: broken", first_purge + 1)),
        "{report}"
    );
    // After a restart too: the outbox on disk no longer holds them.
    gw.stop();
    let gw = Gateway::start(gateway_bin!(), &cfg);
    let seen = replay(&gw, "seq", Duration::from_secs(1), |s| !s.gaps.is_empty()).await;
    assert_eq!(seen.gaps, [(1, 100)]);
    assert!(seen.numbers.is_empty());
}

/// With a tiny size cap and no consumer: `drop_oldest` keeps the newest records within the cap;
/// `stop_acking` takes nothing more until retention frees room, and then loses nothing. Memory stays
/// flat either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_applies_its_policy_with_flat_memory() {
    const N: u64 = 6000;
    const CAP: f64 = 256.0 * 1024.0;
    let broker = Mosquitto::start();
    for (policy, retention) in [("drop_oldest", "1d"), ("stop_acking", "2s")] {
        let data = hubgate_tests::private_dir();
        let cfg = durable_config(
            broker.port,
            &format!("gw-full-{policy}"),
            data.path(),
            &format!(
                "max_bytes = \"256KiB\"\non_full = \"{policy}\"\nmemory_records_per_stream = 64"
            ),
            &sequence_stream(retention),
        );
        let gw = Gateway::start(gateway_bin!(), &cfg);
        gw.wait_ready();
        let rss_start = gw.rss_kib();
        let mut publisher = Publisher::connect(broker.port, &format!("pub-full-{policy}"));
        for n in 1..=N {
            publisher
                .publish(
                    "test/seq",
                    format!("{{\"n\": {n}, \"pad\": \"{:0>64}\"}}", n),
                )
                .await;
        }
        publisher.wait_acked(N).await;
        let kept = [("stream", "seq")];
        let awaiting = || gw.metric("hubgate_mqtt_messages_awaiting_ack", &[]);
        let mut rss_peak = 0;
        let mut awaiting_peak: f64 = 0.0;
        let mut not_ready = String::new();
        wait_for("every message kept", Duration::from_secs(60), || {
            rss_peak = rss_peak.max(gw.rss_kib());
            awaiting_peak = awaiting_peak.max(awaiting());
            let (status, body) = hubgate_tests::http_get(gw.admin, "/readyz");
            if status == 503 && body.contains("outbox commits are failing") {
                not_ready = body;
            }
            assert!(gw.metric("hubgate_outbox_bytes", &[]) <= CAP);
            gw.metric("hubgate_records_kept_total", &kept) == N as f64
        });
        // Kept is counted when a record is staged, acknowledged once it is committed: every
        // message is acknowledged in the end, and none then awaits its ack.
        wait_for(
            "every message acknowledged",
            Duration::from_secs(30),
            || gw.metric("hubgate_mqtt_messages_acknowledged_total", &[]) >= N as f64,
        );
        assert_eq!(awaiting(), 0.0);
        let purged = |reason| {
            gw.metric(
                "hubgate_store_records_purged_total",
                &[("stream", "seq"), ("reason", reason)],
            )
        };
        match policy {
            "drop_oldest" => {
                assert!(purged("capacity") > 0.0);
                let seen = replay(&gw, "seq", Duration::from_secs(2), |s| {
                    s.numbers.contains_key(&N)
                })
                .await;
                // A gap for what was dropped, then the newest records up to the last.
                assert_eq!(seen.gaps.len(), 1, "{:?}", seen.gaps);
                let (_, last_dropped) = seen.gaps[0];
                assert_eq!(seen.sequences.first(), Some(&(last_dropped + 1)));
                assert_eq!(seen.sequences.last(), Some(&N));
            }
            _ => {
                let full = [("reason", "full")];
                assert!(gw.metric("hubgate_outbox_commit_failures_total", &full) > 0.0);
                // While the full outbox took nothing, what had arrived waited for its ack.
                assert!(awaiting_peak > 0.0);
                assert_eq!(purged("capacity"), 0.0);
                // Not ready, with the reason, while commits failed; ready again after, and the
                // episode is audited from start to end.
                assert!(not_ready.contains("full"), "{not_ready:?}");
                assert_eq!(hubgate_tests::http_get(gw.admin, "/readyz").0, 200);
                assert_eq!(gw.metric("hubgate_outbox_failing", &[]), 0.0);
                let audit = std::fs::read_to_string(data.path().join("audit.jsonl")).unwrap();
                assert!(audit.contains("\"event\":\"outbox_commits_failing\""));
                assert!(audit.contains("\"event\":\"outbox_commits_recovered\""));
            }
        }
        eprintln!(
            "full outbox, {policy}: RSS {} KiB at start, peak {} KiB",
            rss_start, rss_peak
        );
        assert!(
            rss_peak < rss_start + 16 * 1024,
            "{policy}: memory grew from {rss_start} KiB to {rss_peak} KiB"
        );
    }
}

/// Forwarding to an upstream hub (a second hubgate) through its outage, a SIGKILL of the hub and
/// a SIGKILL of the origin: the hub ends with every record exactly once, and the backlog drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_outage_loses_nothing_and_the_backlog_drains() {
    const N: u64 = 9000;
    let broker = Mosquitto::start();
    let hub_port = hubgate_tests::free_port();
    let hub_data = hubgate_tests::private_dir();
    let hub_cfg = durable_config(
        broker.port,
        "gw-hub",
        hub_data.path(),
        "",
        &sequence_stream("1d").replace("test/seq", "hub/local"),
    )
    .replacen(
        "[grpc]\nlisten = \"127.0.0.1:0\"",
        &format!("[grpc]\nlisten = \"127.0.0.1:{hub_port}\""),
        1,
    ) + &format!(
        // The hub lets the origin push with a token of its own.
        "\n[[grpc.token]]\nname = \"district-1\"\nsha256 = \"{}\"\nstreams = [\"seq\"]\npush = true\norigins = [\"district-1\"]\n\
         \n[[grpc.token]]\nname = \"reader\"\nsha256 = \"{}\"\nstreams = [\"*\"]\n",
        hubgate::sinks::grpc::auth::digest_hex("hg_district_1_push_token"),
        hubgate::sinks::grpc::auth::digest_hex(READER_TOKEN)
    );
    let origin_data = hubgate_tests::private_dir();
    let token_file = origin_data.path().join("upstream.token");
    std::fs::write(&token_file, "hg_district_1_push_token\n").unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let origin_cfg = format!(
        "{}\n[upstream]\nendpoint = \"http://127.0.0.1:{hub_port}\"\norigin = \"district-1\"\n\
         batch = 64\nwindow = 256\nreconnect_backoff_max = \"300ms\"\ntoken_file = {:?}\n",
        durable_config(
            broker.port,
            "gw-origin",
            origin_data.path(),
            "",
            &sequence_stream("1d"),
        ),
        token_file
    );
    let seq = [("stream", "seq")];

    // The hub is down: the origin keeps everything and waits.
    let origin = Gateway::start(gateway_bin!(), &origin_cfg);
    origin.wait_ready();
    let mut publisher = Publisher::connect(broker.port, "pub-upstream");
    publisher.publish_numbers("test/seq", N / 3).await;
    wait_for("the first third kept", Duration::from_secs(20), || {
        origin.metric("hubgate_records_kept_total", &seq) == (N / 3) as f64
    });
    wait_for(
        "failed attempts to reach the hub",
        Duration::from_secs(10),
        || origin.metric("hubgate_upstream_errors_total", &[]) >= 2.0,
    );
    assert_eq!(
        origin.metric("hubgate_upstream_records_acked_total", &seq),
        0.0
    );

    // The hub comes up and the backlog drains, while more is published; the hub is killed
    // mid-stream and restarted; then the origin is killed mid-stream (with acknowledged positions
    // not yet saved) and restarted.
    let hub = Gateway::start(gateway_bin!(), &hub_cfg);
    let hub_kept = |hub: &Gateway| {
        hub.metric(
            "hubgate_push_records_total",
            &[("stream", "seq"), ("outcome", "kept")],
        )
    };
    wait_for("records at the hub", Duration::from_secs(20), || {
        hub_kept(&hub) > 0.0
    });
    publisher.publish_numbers("test/seq", 2 * N / 3).await;
    hub.kill();
    let hub = Gateway::start(gateway_bin!(), &hub_cfg);
    wait_for(
        "records at the restarted hub",
        Duration::from_secs(20),
        || hub_kept(&hub) > 0.0,
    );
    origin.kill();
    let origin = Gateway::start(gateway_bin!(), &origin_cfg);
    publisher.publish_numbers("test/seq", N).await;
    wait_for("the backlog drained", Duration::from_secs(60), || {
        origin.metric("hubgate_upstream_lag_records", &seq) == 0.0
            && origin.metric("hubgate_records_kept_total", &seq) > 0.0
    });

    let seen = replay(&hub, "seq", Duration::from_secs(10), |s| {
        s.numbers.len() as u64 == N
    })
    .await;
    let missing: Vec<u64> = (1..=N).filter(|n| !seen.numbers.contains_key(n)).collect();
    assert!(
        missing.is_empty(),
        "the hub lacks {} records, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let twice: Vec<u64> = seen
        .numbers
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, _)| *n)
        .collect();
    assert!(twice.is_empty(), "kept twice at the hub: {twice:?}");
    let duplicates = hub.metric(
        "hubgate_push_records_total",
        &[("stream", "seq"), ("outcome", "duplicate")],
    );
    // The hub's last acknowledgements reach the origin a moment after the records are readable
    // at the hub.
    wait_for("the origin's lag to drain", Duration::from_secs(10), || {
        origin.metric("hubgate_upstream_lag_records", &seq) == 0.0
    });

    // The origin starts over with an empty data directory, under the same name: its new records
    // (sequences from 1 again) reach the hub, not taken for the ones it already has.
    origin.kill();
    let fresh_data = hubgate_tests::private_dir();
    let fresh_cfg = origin_cfg.replace(
        &format!("{:?}", origin_data.path()),
        &format!("{:?}", fresh_data.path()),
    );
    assert_ne!(fresh_cfg, origin_cfg);
    let origin = Gateway::start(gateway_bin!(), &fresh_cfg);
    origin.wait_ready();
    publisher.publish_numbers("test/seq", N + 10).await;
    let seen = replay(&hub, "seq", Duration::from_secs(10), |s| {
        s.numbers.len() as u64 == N + 10
    })
    .await;
    assert_eq!(seen.numbers.len() as u64, N + 10);
    drop(origin);
    eprintln!(
        "upstream outage: {N} records at the hub once each; {duplicates} resent records dropped as duplicates"
    );
}

/// A second gateway on the same data directory refuses to start, with a clear error, and the
/// first one goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gateway_per_data_directory() {
    let broker = Mosquitto::start();
    let data = hubgate_tests::private_dir();
    let cfg = durable_config(
        broker.port,
        "gw-lock",
        data.path(),
        "",
        &sequence_stream("1d"),
    );
    let first = Gateway::start(gateway_bin!(), &cfg);
    first.wait_ready();
    let config_path = data.path().join("second.toml");
    std::fs::write(&config_path, cfg.replace("gw-lock", "gw-lock-2")).unwrap();
    let err = hubgate_tests::refused_start(gateway_bin!(), &config_path);
    assert!(
        err.contains("another hubgate is running with the data directory"),
        "{err}"
    );
    // The second one wrote nothing: the audit log has only the first one's start.
    let audit = std::fs::read_to_string(data.path().join("audit.jsonl")).unwrap();
    assert_eq!(audit.matches("\"event\":\"start\"").count(), 1, "{audit}");
    assert_eq!(first.metric("hubgate_mqtt_connected", &[]), 1.0);
}

/// With `store.log_bytes`, redb's write-ahead log fits a small volume, and commits larger than
/// half of it still lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_write_ahead_log_loses_nothing() {
    const N: u64 = 3000;
    let broker = Mosquitto::start();
    let data = hubgate_tests::private_dir();
    let cfg = durable_config(
        broker.port,
        "gw-small-log",
        data.path(),
        "engine = \"redb\"\nlog_bytes = \"512KiB\"",
        &sequence_stream("1d"),
    );
    let gw = Gateway::start(gateway_bin!(), &cfg);
    gw.wait_ready();
    let log = data.path().join("outbox/outbox.log");
    assert_eq!(std::fs::metadata(&log).unwrap().len(), 512 << 10);
    let mut publisher = Publisher::connect(broker.port, "pub-small-log");
    publisher.publish_numbers("test/seq", N).await;
    let seen = replay(&gw, "seq", Duration::from_secs(30), |s| {
        s.numbers.len() as u64 == N
    })
    .await;
    assert_eq!(seen.numbers.len() as u64, N);
    assert!(seen.gaps.is_empty());
    assert_eq!(std::fs::metadata(&log).unwrap().len(), 512 << 10);
}
