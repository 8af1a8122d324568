//! Decoding a JSON payload into a reading: the first stage of every message.
//!
//! `cargo bench -p hubgate --bench decode`
//!
//! The payloads are those of the load generator's four device kinds (`hubgate_tests::load`).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hubgate::decode;

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
}

criterion_group!(decode_benches, benches);
criterion_main!(decode_benches);
