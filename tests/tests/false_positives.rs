//! How often a sensor value is taken for a direct identifier: every value of realistic payloads
//! (the simulated district's traffic, the Smart Data Models examples, the SenML and Sparkplug B
//! samples), decoded as the gateway decodes them and scanned as a kept field is scanned, with
//! every detector on and the region's plate pattern. A value that is an identifier is known
//! beforehand: the simulator remembers the identifiers it sent, and the samples' identifiers are
//! listed below by field. Prints the figures:
//! `cargo test -p hubgate-tests --test false_positives -- --nocapture`.

use std::path::Path;

use hubgate::decode::{Decoder, PayloadFormat};
use hubgate::tools::simulator;
use hubgate_privacy::Value;
use hubgate_privacy::identifiers::{Detector, IdKind, plate_pattern};

/// Fields of the samples that hold an identifier (or are named after one): the SenML base name
/// and record names that are a device's MAC address, an occupant's e-mail address.
const KNOWN_IDENTIFIERS: &[&str] = &["bn", "urn:dev:mac", "occupant", "ana.silva"];

/// The gateway's clock while it scans: 2026-12-07. The samples are from 2016 to 2024, as replayed
/// or late data would be.
const NOW_MS: i64 = 1_796_601_600_000;

#[derive(Debug, Default)]
struct Tally {
    values: u64,
    identifiers: u64,
    found: u64,
    false_positives: Vec<String>,
}

impl Tally {
    fn scan(&mut self, detector: &Detector, path: &str, value: &Value, now_ms: i64, truth: bool) {
        self.values += 1;
        self.identifiers += u64::from(truth);
        let hit = detector.identify_value(value, Some(now_ms)).is_some()
            || detector.identify(path, Some(now_ms)).is_some();
        if hit && truth {
            self.found += 1;
        } else if hit {
            self.false_positives.push(format!("{path} = {value:?}"));
        }
    }
}

fn detector() -> Detector {
    let plate = plate_pattern(r"\b[A-Z]{2}-[0-9]{3}-[A-Z]{2}\b").expect("the region's plates");
    Detector::new(IdKind::ALL.to_vec(), vec![plate])
}

/// The simulated district: 20,000 messages.
fn simulated(detector: &Detector, tally: &mut Tally) {
    let now_s = NOW_MS as f64 / 1e3;
    let mut sent = simulator::Sent::default();
    let messages = simulator::messages(7, 20_000, now_s, &mut sent);
    let mut decoder = Decoder::default();
    for (topic, payload) in messages {
        let Ok(decoded) = decoder.decode(PayloadFormat::Json, &topic, &payload, 0) else {
            continue; // the malformed payloads the simulator sends on purpose
        };
        for reading in decoded.readings() {
            for (path, value) in &reading.fields {
                let truth = matches!(value, Value::Str(s) if sent.identifiers.contains(s.as_str()));
                tally.scan(detector, path, value, NOW_MS, truth);
            }
        }
    }
}

/// A file of samples, one `{"topic", "payload" | "payload_hex", "received"}` per line.
fn samples(file: &Path, format: PayloadFormat, detector: &Detector, tally: &mut Tally) {
    let text = std::fs::read_to_string(file).expect("samples");
    let mut decoder = Decoder::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let sample: serde_json::Value = serde_json::from_str(line).expect("a sample");
        let payload = match (&sample["payload"], sample["payload_hex"].as_str()) {
            (_, Some(hex)) => hubgate::decode::from_hex(hex).expect("hex"),
            (serde_json::Value::String(raw), None) => raw.clone().into_bytes(),
            (other, None) => serde_json::to_vec(other).expect("JSON"),
        };
        let received_ms = sample["received"].as_i64().unwrap_or(1_704_067_200) * 1000;
        let topic = sample["topic"].as_str().expect("a topic");
        let Ok(decoded) = decoder.decode(format, topic, &payload, received_ms) else {
            continue;
        };
        for reading in decoded.readings() {
            for (path, value) in &reading.fields {
                let shown = format!("{path} {value:?}");
                let truth = KNOWN_IDENTIFIERS.iter().any(|k| shown.contains(k));
                tally.scan(detector, path, value, NOW_MS, truth);
            }
        }
    }
}

/// The Smart Data Models examples, each an NGSI entity.
fn smart_data_models(detector: &Detector, tally: &mut Tally) {
    let dir = hubgate_tests::repo().join("tests/data/smart-data-models");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("the examples")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut decoder = Decoder::default();
    for file in files {
        let payload = std::fs::read(&file).expect("an example");
        let decoded = decoder
            .decode(PayloadFormat::Ngsi, "fiware/example", &payload, 0)
            .expect("decodes");
        for reading in decoded.readings() {
            for (path, value) in &reading.fields {
                tally.scan(detector, path, value, NOW_MS, false);
            }
        }
    }
}

/// Scans one corpus into a tally.
type Corpus<'a> = dyn Fn(&mut Tally) + 'a;

#[test]
fn sensor_values_are_not_taken_for_identifiers() {
    let detector = detector();
    let formats = hubgate_tests::repo().join("examples/formats");
    let corpora: [(&str, Box<Corpus<'_>>); 5] = [
        ("simulated district", Box::new(|t| simulated(&detector, t))),
        (
            "Smart Data Models",
            Box::new(|t| smart_data_models(&detector, t)),
        ),
        (
            "NGSI samples",
            Box::new(|t| {
                samples(
                    &formats.join("ngsi-samples.jsonl"),
                    PayloadFormat::Ngsi,
                    &detector,
                    t,
                )
            }),
        ),
        (
            "SenML samples",
            Box::new(|t| {
                samples(
                    &formats.join("senml-samples.jsonl"),
                    PayloadFormat::SenmlJson,
                    &detector,
                    t,
                )
            }),
        ),
        (
            "Sparkplug B samples",
            Box::new(|t| {
                samples(
                    &formats.join("sparkplug-samples.jsonl"),
                    PayloadFormat::SparkplugB,
                    &detector,
                    t,
                )
            }),
        ),
    ];
    let mut total = Tally::default();
    for (name, run) in &corpora {
        let mut tally = Tally::default();
        run(&mut tally);
        let sensor_values = tally.values - tally.identifiers;
        println!(
            "{name}: {} values, {} of {} identifiers found, {} of {sensor_values} sensor values taken for identifiers ({:.4} %)",
            tally.values,
            tally.found,
            tally.identifiers,
            tally.false_positives.len(),
            100.0 * tally.false_positives.len() as f64 / sensor_values.max(1) as f64,
        );
        for fp in &tally.false_positives {
            println!("  false positive: {fp}");
        }
        assert!(tally.values > 0, "{name}: nothing scanned");
        total.values += tally.values;
        total.identifiers += tally.identifiers;
        total.found += tally.found;
        total.false_positives.extend(tally.false_positives);
    }
    println!(
        "all: {} values, {} of {} identifiers found, {} false positives",
        total.values,
        total.found,
        total.identifiers,
        total.false_positives.len()
    );
    assert!(
        total.false_positives.is_empty(),
        "{:#?}",
        total.false_positives
    );
    assert_eq!(total.found, total.identifiers);
}
