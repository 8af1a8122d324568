//! Carbon of the gateway's own operation, per the Software Carbon Intensity specification (Green
//! Software Foundation; ISO/IEC 21031:2024): SCI = (E × I + M) per R.
//!
//! - E × I, operational: the energy the gateway used ([`crate::energy`]) times the location-based
//!   carbon intensity of the grid, in grams of CO2e per kWh. There is no default intensity: it
//!   depends on where the hub is, so it must be configured, and no operational carbon is reported
//!   without it.
//! - M, embodied: the emissions of making the hardware, TE, amortised over its expected life EL
//!   for the time the gateway ran TiR, times the share of the hardware reserved for it RR/ToR:
//!   M = TE × (TiR / EL) × (RR / ToR). The default TE is 30 kgCO2e for an IoT gateway (Boavizta's
//!   functional blocks; Pirson and Bol 2021) over 4 years, about 0.86 g per hour, with the whole
//!   device reserved for the gateway; a vendor's life-cycle assessment should replace it.
//! - R, the functional unit: 1,000 readings the gateway forwarded (records kept).
//!
//! Emissions avoided elsewhere (fewer bytes sent) never lower SCI; they are reported apart.

/// Attributional network energy intensity, kWh per GB: Aslan et al. 2018 (data of 2015, an
/// intensity that halved about every two years since, so an upper estimate today; Traficom's
/// operator-reported 2021 figures are 0.05 fixed and 0.12 mobile). Network power is mostly
/// baseline (Mytton, Lundén and Malmodin 2024): bytes avoided do not save this energy one for one,
/// which is why it is reported apart from SCI.
pub const NETWORK_KWH_PER_GB: f64 = 0.06;

/// Joules in one kilowatt-hour.
pub const JOULES_PER_KWH: f64 = 3.6e6;
/// Seconds in a (Julian) year.
pub const SECONDS_PER_YEAR: f64 = 365.25 * 86_400.0;

/// What the embodied share is computed from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Embodied {
    /// TE: kilograms of CO2e to make the hardware.
    pub kg: f64,
    /// EL: expected life of the hardware, in years.
    pub lifetime_years: f64,
    /// RR / ToR: the share of the hardware reserved for the gateway (1 on a dedicated device).
    pub share: f64,
}

impl Default for Embodied {
    /// An IoT gateway: 30 kgCO2e over 4 years, all of it reserved.
    fn default() -> Self {
        Self {
            kg: 30.0,
            lifetime_years: 4.0,
            share: 1.0,
        }
    }
}

/// Grams of CO2e for `joules` at `grams_per_kwh`.
pub fn operational_grams(joules: f64, grams_per_kwh: f64) -> f64 {
    joules / JOULES_PER_KWH * grams_per_kwh
}

/// Grams of CO2e of the hardware's making attributable to `seconds` of the gateway's running.
pub fn embodied_grams(seconds: f64, embodied: &Embodied) -> f64 {
    embodied.kg * 1000.0 * (seconds / (embodied.lifetime_years * SECONDS_PER_YEAR)) * embodied.share
}

/// SCI in grams of CO2e per 1,000 readings; `None` before the first reading.
pub fn sci_per_1000(operational_grams: f64, embodied_grams: f64, readings: u64) -> Option<f64> {
    (readings > 0).then(|| (operational_grams + embodied_grams) / readings as f64 * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_values() {
        // 1 kWh at 250 g/kWh.
        assert!((operational_grams(3.6e6, 250.0) - 250.0).abs() < 1e-9);
        // 10 W for an hour at 400 g/kWh: 0.01 kWh → 4 g.
        assert!((operational_grams(10.0 * 3600.0, 400.0) - 4.0).abs() < 1e-9);
        // 30 kg over 4 years: about 0.86 g per hour, as the reference figure says.
        let per_hour = embodied_grams(3600.0, &Embodied::default());
        assert!((per_hour - 0.8556).abs() < 1e-4, "{per_hour}");
        // Half the device reserved: half the share.
        let half = Embodied {
            share: 0.5,
            ..Embodied::default()
        };
        assert!((embodied_grams(3600.0, &half) - per_hour / 2.0).abs() < 1e-12);
        // 3 g over 6,000 readings: 0.5 g per 1,000.
        assert_eq!(sci_per_1000(2.0, 1.0, 6_000), Some(0.5));
        assert_eq!(sci_per_1000(2.0, 1.0, 0), None);
    }
}
