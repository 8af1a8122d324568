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

/// Hourly carbon intensities of one grid zone, in gCO2e per kWh, read from a CSV file such as a
/// grid operator or Electricity Maps publishes, reshaped to three columns:
///
/// ```text
/// zone,hour,g_per_kwh
/// DE,2026-11-25T09:00:00Z,312.5
/// DE,2026-11-25T10:00:00Z,298
/// ```
///
/// `hour` is the start of the hour in UTC (RFC 3339). Blank lines and lines starting with `#` are
/// skipped. The file may hold several zones; the one the hub draws from is chosen by name.
#[derive(Debug, Clone, PartialEq)]
pub struct HourlyIntensity {
    zone: String,
    /// Start of the hour in seconds since the Unix epoch → gCO2e per kWh.
    hours: std::collections::BTreeMap<u64, f64>,
}

/// A problem in an intensity file, at a line and column (both from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntensityError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for IntensityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

impl std::error::Error for IntensityError {}

/// The header an intensity file starts with.
pub const INTENSITY_HEADER: &str = "zone,hour,g_per_kwh";

impl HourlyIntensity {
    /// Parses an intensity file's `text`, keeping the rows of `zone`; with no zone given, the file
    /// must hold exactly one.
    pub fn parse(text: &str, zone: Option<&str>) -> Result<Self, IntensityError> {
        let error = |line: usize, column: usize, message: String| IntensityError {
            line,
            column,
            message,
        };
        let mut rows = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
            .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'));
        match rows.next() {
            Some((_, header)) if header.trim() == INTENSITY_HEADER => {}
            Some((line, _)) => {
                return Err(error(
                    line,
                    1,
                    format!("the header must be `{INTENSITY_HEADER}`"),
                ));
            }
            None => return Err(error(1, 1, "the file is empty".into())),
        }
        let mut zones: std::collections::BTreeMap<String, std::collections::BTreeMap<u64, f64>> =
            std::collections::BTreeMap::new();
        for (line, row) in rows {
            let mut cells = Vec::with_capacity(3);
            let mut column = 1;
            for cell in row.split(',') {
                cells.push((column, cell.trim()));
                column += cell.chars().count() + 1;
            }
            if cells.len() != 3 {
                return Err(error(
                    line,
                    1,
                    format!(
                        "expected 3 columns (zone, hour, g_per_kwh), found {}",
                        cells.len()
                    ),
                ));
            }
            let (_, name) = cells[0];
            if name.is_empty() {
                return Err(error(line, 1, "the zone is empty".into()));
            }
            let (hour_column, hour) = cells[1];
            let time = humantime::parse_rfc3339(hour).map_err(|e| {
                error(
                    line,
                    hour_column,
                    format!("`{hour}` is not an RFC 3339 UTC time ({e})"),
                )
            })?;
            let seconds = time
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| error(line, hour_column, "the hour is before 1970".into()))?
                .as_secs();
            if seconds % 3600 != 0 {
                return Err(error(
                    line,
                    hour_column,
                    format!("`{hour}` is not the start of an hour"),
                ));
            }
            let (value_column, value) = cells[2];
            let grams: f64 = value
                .parse()
                .ok()
                .filter(|g: &f64| g.is_finite() && *g >= 0.0)
                .ok_or_else(|| {
                    error(
                        line,
                        value_column,
                        format!(
                            "`{value}` is not a number of grams per kWh (finite, not negative)"
                        ),
                    )
                })?;
            if zones
                .entry(name.to_owned())
                .or_default()
                .insert(seconds, grams)
                .is_some()
            {
                return Err(error(
                    line,
                    hour_column,
                    format!("a second value for {name} at {hour}"),
                ));
            }
        }
        let names = zones.keys().cloned().collect::<Vec<_>>().join(", ");
        let (zone, hours) = match zone {
            Some(wanted) => match zones.remove(wanted) {
                Some(hours) => (wanted.to_owned(), hours),
                None => {
                    return Err(error(
                        1,
                        1,
                        format!("no rows for the zone {wanted} (the file has: {})", names),
                    ));
                }
            },
            None if zones.len() == 1 => zones.pop_first().unwrap_or_default(),
            None if zones.is_empty() => return Err(error(1, 1, "the file has no rows".into())),
            None => {
                return Err(error(
                    1,
                    1,
                    format!("the file has several zones ({}): name the hub's", names),
                ));
            }
        };
        Ok(Self { zone, hours })
    }

    /// The zone's name.
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// Hours the file covers.
    pub fn len(&self) -> usize {
        self.hours.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hours.is_empty()
    }

    /// The intensity of the hour holding `unix_seconds`, if the file has it.
    pub fn at(&self, unix_seconds: u64) -> Option<f64> {
        self.hours
            .get(&(unix_seconds - unix_seconds % 3600))
            .copied()
    }
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

    #[test]
    fn hourly_intensities_are_read_per_zone_and_looked_up_by_hour() {
        let file = "# exported 2026-11-25\nzone,hour,g_per_kwh\r\n\
                    DE,2026-11-25T09:00:00Z,312.5\n\
                    FR,2026-11-25T09:00:00Z,41\n\
                    DE, 2026-11-25T10:00:00Z ,298\n\n";
        let de = HourlyIntensity::parse(file, Some("DE")).unwrap();
        assert_eq!((de.zone(), de.len()), ("DE", 2));
        // 2026-11-25T09:00:00Z is 1795597200 s.
        assert_eq!(de.at(1_795_597_200), Some(312.5));
        assert_eq!(de.at(1_795_597_200 + 3599), Some(312.5));
        assert_eq!(de.at(1_795_597_200 + 3600), Some(298.0));
        assert_eq!(de.at(1_795_597_200 + 7200), None);
        assert_eq!(de.at(1_795_597_200 - 1), None);
        let fr = HourlyIntensity::parse(file, Some("FR")).unwrap();
        assert_eq!(fr.at(1_795_597_200 + 1800), Some(41.0));
        // Two zones and none named; a zone the file lacks.
        let err = HourlyIntensity::parse(file, None).unwrap_err();
        assert!(err.message.contains("several zones (DE, FR)"), "{err}");
        let err = HourlyIntensity::parse(file, Some("PL")).unwrap_err();
        assert!(err.message.contains("no rows for the zone PL"), "{err}");
        // One zone needs no name.
        let one =
            HourlyIntensity::parse("zone,hour,g_per_kwh\nPL,2026-11-25T09:00:00Z,700\n", None)
                .unwrap();
        assert_eq!(one.zone(), "PL");
    }

    #[test]
    fn a_bad_intensity_file_is_refused_at_the_line_and_column() {
        let at = |text: &str| {
            let e = HourlyIntensity::parse(text, None).unwrap_err();
            (e.line, e.column, e.message)
        };
        let h = "zone,hour,g_per_kwh\n";
        assert_eq!(at("zone;hour;g\n").0, 1);
        let (line, column, message) = at(&format!("{h}DE,2026-11-25T09:00:00Z,lots\n"));
        assert_eq!((line, column), (2, 25), "{message}");
        let (line, column, message) = at(&format!("{h}DE,2026-11-25T09:00:00Z,-1\n"));
        assert_eq!((line, column), (2, 25), "{message}");
        let (line, column, message) = at(&format!("{h}\nDE,yesterday,300\n"));
        assert_eq!((line, column), (3, 4), "{message}");
        let (line, column, message) = at(&format!("{h}DE,2026-11-25T09:30:00Z,300\n"));
        assert_eq!((line, column), (2, 4));
        assert!(message.contains("not the start of an hour"), "{message}");
        let (line, _, message) = at(&format!(
            "{h}DE,2026-11-25T09:00:00Z,300\nDE,2026-11-25T09:00:00Z,301\n"
        ));
        assert_eq!(line, 3);
        assert!(message.contains("a second value"), "{message}");
        let (line, _, message) = at(&format!("{h}DE,2026-11-25T09:00:00Z\n"));
        assert_eq!(line, 2);
        assert!(message.contains("expected 3 columns"), "{message}");
        assert!(at(h).2.contains("no rows"));
        assert!(at("").2.contains("empty"));
    }
}
