//! The gateway's own footprint, sampled every five seconds: energy into
//! `hubgate_energy_joules_total` (see [`hubgate_exporters::energy`] for the method, its sources and
//! its uncertainty), embodied carbon into `hubgate_carbon_embodied_grams_total`, and, when the
//! grid's carbon intensity is configured, operational carbon into
//! `hubgate_carbon_operational_grams_total` and the Software Carbon Intensity per 1,000 readings
//! kept into `hubgate_sci_grams_per_1000_readings` (see [`hubgate_exporters::carbon`]).
//!
//! `hubgate_footprint_info` names the method in use (`rapl` or `model`) with its zones or its
//! coefficients, so that every figure can be traced to how it was obtained. The meter reads a
//! handful of small procfs and sysfs files per sample: it samples, it does not trace.
//!
//! Not yet here: bytes moved and avoided, the gRPC `GetFootprint` call and the demo's footprint
//! line.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hubgate_exporters::carbon::{self, Embodied};
use hubgate_exporters::catalogue;
use hubgate_exporters::energy::{Coefficients, Meter, Method};
use hubgate_exporters::prometheus::add_float_counter;
use tokio_util::sync::CancellationToken;

use crate::config::FootprintConfig;
use crate::pipeline::Stats;

/// How often the meter is read.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// The method of the running meter (`rapl` or `model`), once known.
static METHOD: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// The method of the running meter, for summaries; `None` before the meter starts.
pub fn method() -> Option<&'static str> {
    METHOD.get().copied()
}

/// Samples the meter until `shutdown`; `stats` counts the readings kept (SCI's unit).
pub async fn run(
    config: FootprintConfig,
    stats: Arc<Stats>,
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
    let intensity = config.grid_intensity_g_per_kwh;
    metrics::gauge!(
        catalogue::CARBON_INFO,
        "grid_intensity_g_per_kwh" => intensity.map_or_else(|| "unset".to_owned(), |i| i.to_string()),
        "embodied_kg" => embodied.kg.to_string(),
        "lifetime_years" => embodied.lifetime_years.to_string(),
        "hardware_share" => embodied.share.to_string()
    )
    .set(1.0);
    let sci = metrics::gauge!(catalogue::SCI);
    let bytes_avoided = metrics::counter!(catalogue::BYTES_AVOIDED);
    let mut avoided_before = 0u64;
    let (mut operational_total, mut embodied_total) = (0.0, 0.0);
    let mut meter = match Meter::new(
        Path::new("/sys/class/powercap"),
        Path::new("/proc"),
        coefficients,
        vcpus,
    ) {
        Ok(meter) => meter,
        Err(err) => {
            tracing::warn!(%err, "no energy meter: /proc cannot be read");
            return Ok(());
        }
    };
    let _ = METHOD.set(meter.method_name());
    match meter.method() {
        Method::Rapl(rapl) => {
            let zones = rapl.zones().join(",");
            tracing::info!(%zones, "energy measured with RAPL");
            metrics::gauge!(catalogue::FOOTPRINT_INFO, "method" => "rapl", "zones" => zones)
                .set(1.0);
        }
        Method::Model { reason } => {
            tracing::info!(%reason, vcpus, "energy modelled: no sensor can be read");
            metrics::gauge!(
                catalogue::FOOTPRINT_INFO,
                "method" => "model",
                "idle_watts_per_vcpu" => coefficients.idle_watts_per_vcpu.to_string(),
                "max_watts_per_vcpu" => coefficients.max_watts_per_vcpu.to_string(),
                "memory_watts_per_gb" => coefficients.memory_watts_per_gb.to_string(),
                "vcpus" => vcpus.to_string()
            )
            .set(1.0);
        }
    }
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.tick().await;
    let mut last = Instant::now();
    let mut failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let elapsed = last.elapsed().as_secs_f64();
        last = Instant::now();
        // Minimisation: payload bytes in, minus the content kept from them (the fields of the
        // records kept; their envelope of stream, sequence, time and policy hash is the API's
        // own cost, counted in the bytes sent).
        let received = stats.received_bytes.load(Ordering::Relaxed);
        let kept: u64 = stats
            .streams
            .iter()
            .map(|s| s.field_bytes_kept.load(Ordering::Relaxed))
            .sum();
        let avoided = received.saturating_sub(kept).max(avoided_before);
        let delta = avoided - avoided_before;
        avoided_before = avoided;
        bytes_avoided.increment(delta);
        add_float_counter(
            catalogue::NETWORK_ENERGY_AVOIDED_JOULES,
            "attributional network energy of the bytes avoided, at the configured kWh per GB (apart from SCI)",
            delta as f64 / 1e9 * config.network_kwh_per_gb * carbon::JOULES_PER_KWH,
        );
        let embodied_grams = carbon::embodied_grams(elapsed, &embodied);
        embodied_total += embodied_grams;
        add_float_counter(
            catalogue::CARBON_EMBODIED_GRAMS,
            "embodied emissions of the hardware attributed to the gateway's running time, gCO2e",
            embodied_grams,
        );
        match meter.sample(elapsed) {
            Ok(sample) => {
                failing = false;
                add_float_counter(
                    catalogue::ENERGY_JOULES,
                    "energy attributed to the gateway process, measured or modelled (see hubgate_footprint_info)",
                    sample.joules,
                );
                if let Some(intensity) = intensity {
                    let grams = carbon::operational_grams(sample.joules, intensity);
                    operational_total += grams;
                    add_float_counter(
                        catalogue::CARBON_OPERATIONAL_GRAMS,
                        "emissions of the energy the gateway used, at the configured grid intensity, gCO2e",
                        grams,
                    );
                    let readings: u64 = stats
                        .streams
                        .iter()
                        .map(|s| s.records_kept.load(Ordering::Relaxed))
                        .sum();
                    if let Some(value) =
                        carbon::sci_per_1000(operational_total, embodied_total, readings)
                    {
                        sci.set(value);
                    }
                }
            }
            Err(err) if !failing => {
                failing = true;
                tracing::warn!(%err, "the energy meter cannot be read; retrying");
            }
            Err(_) => {}
        }
    }
}
