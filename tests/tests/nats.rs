//! The NATS JetStream exporter against a real `nats-server -js`: at-least-once publishing from the
//! outbox through the server's outage and restart and a SIGKILL of the gateway, with JetStream's
//! de-duplication ids making every record stored exactly once.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use hubgate_proto::v1;
use hubgate_tests::{
    Gateway, Mosquitto, NatsServer, Publisher, config, gateway_bin, sequence_stream, wait_for,
};
use prost::Message as _;
use tokio_stream::StreamExt as _;

/// How many messages the JetStream stream `HUBGATE` holds: records, and each gateway's privacy
/// notice.
async fn stream_messages(url: &str) -> u64 {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    match js.get_stream("HUBGATE").await {
        Ok(stream) => stream.get_info().await.expect("stream info").state.messages,
        Err(_) => 0,
    }
}

/// The latest message on `subject` in the JetStream stream `HUBGATE`, as JSON.
async fn latest_json(url: &str, subject: &str) -> serde_json::Value {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    let message = js
        .get_stream("HUBGATE")
        .await
        .expect("the stream")
        .get_last_raw_message_by_subject(subject)
        .await
        .unwrap_or_else(|e| panic!("no message on {subject}: {e}"));
    serde_json::from_slice(&message.payload).expect("JSON")
}

/// Every record in the JetStream stream `HUBGATE` (subject `city.district1.seq`): per published
/// number, how many times it is stored; and the de-duplication ids.
async fn stored(url: &str, expected: usize) -> (BTreeMap<u64, u32>, Vec<String>) {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("HUBGATE").await.expect("the stream exists");
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: "city.district1.seq".to_owned(),
            ..Default::default()
        })
        .await
        .expect("a consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let (mut numbers, mut ids) = (BTreeMap::new(), Vec::new());
    while ids.len() < expected {
        let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(3), messages.next()).await
        else {
            break;
        };
        let message = message.expect("a message");
        let headers = message.headers.clone().expect("headers");
        let header = |name: &str| {
            headers
                .get(name)
                .unwrap_or_else(|| panic!("no {name} header"))
                .to_string()
        };
        assert_eq!(header("Hubgate-Stream"), "seq");
        assert_eq!(header("Hubgate-Type"), "hubgate.v1.Record");
        let record = v1::Record::decode(message.payload.as_ref()).expect("a hubgate.v1.Record");
        assert_eq!(header("Hubgate-Sequence"), record.sequence.to_string());
        assert_eq!(record.stream, "seq");
        assert!(!record.policy_hash.is_empty());
        let n: u64 = hubgate_tests::fields(&record)["n"].parse().expect("n");
        *numbers.entry(n).or_default() += 1;
        ids.push(header("Nats-Msg-Id"));
        message.ack().await.expect("ack");
    }
    (numbers, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_jetstream_once_through_outages_and_a_gateway_kill() {
    const N: u64 = 3000;
    let broker = Mosquitto::start();
    let mut nats = NatsServer::not_started();
    let data = hubgate_tests::private_dir();
    let cfg = config(broker.port, "gw-nats", &sequence_stream("1d")).replace(
        "[grpc]",
        &format!(
            "[store]\ndata_dir = {:?}\n\n[nats]\nurl = \"{}\"\nsubject_prefix = \"city.district1\"\n\
             window = 64\nreconnect_backoff_max = \"300ms\"\n\n[grpc]",
            data.path(),
            nats.url()
        ),
    );
    let seq = [("stream", "seq")];

    // NATS is down: the gateway keeps everything and waits.
    let gateway = Gateway::start(gateway_bin!(), &cfg);
    gateway.wait_ready();
    let mut publisher = Publisher::connect(broker.port, "pub-nats");
    publisher.publish_numbers("test/seq", N / 3).await;
    wait_for("the first third kept", Duration::from_secs(20), || {
        gateway.metric("hubgate_records_kept_total", &seq) == (N / 3) as f64
    });
    wait_for(
        "failed attempts to reach NATS",
        Duration::from_secs(20),
        || gateway.metric("hubgate_nats_errors_total", &[]) >= 2.0,
    );
    assert_eq!(gateway.metric("hubgate_nats_connected", &[]), 0.0);

    // NATS comes up and the backlog drains while more is published; NATS restarts mid-stream;
    // then the gateway is killed mid-stream, with acknowledged positions not yet saved.
    nats.restart();
    wait_for("records acknowledged", Duration::from_secs(30), || {
        gateway.metric("hubgate_nats_records_acked_total", &seq) > 0.0
    });
    assert_eq!(gateway.metric("hubgate_nats_connected", &[]), 1.0);
    publisher.publish_numbers("test/seq", 2 * N / 3).await;
    nats.restart();
    let before = gateway.metric("hubgate_nats_records_acked_total", &seq);
    wait_for("publishing resumes", Duration::from_secs(30), || {
        gateway.metric("hubgate_nats_records_acked_total", &seq) > before
    });
    gateway.kill();
    let gateway = Gateway::start(gateway_bin!(), &cfg);
    publisher.publish_numbers("test/seq", N).await;
    publisher.wait_acked(N).await;
    wait_for("the backlog published", Duration::from_secs(60), || {
        gateway.metric("hubgate_nats_lag_records", &seq) == 0.0
            && gateway.metric("hubgate_nats_records_acked_total", &seq) > 0.0
    });
    let notice = latest_json(&nats.url(), "city.district1.privacy-notice").await;
    assert_eq!(notice[0]["type"], "PrivacyObject");
    assert_eq!(notice[0]["name"], "seq");

    // Every record once, and the notice once although three gateways published it.
    let messages = stream_messages(&nats.url()).await;
    let (numbers, ids) = stored(&nats.url(), messages as usize - 1).await;
    assert_eq!(ids.len() as u64 + 1, messages, "the records and the notice");
    let missing: Vec<u64> = (1..=N).filter(|n| !numbers.contains_key(n)).collect();
    assert!(
        missing.is_empty(),
        "JetStream lacks {} records, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    // A number stored twice is a message the broker delivered again after the kill, before the
    // gateway's acknowledgement reached it (MQTT QoS 1 is at least once): two records with two
    // sequence numbers, each stored once. At most what the gateway had in flight at the kill.
    let twice: Vec<u64> = numbers
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, _)| *n)
        .collect();
    assert!(
        numbers.values().all(|c| *c <= 2) && twice.len() <= 256,
        "stored more than once: {twice:?}"
    );
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len());
    for id in &ids {
        let (incarnation, rest) = id.split_once('-').expect("incarnation-stream-sequence");
        assert_eq!(incarnation.len(), 32, "{id}");
        assert!(rest.starts_with("seq-"), "{id}");
    }
    eprintln!(
        "JetStream stored {} records ({} numbers twice, delivered again by the broker); it recognised {} sent again after the kill",
        ids.len(),
        twice.len(),
        gateway.metric("hubgate_nats_records_duplicate_total", &seq)
    );
    // The published bytes count in the footprint.
    assert!(gateway.metric("hubgate_nats_sent_bytes_total", &seq) > 0.0);
}

/// `payload = "ngsi_ld"`: a Smart Data Models entity read with `format = "ngsi"` reaches
/// JetStream as an NGSI-LD entity of the same type, holding only what the policy passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_can_be_published_as_ngsi_ld_entities() {
    let broker = Mosquitto::start();
    let nats = NatsServer::start();
    let stream = r#"
[[stream]]
name = "air_quality"
topics = ["fiware/AirQualityObserved/+"]
format = "ngsi"
purpose = "Air quality maps"
legal_basis = "public task"
principles = ["sustainability_resilience"]
retention = "1d"

[stream.fields]
type = "keep"
temperature = "keep"
"address.addressLocality" = "keep"
cell = { h3 = { resolution = 8, lat = "location.lat", lon = "location.lon" } }
"#;
    let cfg = config(broker.port, "gw-ngsi-ld", stream).replace(
        "[grpc]",
        &format!(
            "[nats]\nurl = \"{}\"\npayload = \"ngsi_ld\"\n\n[grpc]",
            nats.url()
        ),
    );
    let gateway = Gateway::start(gateway_bin!(), &cfg);
    gateway.wait_ready();
    let entity = std::fs::read(
        hubgate_tests::repo()
            .join("tests/data/smart-data-models/AirQualityObserved.normalized.json"),
    )
    .unwrap();
    let mut publisher = Publisher::connect(broker.port, "pub-ngsi-ld");
    publisher
        .publish("fiware/AirQualityObserved/madrid-4", entity)
        .await;
    publisher.wait_acked(1).await;
    wait_for("the entity acknowledged", Duration::from_secs(20), || {
        gateway.metric(
            "hubgate_nats_records_acked_total",
            &[("stream", "air_quality")],
        ) == 1.0
    });

    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let message = js
        .get_stream("HUBGATE")
        .await
        .unwrap()
        .get_last_raw_message_by_subject("hubgate.air_quality")
        .await
        .expect("the record's message");
    assert_eq!(message.subject.as_str(), "hubgate.air_quality");
    assert_eq!(
        message
            .headers
            .get("Content-Type")
            .unwrap_or_else(|| panic!("{:?}", message.headers))
            .to_string(),
        "application/ld+json"
    );
    let e: serde_json::Value = serde_json::from_slice(&message.payload).expect("JSON");
    assert_eq!(e["type"], "AirQualityObserved");
    assert!(
        e["id"]
            .as_str()
            .unwrap()
            .starts_with("urn:ngsi-ld:AirQualityObserved:"),
        "{e}"
    );
    assert_eq!(e["temperature"]["type"], "Property");
    assert_eq!(e["temperature"]["value"], 12.2);
    assert!(e["temperature"]["observedAt"].is_string());
    assert_eq!(
        e["address"]["value"],
        serde_json::json!({"addressLocality": "Madrid"})
    );
    assert!(
        e["cell"]["value"].as_str().is_some_and(|c| c.len() == 15),
        "{e}"
    );
    let text = e.to_string();
    // The privacy notice beside the records: the stream's PrivacyObject.
    let notice = latest_json(&nats.url(), "hubgate.privacy-notice").await;
    assert_eq!(
        notice[0]["id"],
        "urn:ngsi-ld:PrivacyObject:gw-ngsi-ld:air_quality"
    );
    for absent in [
        "40.42",
        "-3.71",
        "Plaza de Espa",
        "coLevel",
        "Madrid-AmbientObserved",
    ] {
        assert!(!text.contains(absent), "{absent} in {text}");
    }
}

/// Two districts' gateways publish into one JetStream stream, each under its own subject prefix:
/// the second adds its subjects to the stream the first created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn districts_share_one_jetstream_stream() {
    let broker = Mosquitto::start();
    let nats = NatsServer::start();
    let district = |n: u32| {
        let stream = sequence_stream("1d").replace("test/seq", &format!("district{n}/seq"));
        config(broker.port, &format!("gw-district{n}"), &stream).replace(
            "[grpc]",
            &format!(
                "[nats]\nurl = \"{}\"\nsubject_prefix = \"city.district{n}\"\n\n[grpc]",
                nats.url()
            ),
        )
    };
    let (one, two) = (
        Gateway::start(gateway_bin!(), &district(1)),
        Gateway::start(gateway_bin!(), &district(2)),
    );
    one.wait_ready();
    two.wait_ready();
    let mut publisher = Publisher::connect(broker.port, "pub-districts");
    for n in 1..=10 {
        for d in 1..=2 {
            publisher
                .publish(&format!("district{d}/seq"), format!("{{\"n\": {n}}}"))
                .await;
        }
    }
    publisher.wait_acked(20).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stream_messages(&nats.url()).await < 22 {
        assert!(
            std::time::Instant::now() < deadline,
            "not every record arrived"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let info = js
        .get_stream("HUBGATE")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    let mut subjects = info.config.subjects.clone();
    subjects.sort();
    assert_eq!(subjects, ["city.district1.>", "city.district2.>"]);
    assert_eq!(
        info.state.messages, 22,
        "ten records from each district, once, and each district's privacy notice"
    );
    for d in 1..=2 {
        let notice = latest_json(&nats.url(), &format!("city.district{d}.privacy-notice")).await;
        assert_eq!(notice[0]["type"], "PrivacyObject", "{notice}");
    }
}
