//! The end-to-end benchmark: mosquitto, the gateway with a representative policy, the load
//! generator ([`crate::load`]) and a gRPC subscriber, all on this machine; and, in the same run, a
//! bare rumqttc subscriber that does nothing but count, through the same broker, as the yardstick.
//!
//! `cargo bench -p hubgate-tests --bench e2e` runs it and prints the table; BENCHMARKS.md says what
//! each figure means. The smoke test (`tests/tests/bench_smoke.rs`) runs it briefly and checks
//! only that data moves.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hubgate_proto::v1;
use hubgate_proto::v1::start_position::Position;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_stream::StreamExt;

use crate::load::{self, Load};
use crate::{Gateway, Mosquitto, config, subscribe_request};

/// glibc's malloc settings the deployment files give the gateway (`deploy/hubgate.service` says
/// why), and so the benchmark too.
pub const MALLOC: [(&str, &str); 3] = [
    ("MALLOC_ARENA_MAX", "2"),
    ("MALLOC_TRIM_THRESHOLD_", "131072"),
    ("MALLOC_MMAP_THRESHOLD_", "131072"),
];

/// The streams the subscriber follows: every stream that keeps one record per reading.
pub const PASS_THROUGH: [&str; 4] = ["air", "footfall", "parking", "noise"];

/// The representative policy: allow-lists everywhere; an H3 cell for the air stations; keyed
/// pseudonyms for the people counters' MAC addresses; licence plates caught by the identifier
/// scan; time buckets; and an aggregated stream (counts per counter, k = 5) beside the
/// pass-through one. `seq` and `sent_us` are kept so the subscriber can measure.
pub const POLICY: &str = r#"
[footprint]
sample_every = "1s"

[[stream]]
name = "air"
topics = ["city/air/+/reading"]
purpose = "Publish local air quality"
legal_basis = "public task"
principles = ["sustainability_resilience"]
technology = "tech__air_quality"
retention = "1d"
time_field = "ts"
time_bucket = "1m"

[stream.fields]
station_id = "keep"
seq = "keep"
sent_us = "keep"
pm25 = "keep"
pm10 = "keep"
no2 = "keep"
"location.district" = "keep"
cell = { h3 = { resolution = 9, lat = "location.lat", lon = "location.lon" } }

[[stream]]
name = "footfall"
topics = ["city/footfall/+/probe"]
purpose = "Measure how busy public spaces are"
legal_basis = "public task"
principles = ["community_participation"]
technology = "tech__identifiable_wifi_sensor"
retention = "1d"
time_field = "ts"
key_epoch = "24h"

[stream.fields]
counter_id = "keep"
seq = "keep"
sent_us = "keep"
rssi = "keep"
mac = "pseudonymise"

[[stream]]
name = "footfall_counts"
topics = ["city/footfall/+/probe"]
purpose = "Count people near each counter"
legal_basis = "public task"
principles = ["community_participation"]
technology = "tech__identifiable_wifi_sensor"
retention = "1d"
time_field = "ts"
key_epoch = "24h"

[stream.fields]
counter_id = "keep"
mac = "pseudonymise"

[stream.aggregate]
window = "10s"
allowed_lateness = "2s"
group_by = ["counter_id"]
contributor = "mac"
min_group_size = 5
accept_exact_counts = true

[stream.aggregate.measures]
readings = "count"
devices = "contributors"

[[stream]]
name = "parking"
topics = ["city/parking/+/status"]
purpose = "Show free parking bays"
legal_basis = "public task"
principles = ["shared_prosperity"]
technology = "tech__parking_sensor"
personal_data = true
retention = "1d"
time_field = "ts"

[stream.identifiers]
plate_patterns = ['\b[A-Z]{2}-[0-9]{3}-[A-Z]{2}\b']

[stream.fields]
bay_id = "keep"
seq = "keep"
sent_us = "keep"
occupied = "keep"
vehicle_class = "keep"

[[stream]]
name = "noise"
topics = ["city/noise/+/level"]
purpose = "Map environmental noise"
legal_basis = "legal obligation"
principles = ["human_rights_equity_inclusion"]
technology = "tech__sound_level_meter"
retention = "1d"
time_field = "ts"
time_bucket = "1m"

[stream.fields]
meter_id = "keep"
seq = "keep"
sent_us = "keep"
laeq_db = "keep"
lamax_db = "keep"
"#;

/// How long and how hard to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Length of each phase (the first second or so of each is not measured).
    pub phase: Duration,
    /// Devices publishing (distinct topics).
    pub devices: u32,
    /// Fixed rates at which latency and memory are measured.
    pub rates: Vec<u64>,
    /// Publishing connections.
    pub connections: usize,
    /// A soak at the last of `rates`, this long, sampling memory; none when `None`.
    pub soak: Option<Duration>,
    /// A cap on the "as fast as possible" phases (for the smoke test on a debug build); none
    /// for a real run.
    pub full_rate: Option<u64>,
    /// More gateway configuration (a `[store]` section, say), placed before the policy's
    /// streams.
    pub extra_config: String,
    /// QoS 1 messages mosquitto lets each client leave unacknowledged.
    pub broker_inflight: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            phase: Duration::from_secs(10),
            devices: 10_000,
            rates: vec![10_000, 50_000],
            connections: 2,
            soak: None,
            full_rate: None,
            extra_config: String::new(),
            broker_inflight: 1_000,
        }
    }
}

/// The figures of one run.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// The bare subscriber's rate, and what the generator published meanwhile (messages/s).
    pub bare_rate: f64,
    pub bare_published_rate: f64,
    /// The bare subscriber's CPU time per million readings at QoS 0, in seconds: what receiving
    /// alone costs on this machine.
    pub bare_cpu_s_per_million: f64,
    /// The same at QoS 1, the subscriber acknowledging each message as it arrives, and what the
    /// generator published meanwhile.
    pub bare_qos1_rate: f64,
    pub bare_qos1_published_rate: f64,
    /// The gateway at full load, QoS 0: readings taken in per second, records delivered to the
    /// gRPC subscriber per second, and what the generator published meanwhile.
    pub peak_rate: f64,
    pub peak_grpc_rate: f64,
    pub peak_published_rate: f64,
    /// The gateway's CPU time per million readings at full load, in seconds.
    pub cpu_s_per_million: f64,
    /// Bytes the gateway wrote to storage per reading at full load, and at QoS 1.
    pub disk_bytes_per_reading: f64,
    pub qos1_disk_bytes_per_reading: f64,
    /// Energy per million readings at full load (joules), and the meter's method.
    pub joules_per_million: f64,
    pub energy_method: String,
    /// Publish-to-gRPC latency at each fixed rate, and resident memory meanwhile.
    pub latency: Vec<Latency>,
    /// QoS 1, acknowledged after commit: readings per second, published and taken in.
    pub qos1_rate: f64,
    pub qos1_published: u64,
    /// QoS 1 messages the broker acknowledged to the generator.
    pub qos1_broker_acked: u64,
    pub qos1_received: u64,
    pub qos1_records: u64,
    /// The gateway's CPU time per million readings at QoS 1, in seconds.
    pub qos1_cpu_s_per_million: f64,
    /// The gateway's highest resident memory over the run (KiB).
    pub peak_rss_kib: u64,
    /// The outbox: bytes on disk, bytes of live records, records held (kept less purged).
    pub outbox_disk_bytes: u64,
    pub outbox_live_bytes: u64,
    pub outbox_records: u64,
    /// Resident memory during the soak, sampled every 10 s (KiB).
    pub soak_rss_kib: Vec<u64>,
}

/// Latency and memory at one fixed rate.
#[derive(Debug, Clone, Default)]
pub struct Latency {
    pub rate: u64,
    pub published: u64,
    pub received: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub samples: usize,
    /// Highest resident memory seen while the rate was held (KiB), after the first second.
    pub steady_rss_kib: u64,
    /// The gateway's CPU time per reading while the rate was held (µs), after the first second.
    pub cpu_us_per_reading: f64,
    /// Bytes the gateway wrote to storage per reading, and its durable outbox commits a second,
    /// while the rate was held, after the first second.
    pub disk_bytes_per_reading: f64,
    pub commits_per_second: f64,
}

/// What the gRPC subscriber saw.
#[derive(Debug, Default)]
struct Seen {
    records: AtomicU64,
    /// Latencies are noted for readings sent at or after this time (µs since the epoch); 0: none.
    recording_since_us: AtomicI64,
    latencies_us: Mutex<Vec<i64>>,
}

/// Runs the benchmark with the gateway binary `gateway`.
pub async fn run(gateway: &std::path::Path, settings: &Settings) -> Figures {
    let mut figures = Figures::default();
    // Acknowledgement after commit needs room for a commit's worth of messages in flight.
    let broker = Mosquitto::with_max_inflight(settings.broker_inflight);
    let load = |rate: Option<u64>, qos: u8, id: &str| Load {
        port: broker.port,
        devices: settings.devices,
        rate,
        duration: settings.phase,
        qos,
        connections: settings.connections,
        pad: 0,
        window: 1_000,
        client_id: format!("load-{id}"),
    };
    let warmup = settings.phase.mul_f64(0.2);

    // The yardsticks: a subscriber that only counts, through the same broker, same load; at QoS 0,
    // and at QoS 1 acknowledging each message as it arrives.
    for qos in [0, 1] {
        let bare = BareSubscriber::start(broker.port, qos);
        let spec = load(settings.full_rate, qos, &format!("bare-{qos}"));
        let publisher = std::thread::spawn(move || load::publish(&spec));
        tokio::time::sleep(warmup).await;
        let (c0, cpu0, t0) = (bare.counted(), bare.cpu_seconds(), Instant::now());
        tokio::time::sleep(settings.phase - warmup.mul_f64(2.0)).await;
        let (c1, cpu1, t1) = (bare.counted(), bare.cpu_seconds(), Instant::now());
        let sent = publisher
            .join()
            .expect("publisher")
            .expect("the load reaches the broker");
        let rate = (c1 - c0) as f64 / (t1 - t0).as_secs_f64();
        if qos == 0 {
            (figures.bare_rate, figures.bare_published_rate) = (rate, sent.rate());
            figures.bare_cpu_s_per_million = (cpu1 - cpu0) / ((c1 - c0) as f64).max(1.0) * 1e6;
        } else {
            (figures.bare_qos1_rate, figures.bare_qos1_published_rate) = (rate, sent.rate());
        }
        drop(bare);
        // Let the broker drain what it still queues for the bare subscriber.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // Run as deployed: the systemd unit, the container file and the Kubernetes manifest all set
    // these for glibc's malloc.
    let gw = Gateway::start_with_env(
        gateway,
        &config(
            broker.port,
            "hubgate-bench",
            &format!("{}\n{POLICY}", settings.extra_config),
        ),
        &MALLOC,
    );
    gw.wait_ready();
    let seen = Arc::new(Seen::default());
    let subscriber = grpc_subscriber(&gw, Arc::clone(&seen)).await;
    let mut client = gw.client().await;
    let energy = |client: &mut v1::gateway_client::GatewayClient<_>| {
        let mut client = client.clone();
        async move {
            client
                .get_footprint(v1::GetFootprintRequest {})
                .await
                .expect("GetFootprint")
                .into_inner()
        }
    };
    let received = || gw.metric("hubgate_mqtt_messages_received_total", &[]);
    let commits = || gw.metric("hubgate_outbox_commits_total", &[]);

    // Full load, QoS 0.
    {
        let spec = load(settings.full_rate, 0, "peak");
        let publisher = std::thread::spawn(move || load::publish(&spec));
        tokio::time::sleep(warmup).await;
        // The meter samples once a second: its figures at both ends cover whole samples.
        let f0 = energy(&mut client).await;
        let (r0, c0, g0, t0, w0) = (
            received(),
            gw.cpu_seconds(),
            seen.records.load(Ordering::Relaxed),
            Instant::now(),
            gw.disk_written_bytes(),
        );
        tokio::time::sleep(settings.phase - warmup.mul_f64(2.0)).await;
        let (r1, c1, g1, t1, w1) = (
            received(),
            gw.cpu_seconds(),
            seen.records.load(Ordering::Relaxed),
            Instant::now(),
            gw.disk_written_bytes(),
        );
        let f1 = energy(&mut client).await;
        let sent = publisher
            .join()
            .expect("publisher")
            .expect("the load reaches the broker");
        let seconds = (t1 - t0).as_secs_f64();
        figures.peak_rate = (r1 - r0) / seconds;
        figures.peak_grpc_rate = (g1 - g0) as f64 / seconds;
        figures.peak_published_rate = sent.rate();
        figures.cpu_s_per_million = (c1 - c0) / (r1 - r0).max(1.0) * 1e6;
        figures.disk_bytes_per_reading = (w1 - w0) as f64 / (r1 - r0).max(1.0);
        let readings = f1.readings_received.saturating_sub(f0.readings_received);
        figures.joules_per_million =
            (f1.energy_joules - f0.energy_joules) / (readings.max(1) as f64) * 1e6;
        figures.energy_method = f1.energy_method;
        // Let the gateway catch up with what the broker queued for it.
        settle(&received).await;
    }

    // Latency and memory at fixed rates.
    for &rate in &settings.rates {
        let spec = load(Some(rate), 0, &format!("rate{rate}"));
        // What the full-load phase left queued is delivered first.
        settle(&|| seen.records.load(Ordering::Relaxed) as f64).await;
        let r0 = received();
        seen.latencies_us
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        let publisher = std::thread::spawn(move || load::publish(&spec));
        tokio::time::sleep(warmup).await;
        seen.recording_since_us
            .store(load::now_us(), Ordering::Relaxed);
        let mut steady_rss = 0;
        let (cpu0, held0, w0) = (gw.cpu_seconds(), received(), gw.disk_written_bytes());
        let (commits0, start) = (commits(), Instant::now());
        let end = start + settings.phase - warmup;
        while Instant::now() < end {
            steady_rss = steady_rss.max(gw.rss_kib());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let held = (received() - held0).max(1.0);
        let cpu_us_per_reading = (gw.cpu_seconds() - cpu0) / held * 1e6;
        let disk_bytes_per_reading = (gw.disk_written_bytes() - w0) as f64 / held;
        let commits_per_second = (commits() - commits0) / start.elapsed().as_secs_f64();
        let sent = publisher
            .join()
            .expect("publisher")
            .expect("the load reaches the broker");
        let deadline = Instant::now() + Duration::from_secs(30);
        while received() - r0 < sent.messages() as f64 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        settle(&|| seen.records.load(Ordering::Relaxed) as f64).await;
        seen.recording_since_us.store(0, Ordering::Relaxed);
        let mut latencies = std::mem::take(
            &mut *seen
                .latencies_us
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        latencies.sort_unstable();
        let at = |q: f64| -> f64 {
            if latencies.is_empty() {
                return f64::NAN;
            }
            let i = ((latencies.len() - 1) as f64 * q).round() as usize;
            latencies[i] as f64 / 1000.0
        };
        figures.latency.push(Latency {
            rate,
            published: sent.messages(),
            received: (received() - r0) as u64,
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: at(1.0),
            samples: latencies.len(),
            steady_rss_kib: steady_rss,
            cpu_us_per_reading,
            disk_bytes_per_reading,
            commits_per_second,
        });
    }

    // QoS 1, acknowledged after commit: as fast as it goes, and nothing lost.
    {
        let spec = load(settings.full_rate, 1, "qos1");
        settle(&|| seen.records.load(Ordering::Relaxed) as f64).await;
        let (r0, g0) = (received(), seen.records.load(Ordering::Relaxed));
        let (cpu0, w0) = (gw.cpu_seconds(), gw.disk_written_bytes());
        let start = Instant::now();
        let sent = std::thread::spawn(move || load::publish(&spec))
            .join()
            .expect("publisher")
            .expect("the load reaches the broker");
        let target = r0 + sent.messages() as f64;
        let deadline = Instant::now() + Duration::from_secs(60);
        while received() < target && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = start.elapsed();
        figures.qos1_cpu_s_per_million =
            (gw.cpu_seconds() - cpu0) / (received() - r0).max(1.0) * 1e6;
        figures.qos1_disk_bytes_per_reading =
            (gw.disk_written_bytes() - w0) as f64 / (received() - r0).max(1.0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.records.load(Ordering::Relaxed) - g0 < sent.messages()
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        figures.qos1_published = sent.messages();
        figures.qos1_broker_acked = sent.acked;
        figures.qos1_received = (received() - r0) as u64;
        figures.qos1_records = seen.records.load(Ordering::Relaxed) - g0;
        figures.qos1_rate = figures.qos1_received as f64 / elapsed.as_secs_f64();
    }

    if let Some(soak) = settings.soak {
        let rate = settings.rates.last().copied().unwrap_or(50_000);
        let mut spec = load(Some(rate), 0, "soak");
        spec.duration = soak;
        let publisher = std::thread::spawn(move || load::publish(&spec));
        let end = Instant::now() + soak;
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_secs(10)).await;
            figures.soak_rss_kib.push(gw.rss_kib());
        }
        publisher
            .join()
            .expect("publisher")
            .expect("the load reaches the broker");
        settle(&received).await;
    }

    figures.peak_rss_kib = gw.peak_rss_kib();
    figures.outbox_live_bytes = gw.metric("hubgate_outbox_bytes", &[]) as u64;
    // Records held: kept, less those purged (a long soak fills `store.max_bytes`).
    figures.outbox_records = ["air", "footfall", "footfall_counts", "parking", "noise"]
        .iter()
        .map(|s| {
            let kept = gw.metric("hubgate_records_kept_total", &[("stream", s)]);
            let purged: f64 = ["retention", "capacity"]
                .iter()
                .map(|r| {
                    gw.metric(
                        "hubgate_store_records_purged_total",
                        &[("stream", s), ("reason", r)],
                    )
                })
                .sum();
            (kept - purged).max(0.0) as u64
        })
        .sum();
    figures.outbox_disk_bytes = disk_usage(&gw.dir().join("hubgate-data/outbox"));
    subscriber.abort();
    drop(gw);
    figures
}

/// Waits until the gateway's intake has been still for half a second (at most 30 s).
async fn settle(received: &impl Fn() -> f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = received();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = received();
        if now == last {
            return;
        }
        last = now;
    }
}

/// Bytes the files under `dir` take on disk (allocated blocks, not their lengths).
pub fn disk_usage(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// A rumqttc subscriber to `city/#` that counts messages and does nothing else; at QoS 1,
/// rumqttc acknowledges each message as it reads it. It runs on a thread of its own, with a
/// single-threaded runtime, so that its CPU time can be read apart from the generator's.
struct BareSubscriber {
    counted: Arc<AtomicU64>,
    /// The thread's id, for /proc/self/task/TID/stat.
    tid: u32,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BareSubscriber {
    /// Starts it and returns once the broker has confirmed the subscription.
    fn start(port: u16, qos: u8) -> Self {
        let counted = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = {
            let counted = Arc::clone(&counted);
            std::thread::Builder::new()
                .name(format!("bare-subscriber-{qos}"))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    runtime.block_on(async move {
                        tokio::select! {
                            _ = stopped => {}
                            () = subscribe_and_count(port, qos, &counted, ready_tx) => {}
                        }
                    });
                })
                .expect("spawn the bare subscriber")
        };
        let tid = ready
            .recv_timeout(Duration::from_secs(10))
            .expect("the bare subscriber is subscribed");
        Self {
            counted,
            tid,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn counted(&self) -> u64 {
        self.counted.load(Ordering::Relaxed)
    }

    /// The subscriber thread's CPU time so far, in seconds (Linux).
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{}/stat", self.tid))
            .expect("read /proc/self/task/TID/stat");
        crate::cpu_seconds_of_stat(&stat)
    }
}

impl Drop for BareSubscriber {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The calling thread's id (Linux).
fn thread_id() -> u32 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|link| link.file_name()?.to_str()?.parse().ok())
        .expect("read /proc/thread-self")
}

/// The bare subscriber's loop: sends its thread's id on `ready` once subscribed.
async fn subscribe_and_count(
    port: u16,
    qos: u8,
    counted: &AtomicU64,
    ready: std::sync::mpsc::Sender<u32>,
) {
    let mut options = MqttOptions::new(format!("bare-subscriber-{qos}"), "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let qos = if qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    client.subscribe("city/#", qos).await.expect("subscribe");
    let mut ready = Some(ready);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(_))) => {
                counted.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(thread_id());
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A gRPC subscriber to the pass-through streams, live, counting records and noting the
/// publish-to-delivery latency of each reading sent since `recording_since_us`.
async fn grpc_subscriber(gw: &Gateway, seen: Arc<Seen>) -> tokio::task::JoinHandle<()> {
    let mut records = gw
        .client()
        .await
        .subscribe(subscribe_request(
            &PASS_THROUGH,
            Position::Live(v1::Live {}),
        ))
        .await
        .expect("subscribe")
        .into_inner();
    tokio::spawn(async move {
        while let Some(Ok(event)) = records.next().await {
            let Some(v1::subscribe_response::Event::Record(record)) = event.event else {
                continue;
            };
            seen.records.fetch_add(1, Ordering::Relaxed);
            let since = seen.recording_since_us.load(Ordering::Relaxed);
            if since > 0
                && let Some(v1::Value {
                    kind: Some(v1::value::Kind::IntValue(sent_us)),
                }) = record.fields.get("sent_us")
                && *sent_us >= since
            {
                let latency = load::now_us() - sent_us;
                seen.latencies_us
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(latency);
            }
        }
    })
}

impl Figures {
    /// The table the benchmark command prints, with the goals of issue 9 beside each figure.
    pub fn table(&self, settings: &Settings) -> String {
        use std::fmt::Write as _;
        let mut t = String::new();
        let ratio = self.peak_rate / self.bare_rate;
        let met = |ok: bool| if ok { "yes" } else { "NO" };
        let _ = writeln!(t, "| figure | measured | goal | met |\n|---|---|---|---|");
        // When the subscriber took nearly all that was published, the generator set the pace:
        // the figure is a floor of the subscriber's capacity, and the ratio below a ceiling.
        let generator_bound = self.bare_rate >= 0.95 * self.bare_published_rate;
        let _ = writeln!(
            t,
            "| bare rumqttc subscriber, QoS 0 (published meanwhile) | {:.0}/s ({:.0}/s){} | | |",
            self.bare_rate,
            self.bare_published_rate,
            if generator_bound {
                "; the generator set the pace"
            } else {
                ""
            }
        );
        let _ = writeln!(
            t,
            "| hubgate sustained, QoS 0, readings in (published meanwhile) | {:.0}/s ({:.0}/s) | ≥ 100,000/s | {} |",
            self.peak_rate,
            self.peak_published_rate,
            met(self.peak_rate >= 100_000.0)
        );
        let _ = writeln!(
            t,
            "| hubgate ÷ bare subscriber | {ratio:.2} | ≥ 0.45 | {} |",
            met(ratio >= 0.45)
        );
        let _ = writeln!(
            t,
            "| records to the gRPC subscriber at full load | {:.0}/s | | |",
            self.peak_grpc_rate
        );
        let _ = writeln!(
            t,
            "| gateway CPU per reading at full load | {:.2} µs ({:.2} CPU-s per million) | ≤ 5 µs | {} |",
            self.cpu_s_per_million,
            self.cpu_s_per_million,
            met(self.cpu_s_per_million <= 5.0)
        );
        let _ = writeln!(
            t,
            "| bare rumqttc subscriber's CPU per reading, QoS 0 (its thread alone) | {:.2} µs | | |",
            self.bare_cpu_s_per_million
        );
        let _ = writeln!(
            t,
            "| hubgate's CPU per reading ÷ the bare subscriber's | {:.2} | | |",
            self.cpu_s_per_million / self.bare_cpu_s_per_million
        );
        for l in &self.latency {
            let goal = match l.rate {
                10_000 => Some(5.0),
                50_000 => Some(20.0),
                _ => None,
            };
            let _ = writeln!(
                t,
                "| publish→gRPC latency at {}/s: p50 / p99 / max ({} samples; {} of {} readings in) | {:.2} / {:.2} / {:.2} ms | {} | {} |",
                l.rate,
                l.samples,
                l.received,
                l.published,
                l.p50_ms,
                l.p99_ms,
                l.max_ms,
                goal.map_or(String::new(), |g| format!("p99 ≤ {g} ms")),
                goal.map_or("", |g| met(l.p99_ms <= g))
            );
            let _ = writeln!(
                t,
                "| gateway CPU per reading at {}/s | {:.2} µs | | |",
                l.rate, l.cpu_us_per_reading
            );
            let _ = writeln!(
                t,
                "| bytes written to disk per reading at {}/s; durable commits a second | {:.0} B ({:.1} MB/s); {:.0}/s | | |",
                l.rate,
                l.disk_bytes_per_reading,
                l.disk_bytes_per_reading * l.rate as f64 / 1e6,
                l.commits_per_second
            );
            let _ = writeln!(
                t,
                "| resident memory, steady at {}/s from {} devices | {:.1} MiB | {} | {} |",
                l.rate,
                settings.devices,
                l.steady_rss_kib as f64 / 1024.0,
                if l.rate == 50_000 { "≤ 32 MiB" } else { "" },
                if l.rate == 50_000 {
                    met(l.steady_rss_kib <= 32 * 1024)
                } else {
                    ""
                }
            );
        }
        let lost = self.qos1_published.saturating_sub(self.qos1_received);
        let _ = writeln!(
            t,
            // No pace flag here: at QoS 1 the generator publishes only as fast as the broker
            // acknowledges, so the subscriber always takes nearly all of it.
            "| bare rumqttc subscriber, QoS 1, acknowledging on receipt (published meanwhile) | {:.0}/s ({:.0}/s) | | |",
            self.bare_qos1_rate, self.bare_qos1_published_rate,
        );
        let _ = writeln!(
            t,
            "| QoS 1, acknowledged after commit ({} published, {} taken in, {} records out) | {:.0}/s, {} lost | ≥ 60,000/s, none lost | {} |",
            self.qos1_published,
            self.qos1_received,
            self.qos1_records,
            self.qos1_rate,
            lost,
            met(self.qos1_rate >= 60_000.0
                && lost == 0
                && self.qos1_records >= self.qos1_published)
        );
        let _ = writeln!(
            t,
            "| hubgate ÷ bare subscriber, QoS 1 | {:.2} | | |",
            self.qos1_rate / self.bare_qos1_rate
        );
        let _ = writeln!(
            t,
            "| gateway CPU per reading at QoS 1 | {:.2} µs | | |",
            self.qos1_cpu_s_per_million
        );
        let _ = writeln!(
            t,
            "| bytes written to disk per reading: full load, QoS 0 / QoS 1 | {:.0} / {:.0} B | | |",
            self.disk_bytes_per_reading, self.qos1_disk_bytes_per_reading
        );
        let _ = writeln!(
            t,
            "| peak resident memory over the run (overload included) | {:.1} MiB | ≤ 64 MiB | {} |",
            self.peak_rss_kib as f64 / 1024.0,
            met(self.peak_rss_kib <= 64 * 1024)
        );
        let disk_ratio = self.outbox_disk_bytes as f64 / self.outbox_live_bytes.max(1) as f64;
        let _ = writeln!(
            t,
            "| outbox on disk ({} records; {:.0} B of live data per record) | {:.0} B per record, {disk_ratio:.2}× the live data | ≤ 1.5× | {} |",
            self.outbox_records,
            self.outbox_live_bytes as f64 / self.outbox_records.max(1) as f64,
            self.outbox_disk_bytes as f64 / self.outbox_records.max(1) as f64,
            met(disk_ratio <= 1.5)
        );
        let _ = writeln!(
            t,
            "| energy per million readings at full load (meter: {}) | {:.1} J ({:.2} mWh) | | |",
            self.energy_method,
            self.joules_per_million,
            self.joules_per_million / 3.6
        );
        if !self.soak_rss_kib.is_empty() {
            let mib: Vec<String> = self
                .soak_rss_kib
                .iter()
                .map(|k| format!("{:.1}", *k as f64 / 1024.0))
                .collect();
            let _ = writeln!(
                t,
                "| soak: resident memory every 10 s (MiB) | {} | flat | |",
                mib.join(" ")
            );
        }
        t
    }
}
