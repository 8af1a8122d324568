//! `[footprint]`: how the gateway figures its own energy use and carbon.

use std::time::Duration;

use hubgate_privacy::diagnostics::Diagnostics;
use serde::Deserialize;

use super::keys::Keys;
use super::units::duration;

/// How the gateway's own footprint is figured (see `hubgate_exporters::energy` and
/// `hubgate_exporters::carbon`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FootprintConfig {
    /// Location-based carbon intensity of the grid the hub draws from, in gCO2e per kWh: for every
    /// hour when there is no hourly file, else for the hours the file lacks. No operational carbon
    /// (nor SCI) is reported without an intensity.
    pub grid_intensity_g_per_kwh: Option<f64>,
    /// A file of hourly intensities per zone (`zone,hour,g_per_kwh`; see
    /// `hubgate_exporters::carbon::HourlyIntensity`), read again when it changes.
    pub grid_intensity_file: Option<std::path::PathBuf>,
    /// The hub's zone in that file; may be left out when the file holds one zone.
    pub grid_zone: Option<String>,
    /// How often the meter is read.
    #[serde(deserialize_with = "duration")]
    pub sample_every: Duration,
    /// Emissions of making the hardware, in kgCO2e (the vendor's LCA when known).
    pub embodied_kg: f64,
    /// Expected life of the hardware, in years.
    pub lifetime_years: f64,
    /// Share of the hardware reserved for the gateway (1 on a dedicated device).
    pub hardware_share: f64,
    /// Attributional network energy of a gigabyte, for the bytes avoided (kWh per GB).
    pub network_kwh_per_gb: f64,
    /// The energy model's coefficients, used when no sensor can be read.
    pub idle_watts_per_vcpu: f64,
    pub max_watts_per_vcpu: f64,
    pub memory_watts_per_gb: f64,
}

impl Default for FootprintConfig {
    fn default() -> Self {
        let model = hubgate_exporters::energy::Coefficients::default();
        let embodied = hubgate_exporters::carbon::Embodied::default();
        Self {
            grid_intensity_g_per_kwh: None,
            grid_intensity_file: None,
            grid_zone: None,
            sample_every: Duration::from_secs(5),
            embodied_kg: embodied.kg,
            lifetime_years: embodied.lifetime_years,
            hardware_share: embodied.share,
            network_kwh_per_gb: hubgate_exporters::carbon::NETWORK_KWH_PER_GB,
            idle_watts_per_vcpu: model.idle_watts_per_vcpu,
            max_watts_per_vcpu: model.max_watts_per_vcpu,
            memory_watts_per_gb: model.memory_watts_per_gb,
        }
    }
}

impl FootprintConfig {
    pub(super) fn check(&self, keys: &Keys, diags: &mut Diagnostics) {
        let figures = [
            (
                "grid_intensity_g_per_kwh",
                self.grid_intensity_g_per_kwh.unwrap_or(0.0),
            ),
            ("embodied_kg", self.embodied_kg),
            ("network_kwh_per_gb", self.network_kwh_per_gb),
            ("idle_watts_per_vcpu", self.idle_watts_per_vcpu),
            ("max_watts_per_vcpu", self.max_watts_per_vcpu),
            ("memory_watts_per_gb", self.memory_watts_per_gb),
        ];
        for (key, figure) in figures {
            if !figure.is_finite() || figure < 0.0 {
                diags.error(
                    keys.at(key),
                    format!("footprint.{key} must be finite and not negative"),
                );
            }
        }
        if !(self.lifetime_years.is_finite() && self.lifetime_years > 0.0) {
            diags.error(
                keys.at("lifetime_years"),
                "footprint.lifetime_years must be more than 0",
            );
        }
        if !(self.hardware_share > 0.0 && self.hardware_share <= 1.0) {
            diags.error(
                keys.at("hardware_share"),
                "footprint.hardware_share must be more than 0 and at most 1",
            );
        }
        if self.sample_every < Duration::from_secs(1) {
            diags.error(
                keys.at("sample_every"),
                "footprint.sample_every must be at least 1s",
            );
        }
        if self.grid_zone.is_some() && self.grid_intensity_file.is_none() {
            diags.error(
                keys.at("grid_zone"),
                "footprint.grid_zone names a zone of footprint.grid_intensity_file, which is not set",
            );
        }
        if self.max_watts_per_vcpu < self.idle_watts_per_vcpu {
            diags.error(
                keys.written(&["max_watts_per_vcpu", "idle_watts_per_vcpu"]),
                "footprint.max_watts_per_vcpu must be at least idle_watts_per_vcpu",
            );
        }
    }
}
