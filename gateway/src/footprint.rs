//! The gateway's own energy use, sampled every five seconds into `hubgate_energy_joules_total`
//! (see [`hubgate_exporters::energy`] for the method, its sources and its uncertainty).
//!
//! `hubgate_footprint_info` names the method in use (`rapl` or `model`) with its zones or its
//! coefficients, so that every figure can be traced to how it was obtained. The meter reads a
//! handful of small procfs and sysfs files per sample: it samples, it does not trace.
//!
//! Not yet here: carbon (grid intensity, embodied emissions, SCI), bytes moved and avoided, the
//! gRPC `GetFootprint` call and the demo's footprint line.

use std::path::Path;
use std::time::{Duration, Instant};

use hubgate_exporters::catalogue;
use hubgate_exporters::energy::{Coefficients, Meter, Method};
use hubgate_exporters::prometheus::add_float_counter;
use tokio_util::sync::CancellationToken;

/// How often the meter is read.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Samples the meter until `shutdown`.
pub async fn run(shutdown: CancellationToken) -> anyhow::Result<()> {
    let vcpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let coefficients = Coefficients::default();
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
        match meter.sample(elapsed) {
            Ok(sample) => {
                failing = false;
                add_float_counter(
                    catalogue::ENERGY_JOULES,
                    "energy attributed to the gateway process, measured or modelled (see hubgate_footprint_info)",
                    sample.joules,
                );
            }
            Err(err) if !failing => {
                failing = true;
                tracing::warn!(%err, "the energy meter cannot be read; retrying");
            }
            Err(_) => {}
        }
    }
}
