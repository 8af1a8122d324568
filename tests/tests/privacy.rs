//! End to end: a people counter that reports Wi-Fi MAC addresses, through a real mosquitto, the
//! gateway as its own process, and a real gRPC subscriber.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use hubgate_proto::v1::{
    self, StartPosition, SubscribeRequest, start_position::Position, subscribe_response::Event,
};
use hubgate_tests::{Gateway, Mosquitto, Publisher, config, fields, gateway_bin};
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
time_bucket = "5m"

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
    let request = SubscribeRequest {
        streams: vec!["footfall".into()],
        start: Some(StartPosition {
            position: Some(Position::Oldest(v1::Oldest {})),
        }),
        from_sequence: HashMap::new(),
    };
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
            let payload = serde_json::json!({
                "counter_id": "pc-01", "ts": 1_700_000_123 + i as i64, "mac": mac, "note": note,
                "lat": 52.3731, "lon": 4.8922, "rssi": -60,
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
    for n in 0..sent {
        let message = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("record");
        let Some(Event::Record(record)) = message.unwrap().unwrap().event else {
            panic!("not a record")
        };
        let printed = format!("{record:?}").to_lowercase();
        for f in &forbidden {
            assert!(
                !printed.contains(&f.to_lowercase()),
                "record {n} carries {f}"
            );
        }
        let f = fields(&record);
        assert!(
            !f.contains_key("lat") && !f.contains_key("lon") && !f.contains_key("rssi"),
            "{f:?}"
        );
        assert_eq!(f["cell"].len(), 15, "an H3 cell index: {f:?}");
        assert_eq!(
            record.event_time.unwrap().seconds % 300,
            0,
            "time coarsened to 5 minutes"
        );
        let device = (n % devices.len() as u64) as usize;
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
