//! `hubgate demo`: an embedded broker, a simulated district, the gateway and a gRPC subscriber in
//! one process, with a live summary of what came in and what went out.
//!
//! The subscriber is a real gRPC client of the gateway. It checks every record it receives against
//! the identifiers the simulator sent (MAC addresses, licence plates) and reports how many it saw:
//! the answer must be zero.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hubgate_proto::v1::gateway_client::GatewayClient;
use hubgate_proto::v1::{self, subscribe_response::Event};
use tokio_util::sync::CancellationToken;

use crate::config;
use crate::telemetry::stats::Stats;
use crate::tools::simulator::{self, Sent};

/// What the demo's subscriber received, per stream.
#[derive(Debug, Default)]
struct Received {
    records: HashMap<String, u64>,
    /// Field paths seen in records of each stream.
    fields: HashMap<String, Vec<String>>,
    /// Records holding a value equal to an identifier the simulator sent.
    identifiers_seen: u64,
    /// The gateway's latest footprint, from its WatchFootprint call.
    footprint: Option<v1::Footprint>,
    /// Bytes of the gRPC messages the subscriber received, and of the field data in them.
    bytes_out: u64,
    field_bytes_out: u64,
}

/// The demo's data directory, removed when the demo ends.
struct DemoData(std::path::PathBuf);

impl Drop for DemoData {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the demo for `seconds` (0: until Ctrl-C) at about `rate` messages a second.
pub async fn run(seconds: u64, rate: u32) -> anyhow::Result<()> {
    let broker = crate::tools::broker::start(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    // The demo's outbox lives in a directory of its own, removed at the end.
    let data = DemoData(std::env::temp_dir().join(format!("hubgate-demo-{}", std::process::id())));
    let config = demo_config(broker, &data)?;

    let shutdown = CancellationToken::new();
    let gateway = crate::app::start(config, shutdown.clone()).await?;
    let stats = Arc::clone(&gateway.stats);
    let policy = Arc::clone(&gateway.policy);
    println!(
        "hubgate demo: embedded MQTT broker on {broker}, gRPC on {}, metrics on http://{}/metrics",
        gateway.grpc_addr, gateway.admin_addr
    );
    println!(
        "policy {} with {} streams; a simulated district publishes about {rate} messages/s\n",
        policy.hash_hex(),
        policy.streams().len()
    );

    let sent = Arc::new(Mutex::new(Sent::default()));
    let received = Arc::new(Mutex::new(Received::default()));
    let subscriber = tokio::spawn(subscribe(
        gateway.grpc_addr,
        Arc::clone(&sent),
        Arc::clone(&received),
        shutdown.clone(),
    ));
    let footprint = tokio::spawn(watch_footprint(
        gateway.grpc_addr,
        Arc::clone(&received),
        shutdown.clone(),
    ));
    // Give the subscriber a moment to attach before devices start talking.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let district_stop = CancellationToken::new();
    let district = tokio::spawn(simulator::run(
        broker,
        rate,
        Arc::clone(&sent),
        district_stop.clone(),
    ));

    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    ticker.tick().await;
    let done = wait_done(seconds);
    tokio::pin!(done);
    loop {
        tokio::select! {
            _ = ticker.tick() => print_summary(&policy, &stats, &sent, &received, started.elapsed(), false),
            () = &mut done => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    // Stop the devices first and give the last messages a moment to reach the subscriber.
    district_stop.cancel();
    let _ = district.await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    shutdown.cancel();
    let _ = subscriber.await;
    let _ = footprint.await;
    gateway.wait().await?;
    print_summary(&policy, &stats, &sent, &received, started.elapsed(), true);
    let seen = received
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .identifiers_seen;
    anyhow::ensure!(
        seen == 0,
        "{seen} records at the subscriber held a raw identifier"
    );
    Ok(())
}

/// The default configuration, on local ports chosen by the system, reading from `broker` and
/// keeping its outbox in `data`.
fn demo_config(broker: SocketAddr, data: &DemoData) -> anyhow::Result<config::Config> {
    let (mut config, _) = config::parse(config::DEFAULT_CONFIG)
        .map_err(|_| anyhow::anyhow!("the embedded default configuration is invalid"))?;
    config.mqtt.host = broker.ip().to_string();
    config.mqtt.port = broker.port();
    config.mqtt.client_id = format!("hubgate-demo-{}", std::process::id());
    config.grpc.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.admin.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.admin.public_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.store.data_dir = data.0.clone();
    Ok(config)
}

async fn wait_done(seconds: u64) {
    if seconds == 0 {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
}

async fn subscribe(
    addr: SocketAddr,
    sent: Arc<Mutex<Sent>>,
    received: Arc<Mutex<Received>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut client = GatewayClient::connect(format!("http://{addr}")).await?;
    let request = v1::SubscribeRequest {
        streams: Vec::new(),
        start: None,
        from_sequence: HashMap::new(),
    };
    let mut stream = client.subscribe(request).await?.into_inner();
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            m = stream.message() => m?,
        };
        let Some(message) = message else {
            return Ok(());
        };
        let (wire, field_bytes) = received_bytes(&message);
        {
            let mut r = received.lock().unwrap_or_else(PoisonError::into_inner);
            r.bytes_out += wire;
            r.field_bytes_out += field_bytes;
        }
        let Some(Event::Record(record)) = message.event else {
            continue;
        };
        let leaked = {
            let sent = sent.lock().unwrap_or_else(PoisonError::into_inner);
            record.fields.values().any(|v| match &v.kind {
                Some(v1::value::Kind::StringValue(s)) => sent.identifiers.contains(s),
                _ => false,
            })
        };
        let mut r = received.lock().unwrap_or_else(PoisonError::into_inner);
        r.identifiers_seen += u64::from(leaked);
        *r.records.entry(record.stream.clone()).or_default() += 1;
        let fields = r.fields.entry(record.stream.clone()).or_default();
        for path in record.fields.keys() {
            if !fields.contains(path) {
                fields.push(path.clone());
            }
        }
    }
}

/// Bytes of one message as a subscriber receives it (the message and gRPC's 5-byte prefix;
/// HTTP/2's framing not counted), and of the field data in it: the record's `fields`, encoded
/// alone, as the pipeline counts the field data it keeps.
fn received_bytes(message: &v1::SubscribeResponse) -> (u64, u64) {
    use prost::Message as _;
    let wire = 5 + message.encoded_len() as u64;
    let fields = match &message.event {
        Some(Event::Record(r)) => v1::Record {
            fields: r.fields.clone(),
            ..v1::Record::default()
        }
        .encoded_len() as u64,
        _ => 0,
    };
    (wire, fields)
}

/// Keeps the gateway's latest footprint figures, as a dashboard would.
async fn watch_footprint(
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut client = GatewayClient::connect(format!("http://{addr}")).await?;
    let mut figures = client
        .watch_footprint(v1::WatchFootprintRequest {})
        .await?
        .into_inner();
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            next = figures.message() => next?,
        };
        let Some(footprint) = next else {
            return Ok(());
        };
        received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .footprint = Some(footprint);
    }
}

fn kb(bytes: u64) -> String {
    if bytes < 10_000 {
        format!("{bytes} B")
    } else {
        format!("{:.1} kB", bytes as f64 / 1000.0)
    }
}

fn print_summary(
    policy: &hubgate_privacy::Policy,
    stats: &Stats,
    sent: &Mutex<Sent>,
    received: &Mutex<Received>,
    elapsed: Duration,
    last: bool,
) {
    let received = received.lock().unwrap_or_else(PoisonError::into_inner);
    let sent = sent.lock().unwrap_or_else(PoisonError::into_inner);
    println!(
        "{} after {:.0} s: {} messages published ({} malformed)",
        if last { "Final summary" } else { "Summary" },
        elapsed.as_secs_f64(),
        sent.messages,
        sent.malformed
    );
    print_streams(policy, stats, &received);
    print_stages(policy, stats);
    if let Some(f) = &received.footprint {
        print_footprint(f);
    }
    println!(
        "  raw identifiers: {} of the {} MAC addresses and plates sent reached the subscriber",
        received.identifiers_seen,
        sent.identifiers.len()
    );
    if last {
        print_devices(&received);
    }
    println!();
}

/// A table of what each stream took in and kept, then how much of the payloads was kept.
fn print_streams(policy: &hubgate_privacy::Policy, stats: &Stats, received: &Received) {
    println!(
        "  {:<12} {:>8} {:>10} {:>10} {:>8} {:>8} {:>10} {:>11}",
        "stream", "msgs in", "bytes in", "malformed", "fields", "records", "bytes", "at the"
    );
    println!(
        "  {:<12} {:>8} {:>10} {:>10} {:>8} {:>8} {:>10} {:>11}",
        "", "", "", "(dropped)", "dropped", "kept", "kept", "subscriber"
    );
    let (mut bytes_in, mut bytes_kept, mut field_bytes) = (0, 0, 0);
    for (i, s) in policy.streams().iter().enumerate() {
        let st = &stats.streams[i];
        let (bi, bk) = (
            st.bytes_in.load(Ordering::Relaxed),
            st.bytes_kept.load(Ordering::Relaxed),
        );
        bytes_in += bi;
        bytes_kept += bk;
        field_bytes += st.field_bytes_kept.load(Ordering::Relaxed);
        println!(
            "  {:<12} {:>8} {:>10} {:>10} {:>8} {:>8} {:>10} {:>11}",
            s.name,
            st.messages.load(Ordering::Relaxed),
            kb(bi),
            st.dropped_decode.load(Ordering::Relaxed),
            st.fields_dropped.load(Ordering::Relaxed),
            st.records_kept.load(Ordering::Relaxed),
            kb(bk),
            received.records.get(&s.name).copied().unwrap_or(0),
        );
    }
    let saved = if bytes_in > 0 {
        100.0 * (1.0 - field_bytes as f64 / bytes_in as f64)
    } else {
        0.0
    };
    println!(
        "  data minimisation: {} of payloads in, {} of field data kept ({saved:.0}% never stored or sent; {} with record envelopes)",
        kb(bytes_in),
        kb(field_bytes),
        kb(bytes_kept),
    );
    if received.field_bytes_out > 0 {
        println!(
            "  bytes out: the subscriber received {} of gRPC messages for {} of field data in them ({:.2}x)",
            kb(received.bytes_out),
            kb(received.field_bytes_out),
            received.bytes_out as f64 / received.field_bytes_out as f64,
        );
    }
}

/// What the privacy stages did, over all streams, and the aggregation if the policy has any.
fn print_stages(policy: &hubgate_privacy::Policy, stats: &Stats) {
    let total =
        |f: fn(&crate::telemetry::stats::StreamStats) -> &std::sync::atomic::AtomicU64| -> u64 {
            stats
                .streams
                .iter()
                .map(|s| f(s).load(Ordering::Relaxed))
                .sum()
        };
    println!(
        "  privacy stages: {} values pseudonymised, {} identifiers suppressed, {} locations generalised to cells",
        total(|s| &s.pseudonymised),
        total(|s| &s.identifiers_suppressed),
        total(|s| &s.locations_generalised),
    );
    if policy.streams().iter().any(|s| s.aggregate.is_some()) {
        println!(
            "  aggregation: {} readings into windows, {} late; {} groups released, {} suppressed with fewer than k contributors",
            total(|s| &s.readings_aggregated),
            total(|s| &s.dropped_late),
            total(|s| &s.groups_released),
            total(|s| &s.groups_suppressed),
        );
    }
}

/// The gateway's footprint figures, as its `WatchFootprint` call gave them.
fn print_footprint(f: &v1::Footprint) {
    let params = |keys: &[&str]| {
        let mut shown: Vec<String> = keys
            .iter()
            .filter_map(|k| {
                f.energy_method_parameters
                    .get(*k)
                    .map(|v| format!("{k} {v}"))
            })
            .collect();
        shown.retain(|s| !s.is_empty());
        shown.join(", ")
    };
    println!(
        "  footprint (over gRPC; {}: {}): {:.1} J used by the gateway, {:.1} mg CO2e embodied; {} received, {} sent to subscribers, {} avoided by minimisation, {:.3} J of network energy avoided (attributional)",
        f.energy_method,
        params(&[
            "zones",
            "vcpus",
            "idle_watts_per_vcpu",
            "max_watts_per_vcpu"
        ]),
        f.energy_joules,
        f.carbon_embodied_grams * 1000.0,
        kb(f.mqtt_received_bytes),
        kb(f.grpc_sent_bytes),
        kb(f.bytes_avoided),
        f.network_energy_avoided_joules,
    );
}

/// The fields each kind of device sends, beside those the subscriber received of its stream.
fn print_devices(received: &Received) {
    println!("\nWhat each device sends, and what the subscriber received:");
    for (name, _, fields_in) in simulator::DEVICE_KINDS {
        let out = received.fields.get(*name).map(|f| {
            let mut f = f.clone();
            f.sort();
            f.join(", ")
        });
        println!("  {name:<12} in:  {}", fields_in.join(", "));
        println!(
            "  {:<12} out: {}",
            "",
            out.unwrap_or_else(|| "(nothing yet)".into())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hubgate_privacy::{Record, Value};
    use prost::Message as _;

    /// The subscriber counts a record's field data as the pipeline did when it kept the record,
    /// and the message's bytes as they come over gRPC.
    #[test]
    fn the_subscriber_counts_field_data_as_the_pipeline_does() {
        let record = Record {
            event_time_ms: 1_700_000_000_000,
            fields: [
                ("count".into(), Value::Int(12)),
                ("cell".into(), Value::Str("891f1d48177ffff".into())),
                ("temperature".into(), Value::Float(21.5)),
                ("open".into(), Value::Bool(true)),
            ]
            .into_iter()
            .collect(),
        };
        let mut body = Vec::new();
        let (_, field_bytes) = crate::record::encode_body("footfall", "ab12", &record, &mut body);
        let message = v1::SubscribeResponse {
            event: Some(Event::Record(v1::Record::decode(body.as_slice()).unwrap())),
        };
        let (wire, fields) = received_bytes(&message);
        assert_eq!(fields, field_bytes as u64);
        assert_eq!(wire, 5 + message.encoded_len() as u64);
        assert!(wire > body.len() as u64);
        let gap = v1::SubscribeResponse {
            event: Some(Event::Gap(v1::Gap::default())),
        };
        assert_eq!(received_bytes(&gap).1, 0);
    }
}
