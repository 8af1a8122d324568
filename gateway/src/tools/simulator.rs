//! A simulated small district, for `hubgate demo` and tests: air-quality stations, Wi-Fi people
//! counters that report the MAC addresses they hear, parking bays that read licence plates, and
//! noise meters. It publishes over MQTT at QoS 1, like real devices would, including the occasional
//! malformed payload from a faulty station.
//!
//! It remembers the identifiers it sent (MAC addresses, plates) so a demo can check that none of
//! them reaches a subscriber.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rumqttc::{AsyncClient, MqttOptions, QoS};
use tokio_util::sync::CancellationToken;

/// The kinds of device simulated: the topic prefix, the fields each message carries.
pub const DEVICE_KINDS: &[(&str, &str, &[&str])] = &[
    (
        "air_quality",
        "city/air/{id}/reading",
        &[
            "station_id",
            "ts",
            "pm25",
            "pm10",
            "no2",
            "location.lat",
            "location.lon",
            "location.district",
            "firmware",
        ],
    ),
    (
        "footfall",
        "city/footfall/{id}/probe",
        &["counter_id", "ts", "mac", "rssi", "channel", "probed_ssid"],
    ),
    (
        "parking",
        "city/parking/{id}/status",
        &[
            "bay_id",
            "ts",
            "occupied",
            "plate",
            "vehicle_class",
            "location.lat",
            "location.lon",
        ],
    ),
    (
        "noise",
        "city/noise/{id}/level",
        &["meter_id", "ts", "laeq_db", "lamax_db", "spectrum_db"],
    ),
];

/// What the simulator sent.
#[derive(Debug, Default)]
pub struct Sent {
    pub messages: u64,
    pub malformed: u64,
    /// Every direct identifier (MAC address, licence plate) put in a payload.
    pub identifiers: HashSet<String>,
}

/// A small xorshift generator: the simulation needs variety, not cryptographic randomness.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn float(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (self.next() >> 11) as f64 / (1u64 << 53) as f64 * (hi - lo)
    }
}

/// One message: topic and payload.
pub type Message = (String, Vec<u8>);

struct District {
    rng: Rng,
}

impl District {
    fn message(&mut self, now_s: f64, sent: &mut Sent) -> Message {
        let rng = &mut self.rng;
        let ts = now_s.floor() as i64;
        match rng.below(10) {
            0..=2 => air_quality(rng, ts, sent),
            3..=5 => footfall(rng, ts, sent),
            6..=7 => parking(rng, ts, sent),
            _ => noise(rng, ts),
        }
    }
}

/// An air-quality station's reading; one in 40 is malformed.
fn air_quality(rng: &mut Rng, ts: i64, sent: &mut Sent) -> Message {
    let id = format!("aq-{:02}", rng.below(4) + 1);
    let topic = format!("city/air/{id}/reading");
    if rng.below(40) == 0 {
        sent.malformed += 1;
        // A station whose firmware cuts messages short.
        return (
            topic,
            format!("{{\"station_id\":\"{id}\",\"pm25\":1").into_bytes(),
        );
    }
    let payload = serde_json::json!({
        "station_id": id, "ts": ts,
        "pm25": round1(rng.float(3.0, 40.0)), "pm10": round1(rng.float(8.0, 60.0)),
        "no2": round1(rng.float(5.0, 80.0)),
        "location": {"lat": 52.37 + rng.float(0.0, 0.02), "lon": 4.89 + rng.float(0.0, 0.02), "district": "harbour"},
        "firmware": "2.4.1",
    });
    (topic, payload.to_string().into_bytes())
}

/// A people counter's probe: the MAC address of a phone it heard.
fn footfall(rng: &mut Rng, ts: i64, sent: &mut Sent) -> Message {
    let id = format!("pc-{:02}", rng.below(2) + 1);
    let mac = format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        rng.below(256) & 0xfe,
        rng.below(256),
        rng.below(256),
        rng.below(256),
        rng.below(256),
        rng.below(256)
    );
    sent.identifiers.insert(mac.clone());
    let channel = [1, 6, 11][rng.below(3) as usize];
    let payload = serde_json::json!({
        "counter_id": id, "ts": ts, "mac": mac, "rssi": -40 - rng.below(50) as i64,
        "channel": channel, "probed_ssid": "HomeNetwork",
    });
    (
        format!("city/footfall/{id}/probe"),
        payload.to_string().into_bytes(),
    )
}

/// A parking bay's status, with the plate of the car in it.
fn parking(rng: &mut Rng, ts: i64, sent: &mut Sent) -> Message {
    let id = format!("pk-{:03}", rng.below(6) + 101);
    let letters = |rng: &mut Rng| -> String {
        (0..2)
            .map(|_| (b'A' + rng.below(26) as u8) as char)
            .collect()
    };
    let plate = format!("{}-{:03}-{}", letters(rng), rng.below(1000), letters(rng));
    let occupied = rng.below(3) != 0;
    if occupied {
        sent.identifiers.insert(plate.clone());
    }
    let payload = serde_json::json!({
        "bay_id": id, "ts": ts, "occupied": occupied,
        "plate": if occupied { serde_json::Value::from(plate) } else { serde_json::Value::Null },
        "vehicle_class": if occupied { "car" } else { "none" },
        "location": {"lat": 52.371, "lon": 4.896},
    });
    (
        format!("city/parking/{id}/status"),
        payload.to_string().into_bytes(),
    )
}

/// A noise meter's levels.
fn noise(rng: &mut Rng, ts: i64) -> Message {
    let id = format!("nm-{:02}", rng.below(3) + 1);
    let laeq = round1(rng.float(45.0, 75.0));
    let payload = serde_json::json!({
        "meter_id": id, "ts": ts, "laeq_db": laeq, "lamax_db": round1(laeq + rng.float(3.0, 15.0)),
        "spectrum_db": [laeq - 3.0, laeq, laeq - 5.0],
    });
    (
        format!("city/noise/{id}/level"),
        payload.to_string().into_bytes(),
    )
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// `count` messages of the district's traffic at `now_s` (Unix seconds), without a broker: for
/// measurements over realistic payloads. `sent` learns the identifiers they carry.
pub fn messages(seed: u64, count: usize, now_s: f64, sent: &mut Sent) -> Vec<Message> {
    let mut district = District { rng: Rng(seed | 1) };
    (0..count)
        .map(|_| {
            sent.messages += 1;
            district.message(now_s, sent)
        })
        .collect()
}

/// Publishes the district's traffic to the broker at `broker`, about `rate` messages a second,
/// until `shutdown`. Counts go to `sent`.
pub async fn run(
    broker: SocketAddr,
    rate: u32,
    sent: Arc<Mutex<Sent>>,
    shutdown: CancellationToken,
) {
    let mut options = MqttOptions::new(
        format!("hubgate-demo-district-{}", std::process::id()),
        broker.ip().to_string(),
        broker.port(),
    );
    options
        .set_keep_alive(Duration::from_secs(15))
        .set_max_packet_size(64 * 1024, 64 * 1024);
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    let driver = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let mut district = District {
        rng: Rng(0x9e37_79b9_7f4a_7c15),
    };
    let tick = Duration::from_millis(100);
    let per_tick = (rate / 10).max(1);
    let mut interval = tokio::time::interval(tick);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = interval.tick() => {}
        }
        let now_s = crate::telemetry::clock::now_ms() as f64 / 1000.0;
        for _ in 0..per_tick {
            let (topic, payload) = {
                let mut sent = sent.lock().unwrap_or_else(PoisonError::into_inner);
                sent.messages += 1;
                district.message(now_s, &mut sent)
            };
            if client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                break;
            }
        }
    }
    let _ = client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    driver.abort();
}
