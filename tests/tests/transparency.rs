//! The transparency register of a running gateway: the same policy, by its hash, in the JSON
//! register, the HTML notice (checked in a real headless Chromium), the Art. 30 record, `hubgate
//! explain` and gRPC `GetPolicy`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hubgate_proto::v1;
use hubgate_tests::{Gateway, Mosquitto, config, gateway_bin, http_get};
use sha2::Digest as _;

const SITE: &str = r#"
[register]
controller = "Example City, Urban Services"
contact = "privacy@example.city"
location = "Market Square & Station Road"
"#;

const AIR: &str = r#"
[[stream]]
name = "air"
topics = ["city/air/+/reading"]
purpose = "Air quality maps"
legal_basis = "public task"
principles = ["sustainability_resilience"]
technology = "tech__air_quality"
retention = "30d"
time_field = "ts"

[stream.fields]
station_id = "keep"
pm25 = "keep"
"#;

fn footfall() -> String {
    hubgate_tests::footfall_aggregated("", "15m", "1m", 10, "devices = \"contributors\"\n")
        .replace(
            "principles = [\"community_participation\"]",
            "principles = [\"community_participation\"]\ntechnology = \"tech__identifiable_wifi_sensor\"",
        )
}

/// Debian's Chromium, which `cargo xtask test` installs.
fn chromium() -> PathBuf {
    for candidate in ["chromium", "chromium-browser"] {
        if let Ok(out) = Command::new("which").arg(candidate).output()
            && out.status.success()
        {
            return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        }
    }
    panic!(
        "this test needs a headless Chromium: apt-get install chromium (`cargo xtask test` does)"
    );
}

/// Runs headless Chromium on `url` with `args` (its own profile in `profile`), within a minute.
fn headless(profile: &Path, args: &[&str], url: &str) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_register_html_json_art30_explain_and_get_policy_all_describe_the_running_policy() {
    let broker = Mosquitto::start();
    let gw = Gateway::start(
        gateway_bin!(),
        &config(
            broker.port,
            "gw-register",
            &format!("{SITE}{AIR}{}", footfall()),
        ),
    );
    let mut client = gw.client().await;
    let streams = client
        .list_streams(v1::ListStreamsRequest {})
        .await
        .unwrap()
        .into_inner()
        .streams;
    let hash = streams[0].policy_hash.clone();
    assert_eq!(hash.len(), 64);

    // JSON: the register of the running policy.
    let (status, json_text) = http_get(gw.admin, "/transparency.json");
    assert_eq!(status, 200);
    let register: serde_json::Value = serde_json::from_str(&json_text).unwrap();
    assert_eq!(register["policy_hash"], hash.as_str());
    assert_eq!(
        register["accountable"]["controller"],
        "Example City, Urban Services"
    );
    let footfall = &register["streams"][1];
    assert_eq!(footfall["name"], "footfall");
    assert_eq!(footfall["personal_data"], true);

    // NGSI-LD: one Smart Data Models PrivacyObject per stream, valid against the model's schema.
    let (status, ngsi_ld) = http_get(gw.admin, "/transparency.ngsi-ld.json");
    assert_eq!(status, 200);
    let entities: Vec<serde_json::Value> = serde_json::from_str(&ngsi_ld).unwrap();
    let validator = privacy_object_validator();
    assert_eq!(
        entities.len(),
        register["streams"].as_array().unwrap().len()
    );
    assert!(entities.iter().all(|e| validator.is_valid(e)), "{ngsi_ld}");
    assert_eq!(entities[1]["name"], "footfall");
    assert_eq!(entities[1]["isPersonalData"], true);
    assert_eq!(entities[1]["dataProvider"], "Example City, Urban Services");
    assert!(
        entities[1]["description"]
            .as_str()
            .is_some_and(|d| d.contains(&hash)),
        "{ngsi_ld}"
    );
    assert_eq!(
        footfall["technology"]["dtpr"],
        "tech__identifiable_wifi_sensor"
    );
    let processes: Vec<&str> = footfall["processing"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["dtpr"].as_str())
        .collect();
    assert_eq!(
        processes,
        [
            "process__de_identified",
            "process__aggregated",
            "process__k_anonymity"
        ]
    );
    assert_eq!(footfall["retention_seconds"], 86_400);
    assert_eq!(
        register["streams"][0]["sensor_register"]["personal_data"],
        false
    );

    // GetPolicy: byte for byte the same register, and the policy whose SHA-256 is the hash.
    let policy = client
        .get_policy(v1::GetPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(policy.policy_hash, hash);
    assert_eq!(policy.register_json, json_text);
    let digest = sha2::Sha256::digest(policy.policy_json.as_bytes());
    let digest: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(digest, hash, "policy_json must be what the hash names");

    // The Art. 30 record and `hubgate explain` over the same file.
    let (status, record) = http_get(gw.admin, "/processing-record");
    assert_eq!(status, 200);
    assert!(record.contains(&hash) && record.contains("## Processing activity: footfall"));
    let explain = |format: &str| {
        let out = Command::new(gateway_bin!())
            .args(["explain", "--format", format, "--config"])
            .arg(gw.config_path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let text = explain("text");
    assert!(text.contains(&format!("policy {hash}")), "{text}");
    assert!(text.contains("k-anonymity [process__k_anonymity]: A group is published only when at least 10 distinct mac"));
    let mut explained: serde_json::Value = serde_json::from_str(&explain("json")).unwrap();
    let mut served = register.clone();
    explained["loaded_at"] = serde_json::Value::Null;
    served["loaded_at"] = serde_json::Value::Null;
    assert_eq!(
        explained, served,
        "explain and the running gateway disagree"
    );

    // The HTML notice, as a real browser renders it.
    let (status, page) = http_get(gw.admin, "/transparency");
    assert_eq!(status, 200);
    assert!(page.contains(&hash));
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{}/transparency", gw.admin);
    let dom = headless(profile.path(), &["--dump-dom"], &url);
    assert!(dom.contains("<html lang=\"en\">"), "{dom}");
    assert!(dom.contains("Sensors and data at Market Square &amp; Station Road"));
    assert!(dom.contains(&format!("<meta name=\"policy-hash\" content=\"{hash}\">")));
    assert!(dom.contains("id=\"stream-air\"") && dom.contains("id=\"stream-footfall\""));
    assert!(dom.contains("Air quality sensor") && dom.contains("Wi-Fi sensor"));
    assert!(dom.contains("aria-label=\"QR code linking to this notice\"") && dom.contains("<svg"));
    // The QR code and the caption point at the page itself (no public_url is configured).
    assert!(dom.contains(&format!("href=\"{url}\"")), "{dom}");

    // A phone-sized screenshot, and the page printed as a sign.
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let screenshot = shots.join("transparency-phone.png");
    let _ = std::fs::remove_file(&screenshot);
    headless(
        profile.path(),
        &[
            &format!("--screenshot={}", screenshot.display()),
            "--window-size=412,2000",
        ],
        &url,
    );
    let png = std::fs::read(&screenshot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    let sign = shots.join("transparency-sign.pdf");
    let _ = std::fs::remove_file(&sign);
    headless(
        profile.path(),
        &[
            &format!("--print-to-pdf={}", sign.display()),
            "--no-pdf-header-footer",
        ],
        &url,
    );
    let pdf = std::fs::read(&sign).expect("a printed sign");
    assert!(pdf.starts_with(b"%PDF"));
    // Printed, the notice is a sign: the key facts and the QR code, on one page (the details,
    // several screens long, are left out).
    assert!(
        String::from_utf8_lossy(&pdf).contains("/Count 1"),
        "the printed sign is not one page"
    );
}

/// The policy hash the register at `/transparency.json` names, if the admin port answers.
fn served_hash(gw: &Gateway) -> Option<String> {
    let (status, body) = http_get(gw.admin, "/transparency.json");
    (status == 200)
        .then(|| serde_json::from_str::<serde_json::Value>(&body).ok())
        .flatten()
        .and_then(|v| v["policy_hash"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_valid_policy_and_keeps_the_running_one_when_the_new_one_has_errors() {
    use hubgate_proto::v1::start_position::Position;
    use hubgate_tests::Publisher;
    use tokio_stream::StreamExt as _;

    let broker = Mosquitto::start();
    let before = config(broker.port, "gw-reload", &format!("{SITE}{AIR}"));
    let gw = Gateway::start(gateway_bin!(), &before);
    gw.wait_ready();
    let hash_a = served_hash(&gw).expect("the register");
    let publisher = Publisher::connect(broker.port, "pub-reload");
    let reading = |i: u32| {
        serde_json::json!({"station_id": format!("aq-{i}"), "ts": 1_700_000_000 + i, "pm25": 9.5, "pm10": 20.0})
            .to_string()
    };
    for i in 0..20 {
        publisher.publish("city/air/aq/reading", reading(i)).await;
    }
    hubgate_tests::wait_for("20 records", Duration::from_secs(15), || {
        gw.metric("hubgate_records_kept_total", &[("stream", "air")]) == 20.0
    });

    // A valid new policy: pm10 is now kept. Readings keep coming during the reload.
    let after = before.replace("pm25 = \"keep\"", "pm25 = \"keep\"\npm10 = \"keep\"");
    std::fs::write(gw.config_path(), &after).unwrap();
    gw.hangup();
    for i in 20..40 {
        publisher.publish("city/air/aq/reading", reading(i)).await;
    }
    hubgate_tests::wait_for("the new policy", Duration::from_secs(20), || {
        served_hash(&gw).is_some_and(|h| h != hash_a)
    });
    let hash_b = served_hash(&gw).unwrap();
    for i in 40..60 {
        publisher.publish("city/air/aq/reading", reading(i)).await;
    }
    let mut client = gw.client().await;
    let policy = client
        .get_policy(v1::GetPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(policy.policy_hash, hash_b);
    let (_, page) = http_get(gw.admin, "/transparency");
    assert!(page.contains(&hash_b) && !page.contains(&hash_a));
    let out = Command::new(gateway_bin!())
        .args(["explain", "--config"])
        .arg(gw.config_path())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("policy {hash_b}")));

    // Nothing was lost across the reload: sequences 1..60, the old policy's records before the
    // new one's, and only the new ones carry pm10.
    let mut records = client
        .subscribe(hubgate_tests::subscribe_request(
            &["air"],
            Position::Oldest(v1::Oldest {}),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < 60 {
        let event = tokio::time::timeout(Duration::from_secs(20), records.next())
            .await
            .expect("60 records")
            .unwrap()
            .unwrap();
        if let Some(v1::subscribe_response::Event::Record(r)) = event.event {
            seen.push(r);
        }
    }
    let sequences: Vec<u64> = seen.iter().map(|r| r.sequence).collect();
    assert_eq!(sequences, (1..=60).collect::<Vec<u64>>());
    let switch = seen
        .iter()
        .position(|r| r.policy_hash == hash_b)
        .expect("records under the new policy");
    assert!(
        switch >= 20,
        "records kept before the reload keep their policy"
    );
    assert!(
        seen[..switch]
            .iter()
            .all(|r| r.policy_hash == hash_a && !r.fields.contains_key("pm10"))
    );
    assert!(
        seen[switch..]
            .iter()
            .all(|r| r.policy_hash == hash_b && r.fields.contains_key("pm10"))
    );
    assert_eq!(
        gw.metric("hubgate_policy_info", &[("policy_hash", &hash_a)]),
        0.0
    );
    assert_eq!(
        gw.metric("hubgate_policy_info", &[("policy_hash", &hash_b)]),
        1.0
    );

    // A policy with an error is rejected: the running one stays, and the rejection is audited.
    std::fs::write(
        gw.config_path(),
        after.replace(
            "retention = \"30d\"",
            "retention = \"30d\"\nretension = \"1d\"",
        ),
    )
    .unwrap();
    gw.hangup();
    hubgate_tests::wait_for("the rejection", Duration::from_secs(10), || {
        gw.audit_events()
            .iter()
            .any(|e| e["event"] == "policy_rejected")
    });
    assert_eq!(served_hash(&gw).as_deref(), Some(hash_b.as_str()));
    let events = gw.audit_events();
    let reloaded = events
        .iter()
        .find(|e| e["event"] == "policy_reloaded")
        .expect("the reload is audited");
    assert_eq!(reloaded["data"]["policy_hash"], hash_b.as_str());
    assert_eq!(reloaded["data"]["previous_policy_hash"], hash_a.as_str());
    let rejected = events
        .iter()
        .find(|e| e["event"] == "policy_rejected")
        .unwrap();
    assert_eq!(rejected["data"]["running_policy_hash"], hash_b.as_str());
    let first = rejected["data"]["first_error"].as_str().unwrap();
    assert!(first.contains("unknown field 'retension'"), "{first}");
    assert!(first.contains("hubgate.toml:"), "line and column: {first}");
    // A valid configuration whose files cannot be used (a TLS key others can read) is rejected
    // too, before it replaces the running one.
    let key = gw.dir().join("server.key");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tls/server.key"),
        &key,
    )
    .unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(
        gw.config_path(),
        format!(
            "{after}\n[grpc.tls]\ncert_file = {:?}\nkey_file = {key:?}\n",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tls/server.crt"),
        ),
    )
    .unwrap();
    gw.hangup();
    hubgate_tests::wait_for("the second rejection", Duration::from_secs(10), || {
        gw.audit_events()
            .iter()
            .filter(|e| e["event"] == "policy_rejected")
            .count()
            == 2
    });
    let second = gw
        .audit_events()
        .into_iter()
        .filter(|e| e["event"] == "policy_rejected")
        .nth(1)
        .unwrap();
    let first = second["data"]["first_error"].as_str().unwrap();
    assert!(
        first.contains("server.key is readable by others"),
        "{first}"
    );
    assert_eq!(served_hash(&gw).as_deref(), Some(hash_b.as_str()));
    publisher.publish("city/air/aq/reading", reading(60)).await;
    hubgate_tests::wait_for(
        "the running policy still works",
        Duration::from_secs(10),
        || gw.metric("hubgate_records_kept_total", &[("stream", "air")]) >= 61.0,
    );
    // The chain is intact across the restarts of the gateway inside the process.
    let out = Command::new(gateway_bin!())
        .args(["audit", "verify"])
        .arg(gw.dir().join("hubgate-data/audit.jsonl"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The Smart Data Models `PrivacyObject` schema, with the schemas it refers to, from
/// `tests/data/smart-data-models` (their sources are in `SOURCES.md` there), so that validation
/// needs no network.
fn privacy_object_validator() -> jsonschema::Validator {
    let dir = hubgate_tests::repo().join("tests/data/smart-data-models");
    let read = |path: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(dir.join(path)).expect("a vendored schema");
        serde_json::from_str(&text).expect("JSON")
    };
    let mut schema = read("smart-data-models.github.io/dataModel.Device/PrivacyObject/schema.json");
    // The published schema's `category` refers to `Device-Commons/properties/category`, which
    // device-schema.json does not have (SOURCES.md). The model's specification gives `category` as
    // a list of strings; hubgate's notices do not carry it.
    let category = schema
        .pointer_mut("/allOf/2/properties/category")
        .expect("the schema's category");
    assert!(
        category["$ref"]
            .as_str()
            .is_some_and(|r| r.ends_with("/properties/category"))
    );
    *category = serde_json::json!({"type": "array", "items": {"type": "string"}});
    let common = "https://smart-data-models.github.io/data-models/common-schema.json";
    jsonschema::options()
        .should_validate_formats(true)
        .with_resource(
            common,
            jsonschema::Resource::from_contents(read(
                "smart-data-models.github.io/data-models/common-schema.json",
            )),
        )
        .build(&schema)
        .expect("the PrivacyObject schema compiles")
}

/// `hubgate explain --format ngsi-ld` gives one `PrivacyObject` per stream, valid against the
/// model's published schema, saying what the register says; a running gateway serves the same at
/// `/transparency.ngsi-ld.json`. The validator itself refuses an entity of another type.
#[test]
fn the_privacy_notice_is_a_valid_smart_data_models_privacy_object_per_stream() {
    let validator = privacy_object_validator();
    let example = std::fs::read_to_string(hubgate_tests::repo().join(
        "tests/data/smart-data-models/smart-data-models.github.io/dataModel.Device/PrivacyObject/examples/example.json",
    ))
    .expect("the model's example");
    let mut example: serde_json::Value = serde_json::from_str(&example).expect("JSON");
    assert!(validator.is_valid(&example), "the model's own example");
    example["type"] = "Device".into();
    assert!(!validator.is_valid(&example), "another type is refused");

    let config = hubgate_tests::repo().join("deploy/hubgate.toml");
    let out = Command::new(gateway_bin!())
        .args(["explain", "--format", "ngsi-ld", "--config"])
        .arg(&config)
        .output()
        .expect("explain runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entities: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("a JSON array");
    let register: serde_json::Value = serde_json::from_slice(
        &Command::new(gateway_bin!())
            .args(["explain", "--format", "json", "--config"])
            .arg(&config)
            .output()
            .expect("explain runs")
            .stdout,
    )
    .expect("the register's JSON");
    let streams = register["streams"].as_array().expect("streams");
    assert_eq!(entities.len(), streams.len());
    for (entity, stream) in entities.iter().zip(streams) {
        let errors: Vec<String> = validator
            .iter_errors(entity)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{entity}: {errors:?}");
        assert_eq!(entity["name"], stream["name"]);
        assert_eq!(entity["purpose"], stream["purpose"]);
        assert_eq!(entity["legitimateInterest"], stream["legal_basis"]);
        assert_eq!(entity["isPersonalData"], stream["personal_data"]);
        assert_eq!(entity["recipientList"], stream["recipients"]);
        assert_eq!(
            entity["dataProvider"],
            register["accountable"]["controller"]
        );
    }
    // The Wi-Fi counter's stream, which processes personal data.
    let wifi = entities
        .iter()
        .find(|e| e["isPersonalData"] == true)
        .expect("a stream of personal data");
    assert!(
        wifi["retentionPeriod"]
            .as_str()
            .is_some_and(|p| p.starts_with('P'))
    );
}
