//! Decoding a payload into readings: the first stage of every message.
//!
//! `cargo bench -p hubgate --bench decode`
//!
//! `decode_json`: the load generator's four device kinds (`hubgate_tests::load`).
//! `decode_formats`: one message of each other format, per message: a SenML pack of seven
//! records (RFC 8428 §5.1.2) in JSON and in CBOR, a Smart Data Models entity in key-values and
//! in normalised form, and a Sparkplug B NDATA of ten metrics sent by alias.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hubgate::decode::sparkplug::{Metric, MetricValue, Payload};
use hubgate::decode::{self, Decoder, PayloadFormat};
use prost::Message as _;

/// RFC 8428 §5.1.2, second example.
const SENML: &str = r#"[
     {"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,"bu":"A","bver":5,"n":"voltage","u":"V","v":120.1},
     {"n":"current","t":-5,"v":1.2},{"n":"current","t":-4,"v":1.3},{"n":"current","t":-3,"v":1.4},
     {"n":"current","t":-2,"v":1.5},{"n":"current","t":-1,"v":1.6},{"n":"current","v":1.7}]"#;

/// The same pack in CBOR, as RFC 8428 §6 prints it.
const SENML_CBOR: &str = "87a721781b75726e3a6465763a6f773a3130653230373361303130383030363a22fb41d303a15b\
00106223614120050067766f6c7461676501615602fb405e066666666666a3006763757272656e\
74062402fb3ff3333333333333a3006763757272656e74062302fb3ff4cccccccccccda3006763\
757272656e74062202fb3ff6666666666666a3006763757272656e74062102f93e00a300676375\
7272656e74062002fb3ff999999999999aa3006763757272656e74060002fb3ffb333333333333";

fn sparkplug(seq: u64, birth: bool) -> Vec<u8> {
    Payload {
        timestamp: Some(1_764_072_000_000),
        seq: Some(seq),
        metrics: (0..10)
            .map(|i| Metric {
                name: birth.then(|| format!("Line/Sensor{i}")),
                alias: Some(i),
                datatype: birth.then_some(10),
                value: Some(MetricValue::DoubleValue(i as f64 * 1.5)),
                ..Metric::default()
            })
            .collect(),
        ..Payload::default()
    }
    .encode_to_vec()
}

const PAYLOADS: [(&str, &str); 4] = [
    (
        "air",
        r#"{"station_id":"aq-00042","ts":1764072000,"seq":7,"sent_us":1764072000123456,"pm25":12.4,"pm10":19.1,"no2":31.5,"location":{"lat":52.30840,"lon":4.85000,"district":"d6"},"firmware":"2.4.1"}"#,
    ),
    (
        "footfall",
        r#"{"counter_id":"pc-041","ts":1764072000,"seq":8,"sent_us":1764072000123456,"mac":"3c:22:fb:01:4e:9a","rssi":-58,"channel":6,"probed_ssid":"HomeNet-154"}"#,
    ),
    (
        "parking",
        r#"{"bay_id":"bay-00042","ts":1764072000,"seq":9,"sent_us":1764072000123456,"occupied":true,"plate":"AB-009-CD","vehicle_class":"car","location":{"lat":52.30840,"lon":4.85000}}"#,
    ),
    (
        "noise",
        r#"{"meter_id":"nm-00043","ts":1764072000,"seq":10,"sent_us":1764072000123456,"laeq_db":47.0,"lamax_db":62.5}"#,
    ),
];

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_json");
    g.throughput(Throughput::Elements(1));
    for (kind, payload) in PAYLOADS {
        assert!(decode::json(payload.as_bytes()).is_ok(), "{kind}");
        g.bench_function(kind, |b| {
            b.iter(|| decode::json(black_box(payload.as_bytes())))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("decode_formats");
    g.throughput(Throughput::Elements(1));
    let data = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/smart-data-models/"
    );
    let read = |name: &str| std::fs::read(format!("{data}{name}")).expect("test data");
    let cases: Vec<(&str, PayloadFormat, &str, Vec<u8>)> = vec![
        (
            "senml_json",
            PayloadFormat::SenmlJson,
            "city/x",
            SENML.as_bytes().to_vec(),
        ),
        (
            "senml_cbor",
            PayloadFormat::SenmlCbor,
            "city/x",
            decode::from_hex(SENML_CBOR).expect("hex"),
        ),
        (
            "ngsi_keyvalues",
            PayloadFormat::Ngsi,
            "city/x",
            read("AirQualityObserved.keyvalues.json"),
        ),
        (
            "ngsi_normalised",
            PayloadFormat::Ngsi,
            "city/x",
            read("AirQualityObserved.normalized.json"),
        ),
        (
            "sparkplug_ndata",
            PayloadFormat::SparkplugB,
            "spBv1.0/g/NDATA/e",
            sparkplug(1, false),
        ),
    ];
    for (name, format, topic, payload) in cases {
        let mut decoder = Decoder::default();
        decoder
            .decode(
                PayloadFormat::SparkplugB,
                "spBv1.0/g/NBIRTH/e",
                &sparkplug(0, true),
                0,
            )
            .expect("a birth");
        let readings = decoder.decode(format, topic, &payload, 0).expect(name);
        assert!(!readings.readings().is_empty(), "{name}");
        g.bench_function(name, |b| {
            b.iter(|| decoder.decode(format, topic, black_box(&payload), 0))
        });
    }
    g.finish();
}

criterion_group!(decode_benches, benches);
criterion_main!(decode_benches);
