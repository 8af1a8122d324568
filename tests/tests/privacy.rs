//! End to end: a people counter that reports Wi-Fi MAC addresses, through a real mosquitto, the
//! gateway as its own process, and a real gRPC subscriber.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use hubgate_proto::v1::{self, start_position::Position, subscribe_response::Event};
use hubgate_tests::{
    Gateway, Mosquitto, Publisher, config, fields, gateway_bin, subscribe_request,
};
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;

const FOOTFALL: &str = r#"
[[stream]]
name = "footfall"
topics = ["city/footfall/+/probe"]
purpose = "How busy public spaces are"
legal_basis = "public task"
principles = ["community_participation"]
retention = "1d"
time_field = "ts"
time_bucket = "2s"

[stream.fields]
counter_id = "keep"
note = "keep"
mac = "pseudonymise"
cell = { h3 = { resolution = 9, lat = "lat", lon = "lon" } }
"#;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Every textual form of a MAC address a leak could take: notations, and unkeyed SHA-256 hashes.
fn forbidden_forms(octets: [u8; 6]) -> Vec<String> {
    let lower = octets
        .iter()
        .map(|o| format!("{o:02x}"))
        .collect::<Vec<_>>();
    let colon = lower.join(":");
    let plain = lower.concat();
    let mut forms = vec![
        colon.clone(),
        colon.to_uppercase(),
        lower.join("-"),
        plain.clone(),
        plain.to_uppercase(),
    ];
    for form in forms.clone() {
        forms.push(hex(&Sha256::digest(form.as_bytes())));
    }
    forms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_mac_address_nor_an_unkeyed_hash_of_one_reaches_a_subscriber() {
    let broker = Mosquitto::start();
    let gw = Gateway::start(gateway_bin!(), &config(broker.port, "gw-privacy", FOOTFALL));
    gw.wait_ready();
    let mut client = gw.client().await;
    let request = subscribe_request(&["footfall"], Position::Oldest(v1::Oldest {}));
    let mut stream = client.subscribe(request).await.unwrap().into_inner();

    let mut publisher = Publisher::connect(broker.port, "pub-privacy");
    // 20 devices, each heard 3 times in a different notation; some also leak into a free-text note.
    let devices: Vec<[u8; 6]> = (0..20u8)
        .map(|i| [0x3c, 0x22, 0xfb, i, 0x10 + i, 0xa0 ^ i])
        .collect();
    let mut sent = 0;
    for round in 0..3 {
        for (i, d) in devices.iter().enumerate() {
            let forms = forbidden_forms(*d);
            let mac = &forms[round];
            let note = if i.is_multiple_of(4) {
                format!("probe from {}", forms[1])
            } else {
                "probe".to_owned()
            };
            // The counter names the device, so that records can be told apart whatever order
            // they are released in.
            let payload = serde_json::json!({
                "counter_id": format!("pc-{i:02}"), "ts": 1_700_000_123 + i as i64, "mac": mac,
                "note": note, "lat": 52.3731, "lon": 4.8922, "rssi": -60,
            });
            publisher
                .publish("city/footfall/pc-01/probe", payload.to_string())
                .await;
            sent += 1;
        }
    }
    publisher.wait_acked(sent).await;

    let forbidden: Vec<String> = devices.iter().flat_map(|d| forbidden_forms(*d)).collect();
    let mut pseudonyms: HashMap<String, HashSet<String>> = HashMap::new();
    for _ in 0..sent {
        let message = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("record");
        let Some(Event::Record(record)) = message.unwrap().unwrap().event else {
            panic!("not a record")
        };
        let printed = format!("{record:?}").to_lowercase();
        for f in &forbidden {
            assert!(!printed.contains(&f.to_lowercase()), "a record carries {f}");
        }
        let f = fields(&record);
        assert!(
            !f.contains_key("lat") && !f.contains_key("lon") && !f.contains_key("rssi"),
            "{f:?}"
        );
        assert_eq!(f["cell"].len(), 15, "an H3 cell index: {f:?}");
        assert_eq!(
            record.event_time.unwrap().seconds % 2,
            0,
            "time coarsened to 2 s"
        );
        let device: usize = f["counter_id"][3..].parse().unwrap();
        pseudonyms
            .entry(f["mac"].clone())
            .or_default()
            .insert(device.to_string());
        if device.is_multiple_of(4) {
            assert!(
                !f.contains_key("note"),
                "a note holding a MAC address passed: {f:?}"
            );
        } else {
            assert_eq!(f["note"], "probe");
        }
    }
    // Within the key epoch every notation of a device gives its one pseudonym, and devices differ.
    assert_eq!(pseudonyms.len(), devices.len(), "{pseudonyms:?}");
    assert!(pseudonyms.values().all(|d| d.len() == 1));

    let metric = |name: &str| gw.metric(name, &[("stream", "footfall")]);
    assert_eq!(metric("hubgate_fields_pseudonymised_total"), sent as f64);
    assert_eq!(metric("hubgate_identifiers_suppressed_total"), 15.0);
    assert_eq!(
        gw.metric("hubgate_key_rotations_total", &[("stream", "footfall")]),
        1.0
    );
    assert!(
        !gw.log().to_lowercase().contains("3c:22:fb"),
        "a MAC address appeared in the log"
    );
}

fn footfall_aggregated() -> String {
    hubgate_tests::footfall_aggregated(
        "rssi = \"keep\"\n",
        "4s",
        "3s",
        5,
        "readings = \"count\"\ndevices = \"contributors\"\nmean_rssi = { fn = \"mean\", field = \"rssi\" }\n",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregated_stream_releases_no_group_below_k_and_no_device() {
    let broker = Mosquitto::start();
    let gw = Gateway::start(
        gateway_bin!(),
        &config(broker.port, "gw-aggregate", &footfall_aggregated()),
    );
    gw.wait_ready();
    let mut client = gw.client().await;
    let request = subscribe_request(&["footfall"], Position::Oldest(v1::Oldest {}));
    let mut stream = client.subscribe(request).await.unwrap().into_inner();

    // All readings carry the same event time, now: one window, which closes 3 to 7 s from now.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // Devices heard per counter: pc-01 above k, pc-02 below it, pc-03 exactly k.
    let counters = [("pc-01", 12u8), ("pc-02", 4), ("pc-03", 5)];
    let mut publisher = Publisher::connect(broker.port, "pub-aggregate");
    let mut sent = 0;
    let mut macs = Vec::new();
    for (c, (counter, devices)) in counters.iter().enumerate() {
        for d in 0..*devices {
            let octets = [0x3c, 0x22, 0xfb, c as u8, d, 0x5a];
            let forms = forbidden_forms(octets);
            macs.extend(forms.clone());
            // Each device is heard twice, in two notations.
            for (round, rssi) in [(0, -50), (1, -70)] {
                let payload = serde_json::json!({
                    "counter_id": counter, "ts": now, "mac": forms[round], "rssi": rssi,
                });
                publisher
                    .publish(
                        &format!("city/footfall/{counter}/probe"),
                        payload.to_string(),
                    )
                    .await;
                sent += 1;
            }
        }
    }
    // A reading for a window that closed long ago.
    let late = serde_json::json!({"counter_id": "pc-01", "ts": now - 60, "mac": "3c:22:fb:ff:ff:ff", "rssi": -60});
    publisher
        .publish("city/footfall/pc-01/probe", late.to_string())
        .await;
    sent += 1;
    publisher.wait_acked(sent).await;

    let mut groups = HashMap::new();
    while groups.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("the window's groups are released");
        let Some(Event::Record(record)) = message.unwrap().unwrap().event else {
            panic!("not a record")
        };
        let printed = format!("{record:?}").to_lowercase();
        for m in &macs {
            assert!(!printed.contains(&m.to_lowercase()), "a record carries {m}");
        }
        let f = fields(&record);
        let mut names: Vec<&str> = f.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["counter_id", "devices", "mean_rssi", "readings"]);
        let window = record.event_time.unwrap().seconds;
        assert_eq!(window, now - now.rem_euclid(4), "the window's start");
        groups.insert(f["counter_id"].clone(), f);
    }
    assert_eq!(groups["pc-01"]["devices"], "12");
    assert_eq!(groups["pc-01"]["readings"], "24");
    assert_eq!(groups["pc-01"]["mean_rssi"], "-60");
    assert_eq!(groups["pc-03"]["devices"], "5");
    // pc-02 had 4 devices, fewer than k = 5: it never comes, now or later.
    let more = tokio::time::timeout(Duration::from_secs(2), stream.next()).await;
    assert!(more.is_err(), "an unexpected record: {more:?}");

    let metric = |name: &str, outcome: &str| {
        gw.metric(name, &[("stream", "footfall"), ("outcome", outcome)])
    };
    assert_eq!(metric("hubgate_aggregate_groups_total", "released"), 2.0);
    // What the windows took in, the suppressed group and the late reading are not published.
    let page = gw.metrics();
    for hidden in [
        "hubgate_aggregate_readings_total",
        "suppressed_min_group_size",
        "hubgate_aggregate_state_entries",
        "hubgate_stream_messages_total{stream=\"footfall\"}",
    ] {
        assert!(!page.contains(hidden), "{hidden} is published");
    }
}

/// Windows of 2 s, each paid for on the clock at epsilon 2, twelve a day: the day's budget lasts
/// 24 s. A group is released when it has 3 devices and its noisy count reaches 10.
fn footfall_noisy() -> String {
    hubgate_tests::footfall_aggregated(
        "",
        "2s",
        "1s",
        3,
        "devices = \"contributors\"\n\n[stream.aggregate.noise]\nepsilon = 2.0\ndaily_budget = 24.0\n",
    )
}

/// Publishes 20 devices heard by one counter, all at event time `ts`.
async fn publish_window(publisher: &mut Publisher, ts: i64, sent: &mut u64) {
    for d in 0..20u8 {
        let payload = serde_json::json!({
            "counter_id": "pc-01", "ts": ts, "mac": format!("3c:22:fb:00:{d:02x}:{:02x}", ts % 256),
        });
        publisher
            .publish("city/footfall/pc-01/probe", payload.to_string())
            .await;
        *sent += 1;
    }
}

/// A noisy stream pays for every window of its clock as it closes, readings or not, into a ledger
/// on disk: a restart resumes the day's spending where it stood, and once the day's budget is
/// spent nothing more is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_reset_a_spent_privacy_budget() {
    let broker = Mosquitto::start();
    let data = hubgate_tests::private_dir();
    let cfg = config(broker.port, "gw-budget", &footfall_noisy()).replace(
        "[grpc]",
        &format!("[store]\ndata_dir = {:?}\n\n[grpc]", data.path()),
    );
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    // The whole test in one UTC day: not across midnight.
    while (now() + 90) / 86_400 != now() / 86_400 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut publisher = Publisher::connect(broker.port, "pub-budget");
    let mut sent = 0;
    let released = [("stream", "footfall"), ("outcome", "released")];
    let footfall = [("stream", "footfall")];

    // First run: a window of readings is released; the clock has paid for a few windows.
    let gw = Gateway::start(gateway_bin!(), &cfg);
    gw.wait_ready();
    publish_window(&mut publisher, now(), &mut sent).await;
    publisher.wait_acked(sent).await;
    hubgate_tests::wait_for("the window released", Duration::from_secs(20), || {
        gw.metric("hubgate_aggregate_groups_total", &released) == 1.0
    });
    assert!(gw.stop().success());
    let spent: f64 = budget_spent(&data);
    assert!((2.0..24.0).contains(&spent), "{spent}");

    // Second run, same data directory: the spending goes on from where it stood.
    let gw = Gateway::start(gateway_bin!(), &cfg);
    gw.wait_ready();
    hubgate_tests::wait_for("the clock paid again", Duration::from_secs(20), || {
        gw.metric("hubgate_privacy_budget_spent_today_epsilon", &footfall) > 0.0
    });
    assert!(gw.metric("hubgate_privacy_budget_spent_today_epsilon", &footfall) >= spent + 2.0);
    hubgate_tests::wait_for("the day's budget spent", Duration::from_secs(40), || {
        gw.metric("hubgate_privacy_budget_refusals_total", &footfall) >= 1.0
    });
    assert_eq!(
        gw.metric("hubgate_privacy_budget_spent_today_epsilon", &footfall),
        24.0
    );
    // A window of readings now is refused with every window after it.
    let refused = gw.metric("hubgate_privacy_budget_refusals_total", &footfall);
    publish_window(&mut publisher, now(), &mut sent).await;
    publisher.wait_acked(sent).await;
    hubgate_tests::wait_for("later windows refused", Duration::from_secs(20), || {
        gw.metric("hubgate_privacy_budget_refusals_total", &footfall) >= refused + 3.0
    });
    assert_eq!(gw.metric("hubgate_aggregate_groups_total", &released), 0.0);
    let mut client = gw.client().await;
    let streams = client
        .list_streams(v1::ListStreamsRequest {})
        .await
        .unwrap()
        .into_inner()
        .streams;
    // The outbox kept the first run's group; nothing was added.
    assert_eq!(
        (streams[0].oldest_sequence, streams[0].last_sequence),
        (1, 1),
        "{streams:?}"
    );
}

/// Epsilon spent today by the pool `footfall`, from the ledger file.
fn budget_spent(data: &tempfile::TempDir) -> f64 {
    let ledger: serde_json::Value = serde_json::from_slice(
        &std::fs::read(data.path().join("privacy-budget.json")).expect("the ledger is written"),
    )
    .expect("the ledger is JSON");
    let spent = &ledger["streams"]["footfall"]["spent"];
    spent
        .as_object()
        .expect("spending by day")
        .values()
        .map(|v| v.as_f64().expect("micro-epsilon"))
        .sum::<f64>()
        / 1e6
}

const PROBES: &str = r#"
[[stream]]
name = "probes"
topics = ["city/probes/+/seen"]
purpose = "How busy public spaces are"
legal_basis = "public task"
principles = ["community_participation"]
retention = "1d"
time_bucket = "3s"

[stream.fields]
n = "keep"
mac = "pseudonymise"
"#;

/// Records of a personal-data stream with a time bucket reach a live subscriber only once their
/// bucket has ended, all of the bucket together, in an order unrelated to their publication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_data_is_released_after_its_bucket_in_no_order_of_arrival() {
    let broker = Mosquitto::start();
    let gw = Gateway::start(gateway_bin!(), &config(broker.port, "gw-held", PROBES));
    gw.wait_ready();
    let mut client = gw.client().await;
    let request = subscribe_request(&["probes"], Position::Live(v1::Live {}));
    let mut stream = client.subscribe(request).await.unwrap().into_inner();
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    // Start early in a bucket, so that all readings fall in one.
    while now_ms() % 3_000 > 500 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bucket_end = now_ms() - now_ms() % 3_000 + 3_000;
    let mut publisher = Publisher::connect(broker.port, "pub-held");
    let sent = 40u64;
    for n in 0..sent {
        let payload = serde_json::json!({"n": n, "mac": format!("3c:22:fb:00:00:{n:02x}")});
        publisher
            .publish("city/probes/p1/seen", payload.to_string())
            .await;
    }
    publisher.wait_acked(sent).await;
    assert!(now_ms() < bucket_end, "published within one bucket");
    let mut order = Vec::new();
    while order.len() < sent as usize {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the bucket's records")
            .unwrap()
            .unwrap();
        let arrived = now_ms();
        let Some(Event::Record(record)) = message.event else {
            continue;
        };
        assert!(
            arrived >= bucket_end,
            "a record came {} ms before its bucket ended",
            bucket_end - arrived
        );
        assert!(
            arrived < bucket_end + 2_000,
            "released {} ms late",
            arrived - bucket_end
        );
        order.push(fields(&record)["n"].parse::<u64>().unwrap());
    }
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..sent).collect::<Vec<_>>());
    assert_ne!(order, sorted, "released in the order they were published");
    // How far the order is from the publication order: most records are displaced.
    let in_place = order
        .iter()
        .enumerate()
        .filter(|(i, n)| *i as u64 == **n)
        .count();
    assert!(
        in_place < 10,
        "{in_place} records of 40 in their place: {order:?}"
    );
}

const TOKEN: &str = "hg_dashboard_token";

/// One reading of a group that k suppresses moves nothing a dashboard or a reader of the public
/// notice can see: no page of the public listener, no per-stream counter of the aggregated
/// stream, and no footprint for a token without the footprint scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suppressed_reading_moves_no_counter_anyone_outside_can_read() {
    let broker = Mosquitto::start();
    let streams =
        hubgate_tests::footfall_aggregated("", "2s", "1s", 5, "devices = \"contributors\"\n");
    let cfg = config(broker.port, "gw-quiet", &streams)
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            "[admin]\nlisten = \"127.0.0.1:0\"\npublic_listen = \"127.0.0.1:0\"",
        )
        .replace(
            "[grpc]\nlisten = \"127.0.0.1:0\"",
            &format!(
                "[grpc]\nlisten = \"127.0.0.1:0\"\n[[grpc.token]]\nname = \"dashboard\"\nsha256 = \"{}\"\nstreams = [\"*\"]\npolicy = true\n",
                hubgate::sinks::grpc::auth::digest_hex(TOKEN)
            ),
        );
    let gw = Gateway::start(gateway_bin!(), &cfg);
    gw.wait_ready();
    let public = gw.public.expect("the public listener's address");
    let pages = || {
        [
            "/transparency",
            "/transparency.json",
            "/processing-record",
            "/metrics",
        ]
        .map(|path| hubgate_tests::http_get(public, path))
    };
    let footfall_lines = || -> Vec<String> {
        let mut lines: Vec<String> = gw
            .metrics()
            .lines()
            .filter(|l| l.contains("stream=\"footfall\""))
            .map(str::to_owned)
            .collect();
        lines.sort_unstable();
        lines
    };
    let (public_before, lines_before) = (pages(), footfall_lines());
    assert_eq!(
        public_before[3].0, 404,
        "the public listener serves no metrics"
    );
    assert_eq!(public_before[0].0, 200);

    // One device, heard once: a group below k, in a window that closes within 3 s.
    let mut publisher = Publisher::connect(broker.port, "pub-quiet");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let payload = serde_json::json!({"counter_id": "pc-09", "ts": now, "mac": "3c:22:fb:09:09:09"});
    publisher
        .publish("city/footfall/pc-09/probe", payload.to_string())
        .await;
    publisher.wait_acked(1).await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    assert_eq!(pages(), public_before, "a public page changed");
    assert_eq!(
        footfall_lines(),
        lines_before,
        "a counter of the stream moved"
    );
    let mut client = gw.client().await;
    let mut request = tonic::Request::new(v1::WatchFootprintRequest {});
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let refused = client.watch_footprint(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
}
