//! Who may read what over gRPC: bearer tokens with scopes, against a running gateway.

use std::time::Duration;

use hubgate_proto::v1::{self, start_position::Position, subscribe_response::Event};
use hubgate_tests::{Gateway, Mosquitto, Publisher, config, gateway_bin, subscribe_request};
use tokio_stream::StreamExt as _;
use tonic::{Code, Request};

const STREAMS: &str = r#"
[[stream]]
name = "air"
topics = ["city/air/+/reading"]
purpose = "Air quality maps"
legal_basis = "public task"
principles = ["sustainability_resilience"]
technology = "tech__air_quality"
retention = "1d"

[stream.fields]
station_id = "keep"
pm25 = "keep"

[[stream]]
name = "noise"
topics = ["city/noise/+"]
purpose = "Noise maps"
legal_basis = "legal obligation"
principles = ["human_rights_equity_inclusion"]
technology = "tech__sound_level_meter"
retention = "1d"

[stream.fields]
meter_id = "keep"
laeq_db = "keep"
"#;

/// A live subscription to the `noise` stream.
async fn live_noise(gw: &Gateway) -> tonic::Streaming<v1::SubscribeResponse> {
    gw.client()
        .await
        .subscribe(subscribe_request(&["noise"], Position::Live(v1::Live {})))
        .await
        .expect("subscribe")
        .into_inner()
}

/// `request` carrying `token`, if any.
fn with<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    request
}

fn token_entry(name: &str, token: &str, scopes: &str) -> String {
    format!(
        "\n[[grpc.token]]\nname = \"{name}\"\nsha256 = \"{}\"\n{scopes}\n",
        hubgate::sinks::grpc::auth::digest_hex(token)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_get_only_the_streams_and_figures_their_token_allows() {
    let (north, ops) = ("hg_north_dashboard_token", "hg_operations_token");
    let broker = Mosquitto::start();
    let mut text = config(broker.port, "gw-tokens", STREAMS);
    text.push_str(&token_entry("north", north, "streams = [\"air\"]"));
    text.push_str(&token_entry(
        "ops",
        ops,
        "streams = [\"*\"]\npolicy = true\nfootprint = true",
    ));
    let gw = Gateway::start(gateway_bin!(), &text);
    gw.wait_ready();
    let publisher = Publisher::connect(broker.port, "pub-tokens");
    for i in 0..5 {
        publisher
            .publish(
                "city/air/aq/reading",
                serde_json::json!({"station_id": format!("aq-{i}"), "pm25": 7.0}).to_string(),
            )
            .await;
        publisher
            .publish(
                "city/noise/m1",
                serde_json::json!({"meter_id": "m1", "laeq_db": 60 + i}).to_string(),
            )
            .await;
    }
    hubgate_tests::wait_for("10 records", Duration::from_secs(15), || {
        gw.metric("hubgate_records_kept_total", &[("stream", "air")])
            + gw.metric("hubgate_records_kept_total", &[("stream", "noise")])
            == 10.0
    });
    let mut client = gw.client().await;
    let oldest = |streams: &[&str], token| {
        with(
            subscribe_request(streams, Position::Oldest(v1::Oldest {})),
            token,
        )
    };

    // No token, and a wrong one: nothing, not even the list of streams.
    for token in [None, Some("hg_not_a_token")] {
        let err = client.subscribe(oldest(&["air"], token)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        let err = client
            .list_streams(with(v1::ListStreamsRequest {}, token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    // A token for another stream: refused, and the same refusal for a stream that does not
    // exist, so the answer does not tell which streams there are.
    let err = client
        .subscribe(oldest(&["noise"], Some(north)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let ghost = client
        .subscribe(oldest(&["ghost"], Some(north)))
        .await
        .unwrap_err();
    assert_eq!((ghost.code(), ghost.message()), (err.code(), err.message()));
    for code in [
        client
            .get_policy(with(v1::GetPolicyRequest {}, Some(north)))
            .await
            .unwrap_err()
            .code(),
        client
            .get_footprint(with(v1::GetFootprintRequest {}, Some(north)))
            .await
            .unwrap_err()
            .code(),
    ] {
        assert_eq!(code, Code::PermissionDenied);
    }
    // Its listing and an "every stream" subscription hold only its stream.
    let listed: Vec<String> = client
        .list_streams(with(v1::ListStreamsRequest {}, Some(north)))
        .await
        .unwrap()
        .into_inner()
        .streams
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(listed, ["air"]);
    let mut all = client
        .subscribe(oldest(&[], Some(north)))
        .await
        .unwrap()
        .into_inner();
    let mut streams = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(2), all.next()).await {
        if let Some(Event::Record(r)) = event.unwrap().event {
            streams.push(r.stream);
        }
    }
    assert_eq!(streams, vec!["air".to_owned(); 5]);
    // Pushing needs its own scope.
    let push = client
        .push(with(
            tokio_stream::iter(vec![v1::PushRequest {
                origin: "north-1".into(),
                stream: "air".into(),
                records: Vec::new(),
                incarnation: "abc".into(),
                policies: Vec::new(),
            }]),
            Some(north),
        ))
        .await
        .unwrap_err();
    assert_eq!(push.code(), Code::PermissionDenied);

    // The operations token reads everything it was given.
    let mut noise = client
        .subscribe(oldest(&["noise"], Some(ops)))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), noise.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(first.event, Some(Event::Record(r)) if r.stream == "noise"));
    client
        .get_policy(with(v1::GetPolicyRequest {}, Some(ops)))
        .await
        .unwrap();

    // Every refusal is counted by reason; no token appears in the log or the metrics.
    let page = gw.metrics();
    let refused = |reason| {
        hubgate_tests::metric_value(&page, "hubgate_grpc_refused_total", &[("reason", reason)])
    };
    assert_eq!(refused("missing"), 2.0);
    assert_eq!(refused("unknown"), 2.0);
    assert_eq!(refused("scope"), 5.0);
    for secret in [north, ops, "hg_not_a_token"] {
        assert!(!gw.log().contains(secret) && !page.contains(secret));
    }
}

#[test]
fn tokens_and_remote_listening_are_checked_in_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hubgate.toml");
    let text = config(1883, "gw-check", STREAMS).replace("127.0.0.1:0", "0.0.0.0:0")
        + "\n[[grpc.token]]\nname = \"north\"\nsha256 = \"hg_plain_token\"\nstreams = [\"traffic\"]\n";
    std::fs::write(&path, &text).unwrap();
    let out = std::process::Command::new(gateway_bin!())
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let report = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "is not a loopback address: configure [grpc.tls]",
        "sha256 must be 64 lowercase hex digits",
        "names stream 'traffic', which the policy does not declare",
    ] {
        assert!(
            report.contains(expected),
            "missing {expected:?} in:\n{report}"
        );
    }
    // Accepted, with warnings: tokens in the clear, and the unauthenticated admin port open.
    let text = config(1883, "gw-check", STREAMS)
        .replace(
            "[grpc]\nlisten = \"127.0.0.1:0\"",
            "[grpc]\nlisten = \"0.0.0.0:0\"\nallow_insecure_remote = true",
        )
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            "[admin]\nlisten = \"0.0.0.0:0\"",
        )
        + &token_entry("north", "hg_north", "streams = [\"air\"]");
    std::fs::write(&path, &text).unwrap();
    let out = std::process::Command::new(gateway_bin!())
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    for expected in [
        "bearer tokens over plaintext",
        "admin.listen 0.0.0.0:0 is not a loopback address",
    ] {
        assert!(
            report.contains(expected),
            "missing {expected:?} in:\n{report}"
        );
    }
    // `hubgate token new` prints a token and the entry that holds only its digest.
    let out = std::process::Command::new(gateway_bin!())
        .args([
            "token",
            "new",
            "--name",
            "north",
            "--stream",
            "air",
            "--footprint",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let entry = String::from_utf8(out.stderr).unwrap();
    assert!(token.starts_with("hg_"));
    assert!(entry.contains(&format!(
        "sha256 = \"{}\"",
        hubgate::sinks::grpc::auth::digest_hex(&token)
    )));
    assert!(entry.contains("streams = [\"air\"]") && entry.contains("footprint = true"));
    assert!(!entry.contains(&token));
}

/// Tokens granted, changed and revoked by a reload are each an audit entry; the start lists
/// every grant; a revoked token is refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_grants_and_revocations_are_audited() {
    let broker = Mosquitto::start();
    let base = config(broker.port, "gw-grants", STREAMS);
    let gw = Gateway::start(
        gateway_bin!(),
        &(base.clone() + &token_entry("north", "hg_north", "streams = [\"air\"]")),
    );
    gw.wait_ready();
    let start = gw
        .audit_events()
        .into_iter()
        .find(|e| e["event"] == "start")
        .expect("the start is audited");
    assert_eq!(start["data"]["tokens"][0]["name"], "north");
    assert_eq!(start["data"]["tokens"][0]["streams"][0], "air");
    let prefix = start["data"]["tokens"][0]["sha256_prefix"]
        .as_str()
        .unwrap();
    assert_eq!(prefix.len(), 16);
    assert!(
        !start.to_string().contains("hg_north"),
        "no token in the log"
    );

    // north gets `noise` too, south is new.
    std::fs::write(
        gw.config_path(),
        base.clone()
            + &token_entry("north", "hg_north", "streams = [\"air\", \"noise\"]")
            + &token_entry("south", "hg_south", "footprint = true"),
    )
    .unwrap();
    gw.hangup();
    hubgate_tests::wait_for("the grants", Duration::from_secs(15), || {
        gw.audit_events()
            .iter()
            .any(|e| e["event"] == "token_granted")
    });
    let events = gw.audit_events();
    let granted: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "token_granted")
        .collect();
    assert_eq!(granted.len(), 1);
    assert_eq!(granted[0]["data"]["name"], "south");
    assert_eq!(granted[0]["data"]["footprint"], true);
    let changed: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "token_changed")
        .collect();
    assert_eq!(changed.len(), 1);
    assert_eq!(
        changed[0]["data"]["before"]["streams"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(changed[0]["data"]["after"]["streams"][1], "noise");

    // north is revoked.
    std::fs::write(
        gw.config_path(),
        base + &token_entry("south", "hg_south", "footprint = true"),
    )
    .unwrap();
    gw.hangup();
    hubgate_tests::wait_for("the revocation", Duration::from_secs(15), || {
        gw.audit_events()
            .iter()
            .any(|e| e["event"] == "token_revoked")
    });
    let events = gw.audit_events();
    let revoked = events
        .iter()
        .find(|e| e["event"] == "token_revoked")
        .unwrap();
    assert_eq!(revoked["data"]["name"], "north");
    assert_eq!(revoked["data"]["sha256_prefix"], prefix);
    assert_eq!(
        events
            .iter()
            .filter(|e| e["event"] == "token_granted")
            .count(),
        1
    );
    gw.wait_ready();
    let refused = gw
        .client()
        .await
        .subscribe(with(
            subscribe_request(&["air"], Position::Live(v1::Live {})),
            Some("hg_north"),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
}

/// The head `GetPolicy` reports, as `hubgate audit verify --head` takes it.
async fn audit_head(gw: &Gateway) -> String {
    let policy = gw
        .client()
        .await
        .get_policy(v1::GetPolicyRequest {})
        .await
        .expect("GetPolicy")
        .into_inner();
    assert_eq!(policy.audit_head_hash.len(), 64);
    format!("{}:{}", policy.audit_head_seq, policy.audit_head_hash)
}

fn audit_verify(log: &std::path::Path, head: &str) -> (bool, String) {
    let out = std::process::Command::new(gateway_bin!())
        .args(["audit", "verify", "--head", head])
        .arg(log)
        .output()
        .expect("hubgate audit verify");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// An audit log whose tail was cut is caught at the next start, against the head anchored in
/// the outbox; a head noted from `GetPolicy` shows a chain rewritten whole to `audit verify`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_or_rewritten_audit_log_is_caught() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = data.join("audit.jsonl");
    let text = format!(
        "[store]\ndata_dir = {data:?}\n{}",
        config(broker.port, "gw-anchor", STREAMS)
    );
    for _ in 0..2 {
        let gw = Gateway::start(gateway_bin!(), &text);
        gw.wait_ready();
        assert!(gw.stop().success());
    }
    // The last entry cut: the chain still verifies on its own, but the start says what is missing.
    let entries = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = entries.lines().collect();
    assert!(lines.len() >= 2);
    std::fs::write(&log, lines[..lines.len() - 1].join("\n") + "\n").unwrap();
    let gw = Gateway::start(gateway_bin!(), &text);
    gw.wait_ready();
    assert!(
        gw.log()
            .contains("the audit log does not hold the entry its anchor names"),
        "{}",
        gw.log()
    );
    assert_eq!(gw.metric("hubgate_audit_anchor_mismatches_total", &[]), 1.0);
    let head = audit_head(&gw).await;
    assert!(gw.stop().success());
    let after = std::fs::read_to_string(&log).unwrap();
    assert!(after.contains("\"event\":\"audit_chain_broken\""));
    // An intact log holds the head noted from GetPolicy.
    let (ok, report) = audit_verify(&log, &head);
    assert!(ok && report.contains("holds the head's hash"), "{report}");
    // Rewritten whole with fresh hashes, one entry per line as before: verifies on its own,
    // but not against the head.
    std::fs::remove_file(&log).unwrap();
    let forged = hubgate::governance::audit::AuditLog::open(&log).unwrap();
    for line in after.lines() {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        forged.record(
            entry["time_ms"].as_i64().unwrap(),
            entry["event"].as_str().unwrap(),
            serde_json::json!({}),
        );
    }
    drop(forged);
    let (ok, report) = audit_verify(&log, &head);
    assert!(
        !ok && report.contains("the chain was rewritten"),
        "{report}"
    );
    // Cut before the head: the log ends too early.
    std::fs::write(&log, "").unwrap();
    let (ok, report) = audit_verify(&log, &head);
    assert!(!ok && report.contains("the log was cut"), "{report}");
}

#[test]
fn an_upstream_token_file_readable_by_others_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("upstream.token");
    std::fs::write(&token, "hg_secret_push_token\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let path = dir.path().join("hubgate.toml");
    std::fs::write(
        &path,
        format!(
            "[store]\ndata_dir = {:?}\n[upstream]\nendpoint = \"http://127.0.0.1:1\"\norigin = \"d1\"\ntoken_file = {:?}\n{}",
            dir.path().join("data"),
            token,
            config(hubgate_tests::free_port(), "gw-token-file", STREAMS)
        ),
    )
    .unwrap();
    let stderr = hubgate_tests::refused_start(gateway_bin!(), &path);
    assert!(
        stderr.contains("is readable by others (mode 644)") && stderr.contains("chmod 600"),
        "{stderr}"
    );
    assert!(!stderr.contains("hg_secret_push_token"));
}

/// Under the common umask 022, everything the gateway writes in its data directory is private
/// to its user, on either engine; a data directory others can enter stops the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_is_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt as _;
    let broker = Mosquitto::start();
    for engine in ["redb", "sled"] {
        let text = format!(
            "[store]\nengine = \"{engine}\"\n{}",
            config(broker.port, &format!("gw-private-{engine}"), STREAMS)
        );
        let gw = Gateway::start_with_umask(gateway_bin!(), &text, 0o022);
        gw.wait_ready();
        let mut publisher = Publisher::connect(broker.port, &format!("pub-private-{engine}"));
        for n in 0..20 {
            publisher
                .publish(
                    "city/noise/m1",
                    format!("{{\"meter_id\": \"m1\", \"laeq_db\": {n}}}"),
                )
                .await;
        }
        publisher.wait_acked(20).await;
        let mut stream = live_noise(&gw).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
        let data = gw.dir().join("hubgate-data");
        let mut pending = vec![data.clone()];
        let mut seen = Vec::new();
        while let Some(path) = pending.pop() {
            let meta = std::fs::metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            seen.push(path.strip_prefix(&data).unwrap().display().to_string());
            if meta.is_dir() {
                assert_eq!(mode, 0o700, "{engine}: {} is {mode:o}", path.display());
                pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            } else {
                assert_eq!(mode, 0o600, "{engine}: {} is {mode:o}", path.display());
            }
        }
        for file in ["audit.jsonl", "outbox/keys", "lock"] {
            assert!(
                seen.iter().any(|s| s == file),
                "{engine}: no {file} in {seen:?}"
            );
        }
        gw.stop();
    }
    // A data directory made by hand, open to others: refused, and the message says how to fix it.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("hubgate.toml");
    std::fs::write(
        &path,
        format!(
            "[store]\ndata_dir = {data:?}\n{}",
            config(broker.port, "gw-open-dir", STREAMS)
        ),
    )
    .unwrap();
    let stderr = hubgate_tests::refused_start(gateway_bin!(), &path);
    assert!(
        stderr.contains("is open to others (mode 755)") && stderr.contains("chmod 700"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&data).unwrap().count(),
        0,
        "nothing written"
    );
}

/// A message larger than the gateway can read, from a broker that does not limit packet sizes
/// (mosquitto's default), is acknowledged unread and counted: the messages behind it arrive,
/// and the gateway does not reconnect in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_too_large_to_read_does_not_stop_ingest() {
    let broker = Mosquitto::start();
    let gw = Gateway::start(
        gateway_bin!(),
        &config(broker.port, "gw-too-large", STREAMS),
    );
    gw.wait_ready();
    let mut publisher = Publisher::connect_sized(broker.port, "pub-too-large", 32 << 20);
    publisher
        .publish("city/noise/m-7", vec![b'x'; 17 << 20])
        .await;
    for n in 0..20 {
        publisher
            .publish(
                "city/noise/m-7",
                format!("{{\"meter_id\": \"m-7\", \"laeq_db\": {n}}}"),
            )
            .await;
    }
    publisher.wait_acked(21).await;
    let mut stream = gw
        .client()
        .await
        .subscribe(subscribe_request(
            &["noise"],
            Position::Oldest(v1::Oldest {}),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut kept = std::collections::BTreeSet::new();
    while kept.len() < 20 {
        let next = tokio::time::timeout(Duration::from_secs(30), stream.next()).await;
        let Ok(Some(Ok(message))) = next else {
            panic!("{} of 20 kept; log:\n{}", kept.len(), gw.log());
        };
        if let Some(Event::Record(r)) = message.event {
            kept.insert(hubgate_tests::fields(&r)["laeq_db"].clone());
        }
    }
    assert_eq!(gw.metric("hubgate_mqtt_messages_oversized_total", &[]), 1.0);
    let errors = gw.metric("hubgate_mqtt_connection_errors_total", &[]);
    assert!(errors <= 2.0, "{errors} connection errors");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        gw.metric("hubgate_mqtt_connection_errors_total", &[]),
        errors,
        "no reconnect loop"
    );
    let log = gw.log();
    assert!(
        log.contains("acknowledged unread") && log.contains("city/noise/+"),
        "{log}"
    );
    assert!(
        !log.contains("m-7"),
        "the topic's device level is not logged"
    );
}

/// A flood of hostile payloads on one topic (oversized, malformed, deeply nested, not UTF-8)
/// leaves another topic's stream flowing with no loss, every rejection counted, and the
/// gateway's memory bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_flood_on_one_topic_does_not_starve_another() {
    const GOOD: u64 = 300;
    let broker = Mosquitto::start();
    let gw = Gateway::start(
        gateway_bin!(),
        &config(broker.port, "gw-flood", STREAMS).replace(
            "reconnect_backoff_max = \"500ms\"",
            "reconnect_backoff_max = \"500ms\"\nmax_packet_bytes = 65536",
        ),
    );
    gw.wait_ready();
    let rss_before = gw.rss_kib();
    let mut good = Publisher::connect(broker.port, "pub-good");
    let mut hostile = Publisher::connect(broker.port, "pub-hostile");
    let mut records = live_noise(&gw).await;
    let oversized = format!(
        "{{\"meter_id\": \"x\", \"pad\": \"{}\"}}",
        "a".repeat(200_000)
    );
    let deep = format!("{}1{}", "{\"a\":".repeat(5_000), "}".repeat(5_000));
    let mut hostile_sent = 0u64;
    for i in 0..GOOD {
        if i % 3 == 0 {
            let payloads: [Vec<u8>; 4] = [
                oversized.clone().into_bytes(),
                b"{\"meter_id\": \"m\", \"laeq_db\": ".to_vec(),
                deep.clone().into_bytes(),
                vec![0xff, 0xfe, b'{', 0x80, b'}'],
            ];
            for payload in payloads {
                hostile.publish("city/air/evil/reading", payload).await;
                hostile_sent += 1;
            }
        }
        good.publish(
            "city/noise/m1",
            serde_json::json!({"meter_id": "m1", "laeq_db": i}).to_string(),
        )
        .await;
    }
    good.wait_acked(GOOD).await;
    hostile.wait_acked(hostile_sent).await;
    let mut seen = Vec::new();
    while (seen.len() as u64) < GOOD {
        let event = tokio::time::timeout(Duration::from_secs(30), records.next())
            .await
            .expect("the good stream keeps flowing")
            .unwrap()
            .unwrap();
        if let Some(Event::Record(r)) = event.event {
            seen.push(hubgate_tests::fields(&r)["laeq_db"].parse::<u64>().unwrap());
        }
    }
    assert_eq!(seen, (0..GOOD).collect::<Vec<_>>(), "no loss, in order");
    // Every hostile message is rejected and counted, none kept.
    let per_kind = hostile_sent / 4;
    hubgate_tests::wait_for("every rejection counted", Duration::from_secs(15), || {
        let page = gw.metrics();
        let m = |name, labels: &[(&str, &str)]| hubgate_tests::metric_value(&page, name, labels);
        m(
            "hubgate_messages_dropped_total",
            &[("stream", "air"), ("reason", "decode")],
        ) + m("hubgate_mqtt_messages_oversized_total", &[])
            == hostile_sent as f64
    });
    assert_eq!(
        gw.metric("hubgate_mqtt_messages_oversized_total", &[]),
        per_kind as f64
    );
    assert_eq!(
        gw.metric("hubgate_records_kept_total", &[("stream", "air")]),
        0.0
    );
    let rss_after = gw.rss_kib();
    assert!(
        rss_after < rss_before + 64 * 1024,
        "memory grew from {rss_before} KiB to {rss_after} KiB"
    );
}

/// The gateway logs in to a broker that wants a user and password, read from a file that only
/// its owner can read; a wrong password keeps it out, and the password is never logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_login_comes_from_a_private_file_and_is_never_logged() {
    let broker =
        Mosquitto::with_users(&[("hubgate", "s3cret-broker-pass"), ("sensor", "sensor-pass")]);
    let dir = tempfile::tempdir().unwrap();
    let login = |password: &str| {
        let file = dir.path().join(format!("password-{}", password.len()));
        std::fs::write(&file, format!("{password}\n")).unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        config(broker.port, "gw-login", STREAMS).replace(
            "reconnect_backoff_max = \"500ms\"",
            &format!(
                "reconnect_backoff_max = \"500ms\"\nusername = \"hubgate\"\npassword_file = {file:?}"
            ),
        )
    };
    let wrong = Gateway::start(gateway_bin!(), &login("not-the-password"));
    hubgate_tests::wait_for("a refused login", Duration::from_secs(10), || {
        wrong.metric("hubgate_mqtt_connection_errors_total", &[]) >= 1.0
    });
    assert_eq!(hubgate_tests::http_get(wrong.admin, "/readyz").0, 503);
    assert!(!wrong.log().contains("not-the-password"));
    drop(wrong);

    let gw = Gateway::start(gateway_bin!(), &login("s3cret-broker-pass"));
    gw.wait_ready();
    let mut records = live_noise(&gw).await;
    let mut options = rumqttc::MqttOptions::new("sensor-1", "127.0.0.1", broker.port);
    options.set_credentials("sensor", "sensor-pass");
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    client
        .publish(
            "city/noise/m1",
            rumqttc::QoS::AtLeastOnce,
            false,
            serde_json::json!({"meter_id": "m1", "laeq_db": 61}).to_string(),
        )
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), records.next())
        .await
        .expect("the reading arrives")
        .unwrap()
        .unwrap();
    assert!(matches!(event.event, Some(Event::Record(_))));
    assert!(!gw.log().contains("s3cret-broker-pass"));
}

/// Calls beyond `grpc.max_subscribers` (subscriptions, footprint watchers) are refused with
/// RESOURCE_EXHAUSTED and counted; a place frees when one leaves. Push calls have places of their
/// own (`grpc.max_push_calls`): full subscriber places do not stop them, nor they subscribers. A
/// subscription over `grpc.max_streams_per_subscription` is refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_are_capped() {
    let broker = Mosquitto::start();
    let gw = Gateway::start(
        gateway_bin!(),
        &config(broker.port, "gw-cap", STREAMS).replace(
            "[grpc]\nlisten = \"127.0.0.1:0\"",
            "[grpc]\nlisten = \"127.0.0.1:0\"\nmax_subscribers = 2\nmax_push_calls = 1\n\
             max_streams_per_subscription = 1\npush_without_tokens = true",
        ),
    );
    let mut client = gw.client().await;
    // Two streams by name, or all (two) of them, is one stream too many.
    for streams in [&["air", "noise"][..], &[]] {
        let refused = client
            .subscribe(subscribe_request(streams, Position::Live(v1::Live {})))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{streams:?}");
    }
    assert_eq!(
        gw.metric("hubgate_grpc_refused_total", &[("reason", "streams")]),
        2.0
    );
    let live = || subscribe_request(&["air"], Position::Live(v1::Live {}));
    let first = client.subscribe(live()).await.unwrap().into_inner();
    let _second = client.subscribe(live()).await.unwrap().into_inner();
    let third = client.subscribe(live()).await.unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted);
    // An origin gateway's push call has a place of its own; a second one does not.
    let (_push_tx, push_rx) = tokio::sync::mpsc::channel::<v1::PushRequest>(1);
    let _push = client
        .push(tokio_stream::wrappers::ReceiverStream::new(push_rx))
        .await
        .unwrap();
    hubgate_tests::wait_for(
        "the push call to hold its place",
        Duration::from_secs(10),
        || gw.metric("hubgate_grpc_push_calls", &[]) == 1.0,
    );
    let second = client
        .push(tokio_stream::iter(Vec::<v1::PushRequest>::new()))
        .await
        .unwrap_err();
    assert_eq!(second.code(), Code::ResourceExhausted);
    // A footprint watcher needs a place too.
    let watcher = client
        .watch_footprint(v1::WatchFootprintRequest {})
        .await
        .unwrap_err();
    assert_eq!(watcher.code(), Code::ResourceExhausted);
    assert_eq!(
        gw.metric("hubgate_grpc_refused_total", &[("reason", "capacity")]),
        3.0
    );
    drop(first);
    hubgate_tests::wait_for("a place to free", Duration::from_secs(10), || {
        gw.metric("hubgate_grpc_subscribers", &[]) == 1.0
    });
    client.subscribe(live()).await.unwrap();
}

/// One token opening every call it can leaves the other tokens their reserved places; each
/// token is held to its own limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_cannot_starve_the_others() {
    let broker = Mosquitto::start();
    let gw = Gateway::start(
        gateway_bin!(),
        &(config(broker.port, "gw-fair", STREAMS).replace(
            "[grpc]\nlisten = \"127.0.0.1:0\"",
            "[grpc]\nlisten = \"127.0.0.1:0\"\nmax_subscribers = 8",
        ) + &token_entry("hog", "hg_hog", "streams = [\"*\"]\nmax_calls = 100")
            + &token_entry("dash", "hg_dash", "streams = [\"air\"]\nfootprint = true")),
    );
    let mut client = gw.client().await;
    let live = |token| {
        with(
            subscribe_request(&["air"], Position::Live(v1::Live {})),
            Some(token),
        )
    };
    let mut hogged = Vec::new();
    let refused = loop {
        match client.subscribe(live("hg_hog")).await {
            Ok(call) => hogged.push(call.into_inner()),
            Err(status) => break status,
        }
        assert!(hogged.len() <= 8, "more calls than places");
    };
    assert_eq!(refused.code(), Code::ResourceExhausted);
    // 8 places, 2 of them reserved for the other token (8 / (2 × 2 tokens)).
    assert_eq!(hogged.len(), 6);
    let _dash = client.subscribe(live("hg_dash")).await.unwrap();
    let _watch = client
        .watch_footprint(with(v1::WatchFootprintRequest {}, Some("hg_dash")))
        .await
        .unwrap();
    // dash is at its own limit (a quarter of the places), and the hub is full.
    let over = client.subscribe(live("hg_dash")).await.unwrap_err();
    assert_eq!(over.code(), Code::ResourceExhausted);
    assert!(
        over.message().contains("holds its 2 open calls"),
        "{over:?}"
    );
    assert_eq!(
        gw.metric("hubgate_grpc_refused_total", &[("reason", "token")]),
        1.0
    );
    assert_eq!(
        gw.metric("hubgate_grpc_refused_total", &[("reason", "capacity")]),
        1.0
    );
}

/// Connections that send nothing, half an HTTP request, or only the HTTP/2 preface are closed
/// by the gateway instead of being held forever; a working client on the same listeners is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_open_connections_are_closed() {
    use std::io::{Read as _, Write as _};
    let broker = Mosquitto::start();
    let gw = Gateway::start(gateway_bin!(), &config(broker.port, "gw-idle", STREAMS));
    let cases: [(&str, std::net::SocketAddr, &[u8]); 4] = [
        (
            "admin, half a request",
            gw.admin,
            b"GET /metrics HTTP/1.1\r\nHost: hub\r\n",
        ),
        ("admin, nothing", gw.admin, b""),
        ("gRPC, nothing", gw.grpc, b""),
        (
            "gRPC, only the preface",
            gw.grpc,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ),
    ];
    let waits: Vec<_> = cases
        .into_iter()
        .map(|(what, addr, sent)| {
            std::thread::spawn(move || {
                let mut stream = std::net::TcpStream::connect(addr).unwrap();
                stream.write_all(sent).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(90)))
                    .unwrap();
                let started = std::time::Instant::now();
                let mut buf = [0u8; 4096];
                // The server may say something first (HTTP/2 settings); then it must close.
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                        Err(e) => panic!("{what}: still open after {:?} ({e})", started.elapsed()),
                    }
                }
                (what, started.elapsed())
            })
        })
        .collect();
    // Meanwhile the listeners serve others.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, _) = hubgate_tests::http_get(gw.admin, "/healthz");
    assert_eq!(status, 200);
    let mut stream = live_noise(&gw).await;
    let _ = tokio::time::timeout(Duration::from_millis(100), stream.next()).await;
    for wait in waits {
        let (what, elapsed) = wait.join().unwrap();
        assert!(
            elapsed <= Duration::from_secs(60),
            "{what}: closed after {elapsed:?}"
        );
        eprintln!("{what}: closed after {elapsed:?}");
    }
    // The subscriber that has been quiet as long is still served: it answers the pings.
    let publisher = Publisher::connect(broker.port, "pub-idle");
    publisher
        .publish("city/noise/m1", r#"{"meter_id": "m1", "laeq_db": 61}"#)
        .await;
    let next = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
    assert!(
        matches!(next, Ok(Some(Ok(_)))),
        "the quiet subscriber was cut: {next:?}"
    );
}

/// A flood of the largest payloads the gateway takes, at QoS 0 (which the broker does not hold
/// back for acknowledgements), beside a good stream: memory stays bounded by the byte budget of
/// the queue (`mqtt.queue_bytes`), not by its count of messages, and the good stream loses
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_the_largest_payloads_keeps_memory_bounded() {
    const FLOOD: usize = 400;
    const GOOD: usize = 40;
    let broker = Mosquitto::start();
    let text = config(broker.port, "gw-bytes", STREAMS).replace(
        "[mqtt]\n",
        "[mqtt]\nmax_packet_bytes = 262144\nbroker_max_packet_bytes = 1048576\n",
    );
    let gw = Gateway::start(gateway_bin!(), &text);
    gw.wait_ready();
    let before = gw.rss_kib();
    let pad = "x".repeat(262_144 - 64);
    let flood = Publisher::connect_sized(broker.port, "pub-flood-bytes", 1 << 20);
    let flooding = tokio::spawn(async move {
        for n in 0..FLOOD {
            // A kept field: scanned for identifiers and stored, the slowest path.
            let payload = format!("{{\"station_id\": \"{pad}\", \"pm25\": {n}}}");
            flood
                .client
                .publish(
                    "city/air/s9/reading",
                    rumqttc::QoS::AtMostOnce,
                    false,
                    payload,
                )
                .await
                .unwrap();
        }
        flood
    });
    let mut good = Publisher::connect(broker.port, "pub-good-bytes");
    for n in 0..GOOD {
        good.publish(
            "city/noise/m1",
            format!("{{\"meter_id\": \"m1\", \"laeq_db\": {n}}}"),
        )
        .await;
    }
    good.wait_acked(GOOD as u64).await;
    let _flood = flooding.await.unwrap();
    let mut stream = gw
        .client()
        .await
        .subscribe(subscribe_request(
            &["noise"],
            Position::Oldest(v1::Oldest {}),
        ))
        .await
        .unwrap()
        .into_inner();
    // The good readings come after the flood: wait as long as the gateway takes messages in,
    // and fail if it stops for 30 s (a debug build on a busy machine takes a few per second of
    // these 256 KiB readings, each scanned whole for identifiers).
    let mut kept = 0;
    let mut progress = (0.0, std::time::Instant::now());
    while kept < GOOD {
        match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
            Ok(Some(Ok(message))) => {
                if let Some(Event::Record(_)) = message.event {
                    kept += 1;
                }
            }
            Ok(other) => panic!("the stream ended after {kept} of {GOOD} good readings: {other:?}"),
            Err(_) => {
                let received = gw.metric("hubgate_mqtt_messages_received_total", &[]);
                if received > progress.0 {
                    progress = (received, std::time::Instant::now());
                }
                assert!(
                    progress.1.elapsed() < Duration::from_secs(30),
                    "{kept} of {GOOD} good readings kept, and no message taken in for 30 s ({received} in all)"
                );
            }
        }
    }
    hubgate_tests::wait_for("the flood to be taken in", Duration::from_secs(60), || {
        gw.metric("hubgate_mqtt_messages_received_total", &[]) >= FLOOD as f64 * 0.5
    });
    let peak = gw.peak_rss_kib();
    eprintln!(
        "flood of {FLOOD} × 256 KiB at QoS 0: resident memory {before} KiB before, peak {peak} KiB"
    );
    assert!(peak <= 64 * 1024, "peak resident memory {peak} KiB");
}

/// With `mqtt.rate_limit`, a device flooding its topic is held to its rate, the excess counted,
/// while another device's readings all pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_over_its_rate_limit_is_held_back_and_others_pass() {
    let broker = Mosquitto::start();
    let gw = Gateway::start(
        gateway_bin!(),
        &config(broker.port, "gw-rate", STREAMS).replace(
            "reconnect_backoff_max = \"500ms\"",
            "reconnect_backoff_max = \"500ms\"\nrate_limit = { per_second = 2.0, burst = 10.0 }",
        ),
    );
    gw.wait_ready();
    let mut publisher = Publisher::connect(broker.port, "pub-rate");
    for i in 0..200 {
        publisher
            .publish(
                "city/noise/loud",
                serde_json::json!({"meter_id": "loud", "laeq_db": i}).to_string(),
            )
            .await;
        if i % 20 == 0 {
            publisher
                .publish(
                    "city/noise/quiet",
                    serde_json::json!({"meter_id": "quiet", "laeq_db": i}).to_string(),
                )
                .await;
        }
    }
    publisher.wait_acked(210).await;
    hubgate_tests::wait_for(
        "every message accounted for",
        Duration::from_secs(15),
        || gw.metric("hubgate_mqtt_messages_received_total", &[]) == 210.0,
    );
    let kept = gw.metric("hubgate_records_kept_total", &[("stream", "noise")]);
    let limited = gw.metric(
        "hubgate_mqtt_messages_rate_limited_total",
        &[("by", "topic")],
    );
    assert_eq!(kept + limited, 210.0);
    // The quiet meter's 10 readings all pass; the loud one gets its burst and a few seconds' rate.
    assert!(
        (20.0..=60.0).contains(&kept),
        "kept {kept}, rate-limited {limited}"
    );
    let mut records = gw
        .client()
        .await
        .subscribe(subscribe_request(
            &["noise"],
            Position::Oldest(v1::Oldest {}),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut quiet = 0;
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(2), records.next()).await {
        if let Some(Event::Record(r)) = event.unwrap().event
            && hubgate_tests::fields(&r)["meter_id"] == "quiet"
        {
            quiet += 1;
        }
    }
    assert_eq!(quiet, 10);
}

/// With `mqtt.device_rate_limit`, a device flooding a topic it shares with others is held to its
/// rate by the id in its payload, while the other device on the same topic passes in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_over_its_rate_limit_is_held_back_on_a_shared_topic() {
    let broker = Mosquitto::start();
    let gw = Gateway::start(
        gateway_bin!(),
        &config(broker.port, "gw-device-rate", STREAMS).replace(
            "reconnect_backoff_max = \"500ms\"",
            "reconnect_backoff_max = \"500ms\"\n\
             device_rate_limit = { field = \"meter_id\", per_second = 0.001, burst = 10.0 }",
        ),
    );
    gw.wait_ready();
    let mut publisher = Publisher::connect(broker.port, "pub-device-rate");
    for i in 0..100 {
        let meter = if i % 10 == 0 { "quiet" } else { "loud" };
        publisher
            .publish(
                "city/noise/street",
                serde_json::json!({"meter_id": meter, "laeq_db": i}).to_string(),
            )
            .await;
    }
    publisher.wait_acked(100).await;
    hubgate_tests::wait_for(
        "every message accounted for",
        Duration::from_secs(15),
        || gw.metric("hubgate_mqtt_messages_received_total", &[]) == 100.0,
    );
    // The loud meter gets its burst of 10 (its rate is one a quarter-hour); the quiet one all 10.
    assert_eq!(
        gw.metric(
            "hubgate_mqtt_messages_rate_limited_total",
            &[("by", "device")]
        ),
        80.0
    );
    assert_eq!(
        gw.metric(
            "hubgate_mqtt_messages_rate_limited_total",
            &[("by", "topic")]
        ),
        0.0
    );
    assert_eq!(
        gw.metric("hubgate_records_kept_total", &[("stream", "noise")]),
        20.0
    );
    // The device ids are not in any label.
    assert!(!gw.metrics().contains("loud"));
}

/// The test certificates (`tests/fixtures/tls/`), copied where the keys can be made private (git
/// does not keep file modes).
fn tls_files() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("test files");
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tls");
    for entry in std::fs::read_dir(fixtures).expect("test files") {
        let path = entry.expect("test files").path();
        let to = dir.path().join(path.file_name().expect("test files"));
        std::fs::copy(&path, &to).expect("test files");
        let mode = if to.extension().is_some_and(|e| e == "key") {
            0o600
        } else {
            0o644
        };
        std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .expect("test files");
    }
    dir
}

/// A TLS client of `addr` that trusts `ca` and presents `identity` (certificate and key names).
async fn tls_client(
    addr: std::net::SocketAddr,
    files: &std::path::Path,
    ca: &str,
    identity: Option<&str>,
) -> Result<v1::gateway_client::GatewayClient<tonic::transport::Channel>, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let read = |name: String| std::fs::read(files.join(name)).expect("test files");
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(format!("{ca}.crt"))))
        .domain_name("localhost");
    if let Some(name) = identity {
        tls = tls.identity(Identity::from_pem(
            read(format!("{name}.crt")),
            read(format!("{name}.key")),
        ));
    }
    let channel = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
        .expect("test files")
        .tls_config(tls)
        .expect("test files")
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(v1::gateway_client::GatewayClient::new(channel))
}

/// With `[grpc.tls]` and a client CA, only clients with a certificate from that CA get in;
/// plain-text clients, clients without a certificate or with one from another CA do not, and a
/// client that does not trust the server's CA refuses the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_lets_in_only_clients_with_a_certificate_from_the_client_ca() {
    let files = tls_files();
    let f = |name: &str| files.path().join(name);
    let broker = Mosquitto::start();
    let text = format!(
        "{}\n[grpc.tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n",
        config(broker.port, "gw-tls", STREAMS),
        f("server.crt"),
        f("server.key"),
        f("ca.crt"),
    );
    let gw = Gateway::start(gateway_bin!(), &text);
    let list = |mut client: v1::gateway_client::GatewayClient<_>| async move {
        client
            .list_streams(v1::ListStreamsRequest {})
            .await
            .map(|r| r.into_inner().streams.len())
    };

    let with_cert = tls_client(gw.grpc, files.path(), "ca", Some("client"))
        .await
        .expect("a client with a certificate from the client CA connects");
    assert_eq!(list(with_cert).await.unwrap(), 2);
    // Without a certificate, or with another CA's: the handshake or the first call fails.
    for identity in [None, Some("rogue-client")] {
        if let Ok(client) = tls_client(gw.grpc, files.path(), "ca", identity).await {
            assert!(list(client).await.is_err(), "{identity:?} got in");
        }
    }
    // A client that trusts another CA does not accept the server.
    assert!(
        tls_client(gw.grpc, files.path(), "rogue-ca", Some("client"))
            .await
            .is_err()
    );
    // Plain text to a TLS port gets nothing.
    if let Ok(plain) =
        v1::gateway_client::GatewayClient::connect(format!("http://{}", gw.grpc)).await
    {
        assert!(list(plain).await.is_err());
    }
    drop(gw);

    // A server key readable by others stops the start.
    std::fs::set_permissions(
        f("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    let path = files.path().join("hubgate.toml");
    std::fs::write(&path, text.replace("gw-tls", "gw-tls-2")).unwrap();
    let out = std::process::Command::new(gateway_bin!())
        .args(["run", "--config"])
        .arg(&path)
        .current_dir(files.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("server.key is readable by others (mode 640)")
    );
}

/// A gateway forwards to a hub over TLS, checking the hub's certificate against its CA and
/// presenting its own (mTLS at the hub), with a token on top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_push_runs_over_mutual_tls() {
    let files = tls_files();
    let f = |name: &str| files.path().join(name);
    let broker = Mosquitto::start();
    let hub_port = hubgate_tests::free_port();
    let hub = Gateway::start(
        gateway_bin!(),
        &format!(
            "{}\n[grpc.tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n{}",
            config(broker.port, "gw-tls-hub", STREAMS)
                .replace("city/noise/+", "hub/noise/+")
                .replacen("127.0.0.1:0", &format!("127.0.0.1:{hub_port}"), 1),
            f("server.crt"),
            f("server.key"),
            f("ca.crt"),
            token_entry(
                "district-1",
                "hg_push_token",
                "streams = [\"*\"]\npush = true\norigins = [\"district-1\"]",
            ),
        ),
    );
    std::fs::write(f("push.token"), "hg_push_token\n").unwrap();
    std::fs::set_permissions(
        f("push.token"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let origin = Gateway::start(
        gateway_bin!(),
        &format!(
            "[upstream]\nendpoint = \"https://localhost:{hub_port}\"\norigin = \"district-1\"\n\
             streams = [\"noise\"]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\ntoken_file = {:?}\n\
             reconnect_backoff_max = \"300ms\"\n{}",
            f("ca.crt"),
            f("client.crt"),
            f("client.key"),
            f("push.token"),
            config(broker.port, "gw-tls-origin", STREAMS)
        ),
    );
    origin.wait_ready();
    let publisher = Publisher::connect(broker.port, "pub-tls");
    for i in 0..20 {
        publisher
            .publish(
                "city/noise/m1",
                serde_json::json!({"meter_id": "m1", "laeq_db": i}).to_string(),
            )
            .await;
    }
    hubgate_tests::wait_for("20 records at the hub", Duration::from_secs(20), || {
        hub.metric(
            "hubgate_push_records_total",
            &[("stream", "noise"), ("outcome", "kept")],
        ) == 20.0
    });
    // The push token is for district-1 only: pushing as another origin is refused.
    let mut direct = tls_client(hub.grpc, files.path(), "ca", Some("client"))
        .await
        .unwrap();
    let spoofed = direct
        .push(with(
            tokio_stream::iter(vec![v1::PushRequest {
                origin: "district-2".into(),
                stream: "noise".into(),
                records: Vec::new(),
                incarnation: "abc".into(),
                policies: Vec::new(),
            }]),
            Some("hg_push_token"),
        ))
        .await;
    let refused = match spoofed {
        Err(status) => status.code(),
        Ok(response) => {
            let mut acks = response.into_inner();
            acks.next().await.unwrap().unwrap_err().code()
        }
    };
    assert_eq!(refused, Code::PermissionDenied);
    hubgate_tests::wait_for(
        "the hub's acknowledgements",
        Duration::from_secs(10),
        || {
            origin.metric(
                "hubgate_upstream_records_acked_total",
                &[("stream", "noise")],
            ) == 20.0
        },
    );
}

/// The gateway reaches a broker that speaks only TLS and wants a client certificate, checking
/// the broker's certificate against its CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_connection_runs_over_mutual_tls() {
    let files = tls_files();
    let f = |name: &str| files.path().join(name);
    let broker = Mosquitto::with_tls(files.path());
    let tls_port = broker.tls_port.expect("a TLS listener");
    let with_tls = |identity: &str| {
        config(tls_port, "gw-mqtts", STREAMS).replace(
            "reconnect_backoff_max = \"500ms\"",
            &format!(
                "reconnect_backoff_max = \"500ms\"\n\n[mqtt.tls]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
                f("ca.crt"),
                f(&format!("{identity}.crt")),
                f(&format!("{identity}.key")),
            ),
        )
    };
    // A certificate from another CA: the broker refuses it.
    let rogue = Gateway::start(gateway_bin!(), &with_tls("rogue-client"));
    hubgate_tests::wait_for("a refused handshake", Duration::from_secs(10), || {
        rogue.metric("hubgate_mqtt_connection_errors_total", &[]) >= 1.0
    });
    assert_eq!(hubgate_tests::http_get(rogue.admin, "/readyz").0, 503);
    drop(rogue);

    let gw = Gateway::start(gateway_bin!(), &with_tls("client"));
    gw.wait_ready();
    let mut records = live_noise(&gw).await;
    // A sensor publishes on the broker's plain listener; the gateway reads over TLS.
    let publisher = Publisher::connect(broker.port, "pub-mqtts");
    publisher
        .publish(
            "city/noise/m1",
            serde_json::json!({"meter_id": "m1", "laeq_db": 58}).to_string(),
        )
        .await;
    let event = tokio::time::timeout(Duration::from_secs(10), records.next())
        .await
        .expect("the reading arrives over TLS")
        .unwrap()
        .unwrap();
    assert!(matches!(event.event, Some(Event::Record(_))));
}
