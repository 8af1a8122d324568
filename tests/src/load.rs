//! A load generator: mixed city telemetry published through a real broker, at a target rate or as
//! fast as the broker takes it.
//!
//! Devices are of the four kinds the demo simulates (air-quality stations, Wi-Fi people counters,
//! parking bays, noise meters), each on its own topic (`city/air/aq-00042/reading`, …), with the
//! fields such devices send, identifiers included (MAC addresses, licence plates). Every payload
//! also carries `seq` (unique in the run) and `sent_us` (the send time, microseconds since the
//! Unix epoch), so a subscriber can measure loss and publish-to-delivery latency.
//!
//! Each connection is a plain MQTT 3.1.1 client on its own thread that writes PUBLISH packets
//! through a buffer: a generator must cost the machine less than what it measures, and a client
//! that makes a system call per message would not. At QoS 1 a reader thread counts the broker's
//! PUBACKs, and at most `window` messages per connection are unacknowledged at once.

use std::io::{BufWriter, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The device kinds, in the order devices are assigned to them (device `i` is of kind `i % 4`).
pub const KINDS: [&str; 4] = ["air", "footfall", "parking", "noise"];

/// Distinct phones (MAC addresses) the people counters hear, over the whole district.
pub const PHONES: u64 = 20_000;

/// What to publish.
#[derive(Debug, Clone)]
pub struct Load {
    /// The broker, on 127.0.0.1.
    pub port: u16,
    /// Distinct devices (and topics), spread over the four kinds.
    pub devices: u32,
    /// Messages per second over all connections; `None` for as fast as the broker takes them.
    pub rate: Option<u64>,
    /// How long to publish.
    pub duration: Duration,
    /// 0 or 1.
    pub qos: u8,
    /// Connections (each on its own thread).
    pub connections: usize,
    /// Extra bytes in each payload, in a field (`firmware_notes`) a policy would not keep.
    pub pad: usize,
    /// Most unacknowledged QoS 1 messages per connection.
    pub window: u64,
    /// Prefix of the client ids.
    pub client_id: String,
}

impl Load {
    /// A load on `port` with the defaults: 1,000 devices, as fast as possible for 5 s at QoS 0 on
    /// two connections, no padding.
    pub fn new(port: u16) -> Self {
        Self {
            port,
            devices: 1_000,
            rate: None,
            duration: Duration::from_secs(5),
            qos: 0,
            connections: 2,
            pad: 0,
            window: 1_000,
            client_id: "hubgate-load".to_owned(),
        }
    }
}

/// What was published.
#[derive(Debug, Clone, Default)]
pub struct Sent {
    /// Messages written to the broker, by kind (in [`KINDS`] order).
    pub by_kind: [u64; 4],
    /// QoS 1 messages the broker acknowledged.
    pub acked: u64,
    /// From the first message to the last (and, at QoS 1, its acknowledgement).
    pub elapsed: Duration,
}

impl Sent {
    pub fn messages(&self) -> u64 {
        self.by_kind.iter().sum()
    }

    /// Messages per second.
    pub fn rate(&self) -> f64 {
        self.messages() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Publishes `load`, and returns what was sent. Blocks the calling thread.
pub fn publish(load: &Load) -> std::io::Result<Sent> {
    let connections = load.connections.max(1);
    let start = Instant::now();
    let workers: Vec<_> = (0..connections)
        .map(|c| {
            let load = load.clone();
            std::thread::spawn(move || connection(&load, c, connections))
        })
        .collect();
    let mut sent = Sent::default();
    for worker in workers {
        let part = worker
            .join()
            .map_err(|_| std::io::Error::other("a publisher thread panicked"))??;
        for (total, n) in sent.by_kind.iter_mut().zip(part.by_kind) {
            *total += n;
        }
        sent.acked += part.acked;
    }
    sent.elapsed = start.elapsed();
    Ok(sent)
}

fn connection(load: &Load, index: usize, connections: usize) -> std::io::Result<Sent> {
    let stream = TcpStream::connect(("127.0.0.1", load.port))?;
    stream.set_nodelay(true)?;
    let mut reader = stream.try_clone()?;
    let mut out = BufWriter::with_capacity(64 * 1024, stream);
    out.write_all(&connect_packet(&format!("{}-{index}", load.client_id)))?;
    out.flush()?;
    let mut connack = [0u8; 4];
    reader.read_exact(&mut connack)?;
    if connack[0] != 0x20 || connack[3] != 0 {
        return Err(std::io::Error::other(format!(
            "the broker refused the connection: {connack:?}"
        )));
    }
    let acked = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let ack_reader = (load.qos == 1).then(|| {
        let (acked, done) = (Arc::clone(&acked), Arc::clone(&done));
        std::thread::spawn(move || count_pubacks(reader, &acked, &done))
    });

    // This connection's devices: index, index + connections, …
    let devices: Vec<u32> = (index as u32..load.devices.max(1))
        .step_by(connections)
        .collect();
    let per_second = load.rate.map(|r| r as f64 / connections as f64);
    let mut sent = Sent::default();
    let mut payload = String::with_capacity(512 + load.pad);
    let mut topic = String::with_capacity(64);
    let pad = "x".repeat(load.pad);
    let mut packet = Vec::with_capacity(1024 + load.pad);
    let mut pkid: u16 = 0;
    let start = Instant::now();
    let mut n: u64 = 0;
    'run: loop {
        let elapsed = start.elapsed();
        if elapsed >= load.duration || devices.is_empty() {
            break;
        }
        let due = match per_second {
            Some(rate) => (rate * elapsed.as_secs_f64()) as u64,
            None => n + 256,
        };
        if n >= due {
            out.flush()?;
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        while n < due {
            if load.qos == 1 {
                while n - acked.load(Ordering::Acquire) >= load.window.max(1) {
                    out.flush()?;
                    if start.elapsed() >= load.duration + Duration::from_secs(30) {
                        break 'run;
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
            let device = devices[(n % devices.len() as u64) as usize];
            let seq = ((index as u64) << 40) | n;
            let kind = (device % 4) as usize;
            make_message(kind, device, seq, &pad, &mut topic, &mut payload);
            pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
            publish_packet(&topic, payload.as_bytes(), load.qos, pkid, &mut packet);
            out.write_all(&packet)?;
            sent.by_kind[kind] += 1;
            n += 1;
        }
    }
    out.flush()?;
    if let Some(reader) = ack_reader {
        // Wait for the last acknowledgements (at most 30 s), then stop the reader.
        let deadline = Instant::now() + Duration::from_secs(30);
        while acked.load(Ordering::Acquire) < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        done.store(true, Ordering::Release);
        out.write_all(&[0xE0, 0x00])?; // DISCONNECT
        out.flush()?;
        let _ = out.get_ref().shutdown(std::net::Shutdown::Both);
        let _ = reader.join();
    } else {
        out.write_all(&[0xE0, 0x00])?;
        out.flush()?;
    }
    sent.acked = acked.load(Ordering::Acquire);
    sent.elapsed = start.elapsed();
    Ok(sent)
}

/// Reads the broker's packets, counting PUBACKs, until the connection ends or `done`.
fn count_pubacks(mut reader: TcpStream, acked: &AtomicU64, done: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    while !done.load(Ordering::Acquire) {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        let mut at = 0;
        // Every packet the broker sends this client is small: a type byte, a one-byte length.
        while pending.len() - at >= 2 {
            let len = 2 + pending[at + 1] as usize;
            if pending.len() - at < len {
                break;
            }
            if pending[at] == 0x40 {
                acked.fetch_add(1, Ordering::AcqRel);
            }
            at += len;
        }
        pending.drain(..at);
    }
}

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            break;
        }
    }
}

fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10];
    remaining_length(body.len(), &mut packet);
    packet.extend_from_slice(&body);
    packet
}

fn publish_packet(topic: &str, payload: &[u8], qos: u8, pkid: u16, out: &mut Vec<u8>) {
    out.clear();
    out.push(0x30 | (qos.min(1) << 1));
    let id_len = if qos > 0 { 2 } else { 0 };
    remaining_length(2 + topic.len() + id_len + payload.len(), out);
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The topic and JSON payload of one reading of `device` (of `kind`, an index in [`KINDS`]).
pub fn make_message(
    kind: usize,
    device: u32,
    seq: u64,
    pad: &str,
    topic: &mut String,
    payload: &mut String,
) {
    use std::fmt::Write as _;
    topic.clear();
    payload.clear();
    let sent_us = now_us();
    let ts = sent_us / 1_000_000;
    // Values vary with the sequence so that payloads are not all alike.
    let v = (seq % 997) as f64 / 10.0;
    let lat = 52.30 + f64::from(device % 1000) * 0.0002;
    let lon = 4.85 + f64::from(device / 1000 % 1000) * 0.0002;
    let pad_field = |payload: &mut String| {
        if !pad.is_empty() {
            let _ = write!(payload, ",\"firmware_notes\":\"{pad}\"");
        }
    };
    // Writing to a String cannot fail.
    let _ = match kind {
        0 => {
            let _ = write!(topic, "city/air/aq-{device:05}/reading");
            write!(
                payload,
                "{{\"station_id\":\"aq-{device:05}\",\"ts\":{ts},\"seq\":{seq},\"sent_us\":{sent_us},\
                 \"pm25\":{pm25:.1},\"pm10\":{pm10:.1},\"no2\":{no2:.1},\"location\":{{\"lat\":{lat:.5},\
                 \"lon\":{lon:.5},\"district\":\"d{district}\"}},\"firmware\":\"2.4.1\"",
                pm25 = 5.0 + v / 4.0,
                pm10 = 9.0 + v / 3.0,
                no2 = 12.0 + v / 2.0,
                district = device % 12,
            )
        }
        1 => {
            // The phones the counters hear: a population of PHONES, each heard again and again.
            let phone = seq.wrapping_mul(2_654_435_761) % PHONES;
            let _ = write!(topic, "city/footfall/pc-{device:05}/probe");
            write!(
                payload,
                "{{\"counter_id\":\"pc-{device:05}\",\"ts\":{ts},\"seq\":{seq},\"sent_us\":{sent_us},\
                 \"mac\":\"3c:22:fb:{a:02x}:{b:02x}:{c:02x}\",\"rssi\":{rssi},\"channel\":6,\
                 \"probed_ssid\":\"HomeNet-{c}\"",
                a = (phone >> 16) as u8,
                b = (phone >> 8) as u8,
                c = phone as u8,
                rssi = -40 - (seq % 50) as i64,
            )
        }
        2 => {
            let _ = write!(topic, "city/parking/bay-{device:05}/status");
            write!(
                payload,
                "{{\"bay_id\":\"bay-{device:05}\",\"ts\":{ts},\"seq\":{seq},\"sent_us\":{sent_us},\
                 \"occupied\":{occupied},\"plate\":\"AB-{plate:03}-CD\",\"vehicle_class\":\"car\",\
                 \"location\":{{\"lat\":{lat:.5},\"lon\":{lon:.5}}}",
                occupied = !seq.is_multiple_of(3),
                plate = seq % 1000,
            )
        }
        _ => {
            let _ = write!(topic, "city/noise/nm-{device:05}/level");
            write!(
                payload,
                "{{\"meter_id\":\"nm-{device:05}\",\"ts\":{ts},\"seq\":{seq},\"sent_us\":{sent_us},\
                 \"laeq_db\":{laeq:.1},\"lamax_db\":{lamax:.1}",
                laeq = 45.0 + v / 5.0,
                lamax = 60.0 + v / 4.0,
            )
        }
    };
    pad_field(payload);
    payload.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_json_with_a_sequence_and_send_time() {
        let (mut topic, mut payload) = (String::new(), String::new());
        for (kind, name) in KINDS.iter().enumerate() {
            make_message(kind, 42, 7, "pp", &mut topic, &mut payload);
            let value: serde_json::Value = serde_json::from_str(&payload).expect("JSON");
            assert_eq!(value["seq"], 7, "{payload}");
            assert!(value["sent_us"].as_i64().unwrap() > 1_700_000_000_000_000);
            assert_eq!(value["firmware_notes"], "pp");
            assert!(topic.starts_with(&format!("city/{name}/")), "{topic}");
        }
    }

    #[test]
    fn remaining_lengths_are_encoded_as_mqtt_says() {
        // MQTT 3.1.1, 2.2.3: the boundaries of one to four bytes.
        for (n, bytes) in [
            (0usize, &[0x00][..]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
        ] {
            let mut out = Vec::new();
            remaining_length(n, &mut out);
            assert_eq!(out, bytes, "{n}");
        }
    }
}
