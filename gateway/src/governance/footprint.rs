//! The gateway's own footprint, sampled every `footprint.sample_every` (5 s by default): energy
//! into `hubgate_energy_joules_total` (see [`hubgate_exporters::energy`] for the method, its
//! sources and its uncertainty), embodied carbon into `hubgate_carbon_embodied_grams_total`, and,
//! while the grid's carbon intensity is known (a fixed value, or an hourly file per zone),
//! operational carbon into `hubgate_carbon_operational_grams_total` and the Software Carbon
//! Intensity per 1,000 readings kept into `hubgate_sci_grams_per_1000_readings` (see
//! [`hubgate_exporters::carbon`]). Bytes moved and avoided are counted as they move and read at
//! each sample.
//!
//! `hubgate_footprint_info` names the energy method in use (`rapl`, `hwmon` or `model`) with its
//! counters or its coefficients, and `hubgate_carbon_info` the carbon figures' inputs, so that
//! every figure can be traced to how it was obtained. The same figures go to gRPC as a
//! [`v1::Footprint`] after every sample (`GetFootprint`, `WatchFootprint`). The meter reads a
//! handful of small procfs and sysfs files per sample: it samples, it does not trace.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use hubgate_exporters::carbon::{self, Embodied, HourlyIntensity};
use hubgate_exporters::catalogue;
use hubgate_exporters::energy::{Coefficients, Meter, Method};
use hubgate_exporters::prometheus::add_float_counter;
use hubgate_proto::v1;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::FootprintConfig;
use crate::telemetry::stats::{Stats, TRAFFIC};

/// Where the grid's carbon intensity comes from: an hourly file, a fixed value for the hours the
/// file lacks (or for every hour without a file), or nothing.
#[derive(Debug)]
pub struct GridIntensity {
    fixed: Option<f64>,
    file: Option<IntensityFile>,
}

#[derive(Debug)]
struct IntensityFile {
    path: PathBuf,
    zone: Option<String>,
    modified: Option<SystemTime>,
    table: HourlyIntensity,
    /// The last reload failed (warned about once until it succeeds).
    failing: bool,
}

impl IntensityFile {
    fn read(
        path: &PathBuf,
        zone: Option<&str>,
    ) -> anyhow::Result<(HourlyIntensity, Option<SystemTime>)> {
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the grid intensity file {}", path.display()))?;
        let table = HourlyIntensity::parse(&text, zone)
            .map_err(|e| anyhow::anyhow!("{}:{e}", path.display()))?;
        Ok((table, modified))
    }
}

impl GridIntensity {
    /// Reads the configured intensities; an hourly file with errors is refused, naming the line
    /// and column.
    pub fn load(config: &FootprintConfig) -> anyhow::Result<Self> {
        let file = match &config.grid_intensity_file {
            Some(path) => {
                let zone = config.grid_zone.as_deref();
                let (table, modified) = IntensityFile::read(path, zone)?;
                Some(IntensityFile {
                    path: path.clone(),
                    zone: config.grid_zone.clone(),
                    modified,
                    table,
                    failing: false,
                })
            }
            None => None,
        };
        Ok(Self {
            fixed: config.grid_intensity_g_per_kwh,
            file,
        })
    }

    /// Reads the file again if it changed; a changed file with errors leaves the previous table
    /// in use, with a warning.
    fn refresh(&mut self) {
        let Some(file) = &mut self.file else {
            return;
        };
        let modified = std::fs::metadata(&file.path)
            .and_then(|m| m.modified())
            .ok();
        if modified == file.modified {
            return;
        }
        match IntensityFile::read(&file.path, file.zone.as_deref()) {
            Ok((table, modified)) => {
                tracing::info!(
                    zone = table.zone(),
                    hours = table.len(),
                    "grid intensity file reloaded"
                );
                file.table = table;
                file.modified = modified;
                file.failing = false;
            }
            Err(err) if !file.failing => {
                file.failing = true;
                tracing::warn!(%err, "the grid intensity file changed but cannot be used; keeping the previous one");
            }
            Err(_) => {}
        }
    }

    /// The intensity for the hour holding `unix_seconds` and where it came from.
    fn at(&self, unix_seconds: u64) -> Option<(f64, &'static str)> {
        self.file
            .as_ref()
            .and_then(|f| f.table.at(unix_seconds))
            .map(|g| (g, "file"))
            .or(self.fixed.map(|g| (g, "fixed")))
    }
}

/// The footprint's totals since the process started, kept across configuration reloads (each
/// gateway started in the process counts its readings afresh in its own [`Stats`]), and the
/// channel their snapshots are published on.
#[derive(Debug)]
pub struct Ledger {
    totals: std::sync::Mutex<Totals>,
    publish: watch::Sender<v1::Footprint>,
}

impl Default for Ledger {
    fn default() -> Self {
        Self::new()
    }
}

impl Ledger {
    /// Empty totals, counted from now.
    pub fn new() -> Self {
        let now = prost_types::Timestamp::from(SystemTime::now());
        let (publish, _) = watch::channel(v1::Footprint {
            sampled_at: Some(now),
            since: Some(now),
            ..v1::Footprint::default()
        });
        Self {
            totals: std::sync::Mutex::new(Totals::default()),
            publish,
        }
    }

    /// The latest snapshot, and each new one.
    pub fn watch(&self) -> watch::Receiver<v1::Footprint> {
        self.publish.subscribe()
    }

    /// The totals, with the previous gateway's readings moved into the earlier runs' counts.
    fn begin_run(&self) -> Totals {
        let mut totals = self
            .totals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        totals.before.add(&totals.run);
        totals.run = Counts::default();
        totals
    }

    fn save(&self, totals: &Totals) {
        *self
            .totals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = totals.clone();
    }
}

/// Samples the meter until `shutdown`, publishing each sample's figures through `ledger`;
/// `stats` counts the readings received and kept (SCI's unit) by the running gateway.
pub async fn run(
    config: FootprintConfig,
    mut intensity: GridIntensity,
    stats: Arc<Stats>,
    ledger: Arc<Ledger>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let vcpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let coefficients = Coefficients {
        idle_watts_per_vcpu: config.idle_watts_per_vcpu,
        max_watts_per_vcpu: config.max_watts_per_vcpu,
        memory_watts_per_gb: config.memory_watts_per_gb,
    };
    let embodied = Embodied {
        kg: config.embodied_kg,
        lifetime_years: config.lifetime_years,
        share: config.hardware_share,
    };
    describe_carbon(&config, &intensity, &embodied);
    let sci_gauge = metrics::gauge!(catalogue::SCI);
    let intensity_gauge = metrics::gauge!(catalogue::GRID_INTENSITY);
    let bytes_avoided = metrics::counter!(catalogue::BYTES_AVOIDED);
    let meter = match Meter::new(
        std::path::Path::new("/sys/class"),
        std::path::Path::new("/proc"),
        coefficients,
        vcpus,
    ) {
        Ok(meter) => meter,
        Err(err) => {
            tracing::warn!(%err, "no energy meter: /proc cannot be read");
            return Ok(());
        }
    };
    let parameters = describe_method(&meter, coefficients, vcpus);
    let totals = ledger.begin_run();
    let since = ledger.publish.borrow().since;
    let mut sampler = Sampler {
        method_name: meter.method_name(),
        meter,
        parameters,
        embodied,
        network_kwh_per_gb: config.network_kwh_per_gb,
        since,
        totals,
        failing: false,
        sci_gauge,
        intensity_gauge,
        bytes_avoided,
    };
    sampler.totals.run.observe(&stats);
    ledger
        .publish
        .send_replace(sampler.snapshot(intensity.at(unix_now())));
    let mut tick = tokio::time::interval(config.sample_every);
    tick.tick().await;
    let mut last = Instant::now();
    loop {
        // On a stop or a reload, one last sample counts the time since the previous one.
        let stopping = tokio::select! {
            () = shutdown.cancelled() => true,
            _ = tick.tick() => false,
        };
        let elapsed = last.elapsed().as_secs_f64();
        last = Instant::now();
        let current = sampler.sample(elapsed, &stats, &mut intensity);
        sampler.publish(&ledger, current);
        if stopping {
            return Ok(());
        }
    }
}

/// Sets `hubgate_carbon_info`: the inputs of the carbon figures.
fn describe_carbon(config: &FootprintConfig, intensity: &GridIntensity, embodied: &Embodied) {
    let shown = |o: Option<String>| o.unwrap_or_else(|| "unset".to_owned());
    metrics::gauge!(
        catalogue::CARBON_INFO,
        "grid_intensity_g_per_kwh" => shown(config.grid_intensity_g_per_kwh.map(|i| i.to_string())),
        "grid_intensity_file" => shown(config.grid_intensity_file.as_ref().map(|p| p.display().to_string())),
        "grid_zone" => shown(intensity.file.as_ref().map(|f| f.table.zone().to_owned())),
        "embodied_kg" => embodied.kg.to_string(),
        "lifetime_years" => embodied.lifetime_years.to_string(),
        "hardware_share" => embodied.share.to_string()
    )
    .set(1.0);
}

/// Logs how the energy is obtained and sets `hubgate_footprint_info` to it: the method and its
/// parameters (the counters, or the model's coefficients), which are returned.
fn describe_method(
    meter: &Meter,
    coefficients: Coefficients,
    vcpus: usize,
) -> HashMap<String, String> {
    let method_name = meter.method_name();
    let parameters: HashMap<String, String> = match meter.method() {
        Method::Sensor(counters) => {
            let zones = counters.zones().join(",");
            tracing::info!(method = method_name, %zones, "energy measured with counters");
            HashMap::from([("zones".to_owned(), zones)])
        }
        Method::Model { reason } => {
            tracing::info!(%reason, vcpus, "energy modelled: no energy counter can be read");
            HashMap::from([
                (
                    "idle_watts_per_vcpu".to_owned(),
                    coefficients.idle_watts_per_vcpu.to_string(),
                ),
                (
                    "max_watts_per_vcpu".to_owned(),
                    coefficients.max_watts_per_vcpu.to_string(),
                ),
                (
                    "memory_watts_per_gb".to_owned(),
                    coefficients.memory_watts_per_gb.to_string(),
                ),
                ("vcpus".to_owned(), vcpus.to_string()),
            ])
        }
    };
    let mut labels: Vec<(String, String)> = parameters
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.sort();
    labels.insert(0, ("method".to_owned(), method_name.to_owned()));
    let labels: Vec<metrics::Label> = labels
        .into_iter()
        .map(|(k, v)| metrics::Label::new(k, v))
        .collect();
    metrics::gauge!(catalogue::FOOTPRINT_INFO, labels).set(1.0);
    parameters
}

/// The meter and the running totals between samples, with what each snapshot repeats.
struct Sampler {
    meter: Meter,
    method_name: &'static str,
    parameters: HashMap<String, String>,
    embodied: Embodied,
    network_kwh_per_gb: f64,
    /// When the ledger's totals started.
    since: Option<prost_types::Timestamp>,
    totals: Totals,
    /// The last reading of the meter failed (warned about once until it succeeds).
    failing: bool,
    sci_gauge: metrics::Gauge,
    intensity_gauge: metrics::Gauge,
    bytes_avoided: metrics::Counter,
}

impl Sampler {
    /// Counts the `elapsed` seconds since the previous sample into the totals and the counters;
    /// returns the grid intensity they were counted at, if one is known.
    fn sample(
        &mut self,
        elapsed: f64,
        stats: &Stats,
        intensity: &mut GridIntensity,
    ) -> Option<(f64, &'static str)> {
        let totals = &mut self.totals;
        let delta = totals.run.observe(stats);
        self.bytes_avoided.increment(delta);
        let network_joules = delta as f64 / 1e9 * self.network_kwh_per_gb * carbon::JOULES_PER_KWH;
        totals.network_joules_avoided += network_joules;
        add_float_counter(
            catalogue::NETWORK_ENERGY_AVOIDED_JOULES,
            "attributional network energy of the bytes avoided, at the configured kWh per GB (apart from SCI)",
            network_joules,
        );
        let embodied_grams = carbon::embodied_grams(elapsed, &self.embodied);
        totals.embodied_grams += embodied_grams;
        add_float_counter(
            catalogue::CARBON_EMBODIED_GRAMS,
            "embodied emissions of the hardware attributed to the gateway's running time, gCO2e",
            embodied_grams,
        );
        intensity.refresh();
        let current = intensity.at(unix_now());
        match self.meter.sample(elapsed) {
            Ok(sample) => {
                self.failing = false;
                self.count_energy(sample.joules, elapsed, current);
            }
            Err(err) if !self.failing => {
                self.failing = true;
                tracing::warn!(%err, "the energy meter cannot be read; retrying");
            }
            Err(_) => {}
        }
        current
    }

    /// Counts the energy used over `elapsed` seconds, and its operational carbon at the grid
    /// intensity `current` (or the seconds it is missing for).
    fn count_energy(&mut self, joules: f64, elapsed: f64, current: Option<(f64, &'static str)>) {
        let totals = &mut self.totals;
        totals.joules += joules;
        add_float_counter(
            catalogue::ENERGY_JOULES,
            "energy attributed to the gateway process, measured or modelled (see hubgate_footprint_info)",
            joules,
        );
        match current {
            Some((grams_per_kwh, _)) => {
                self.intensity_gauge.set(grams_per_kwh);
                totals.seconds_with_intensity += elapsed;
                let grams = carbon::operational_grams(joules, grams_per_kwh);
                totals.operational_grams += grams;
                add_float_counter(
                    catalogue::CARBON_OPERATIONAL_GRAMS,
                    "emissions of the energy the gateway used, at the grid's intensity, gCO2e",
                    grams,
                );
            }
            None => {
                totals.seconds_without_intensity += elapsed;
                add_float_counter(
                    catalogue::INTENSITY_MISSING_SECONDS,
                    "seconds for which no grid intensity was known (no operational carbon counted)",
                    elapsed,
                );
            }
        }
    }

    /// Saves the totals to `ledger`, sets the SCI gauge and publishes the snapshot.
    fn publish(&self, ledger: &Ledger, current: Option<(f64, &'static str)>) {
        let figures = self.snapshot(current);
        ledger.save(&self.totals);
        if let Some(sci) = figures.sci_grams_per_1000_readings {
            self.sci_gauge.set(sci);
        } else if self.totals.seconds_without_intensity > 0.0 {
            // Undefined rather than understated.
            self.sci_gauge.set(f64::NAN);
        }
        ledger.publish.send_replace(figures);
    }

    /// The figures so far, at the grid intensity `current`.
    fn snapshot(&self, current: Option<(f64, &'static str)>) -> v1::Footprint {
        let totals = &self.totals;
        let readings_kept = totals.before.records_kept + totals.run.records_kept;
        v1::Footprint {
            sampled_at: Some(SystemTime::now().into()),
            since: self.since,
            energy_method: self.method_name.to_owned(),
            energy_method_parameters: self.parameters.clone(),
            energy_joules: totals.joules,
            grid_intensity_g_per_kwh: current.map(|(g, _)| g),
            grid_intensity_source: current.map(|(_, s)| s).unwrap_or_default().to_owned(),
            seconds_without_intensity: totals.seconds_without_intensity,
            carbon_operational_grams: totals.operational_grams,
            carbon_embodied_grams: totals.embodied_grams,
            embodied_kg: self.embodied.kg,
            lifetime_years: self.embodied.lifetime_years,
            hardware_share: self.embodied.share,
            sci_grams_per_1000_readings: totals.sci(readings_kept),
            readings_received: totals.before.readings_received + totals.run.readings_received,
            records_kept: readings_kept,
            mqtt_received_bytes: totals.before.received_bytes + totals.run.received_bytes,
            grpc_sent_bytes: TRAFFIC.grpc_sent.load(Ordering::Relaxed),
            upstream_sent_bytes: TRAFFIC.upstream_sent.load(Ordering::Relaxed),
            nats_sent_bytes: TRAFFIC.nats_sent.load(Ordering::Relaxed),
            outbox_written_bytes: TRAFFIC.outbox_written.load(Ordering::Relaxed),
            bytes_avoided: totals.before.bytes_avoided + totals.run.bytes_avoided,
            network_energy_avoided_joules: totals.network_joules_avoided,
            network_kwh_per_gb: self.network_kwh_per_gb,
        }
    }
}

/// What the footprint counted since the process started.
#[derive(Debug, Default, Clone)]
struct Totals {
    joules: f64,
    operational_grams: f64,
    embodied_grams: f64,
    seconds_without_intensity: f64,
    seconds_with_intensity: f64,
    network_joules_avoided: f64,
    /// Readings and bytes of the gateways that ran before the current one in this process.
    before: Counts,
    /// Of the current one.
    run: Counts,
}

/// Readings and bytes one gateway counted.
#[derive(Debug, Default, Clone)]
struct Counts {
    readings_received: u64,
    records_kept: u64,
    received_bytes: u64,
    bytes_avoided: u64,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.readings_received += other.readings_received;
        self.records_kept += other.records_kept;
        self.received_bytes += other.received_bytes;
        self.bytes_avoided += other.bytes_avoided;
    }

    /// Reads the running gateway's counters; returns the bytes newly avoided.
    fn observe(&mut self, stats: &Stats) -> u64 {
        self.readings_received = stats.received.load(Ordering::Relaxed);
        self.records_kept = stats
            .streams
            .iter()
            .map(|s| s.records_kept.load(Ordering::Relaxed))
            .sum();
        self.received_bytes = stats.received_bytes.load(Ordering::Relaxed);
        // Minimisation: payload bytes in, minus the content kept from them (the fields of the
        // records kept; their envelope of stream, sequence, time and policy hash is the API's
        // own cost, counted in the bytes sent).
        let kept: u64 = stats
            .streams
            .iter()
            .map(|s| s.field_bytes_kept.load(Ordering::Relaxed))
            .sum();
        let avoided = self
            .received_bytes
            .saturating_sub(kept)
            .max(self.bytes_avoided);
        let delta = avoided - self.bytes_avoided;
        self.bytes_avoided = avoided;
        delta
    }
}

impl Totals {
    /// SCI, if every second so far had a grid intensity and a reading was kept.
    fn sci(&self, readings_kept: u64) -> Option<f64> {
        let complete = self.seconds_without_intensity == 0.0 && self.seconds_with_intensity > 0.0;
        complete
            .then(|| {
                carbon::sci_per_1000(self.operational_grams, self.embodied_grams, readings_kept)
            })
            .flatten()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
