//! The `[stream.aggregate]` table: windowed aggregation with a minimum group size, and optional
//! differential-privacy noise.
//!
//! ```toml
//! [stream.aggregate]
//! window = "15m"                 # tumbling windows by event time
//! allowed_lateness = "1m"        # readings later than this after the window's end are dropped
//! group_by = ["counter_id"]      # declared output fields; the stream name is always part of it
//! contributor = "mac"            # declared field whose distinct values are the contributors
//! min_group_size = 5             # k: groups with fewer distinct contributors are suppressed
//!
//! [stream.aggregate.measures]
//! readings = "count"
//! devices = "contributors"
//! mean_rssi = { fn = "mean", field = "rssi", min = -100, max = 0 }
//!
//! [stream.aggregate.noise]       # optional: differential privacy
//! epsilon = 0.5                  # spent by each window's release
//! daily_budget = 12.0            # per stream and UTC day; releases over it are refused
//! max_contributions = 1          # per contributor and window; the rest is not counted
//! delta = 1e-6                   # chance that a group of one contributor is released
//! ```
//!
//! Without noise, counts are exact: two windows (or two streams over the same readings) that
//! differ by one person tell that person's part. `accept_exact_counts = true` says the city
//! accepts that; `hubgate check` warns otherwise, and refuses two streams without noise that
//! aggregate readings of the same topics unless both accept it.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::DeValue;

use super::{Treatment, serialize_secs};
use crate::diagnostics::Diagnostics;

/// Minimum group size when the policy does not say.
pub const DEFAULT_MIN_GROUP_SIZE: u32 = 5;

/// Bound on the entries (groups, distinct contributors and values) held by one stream's open
/// windows when the policy does not say.
pub const DEFAULT_MAX_STATE_ENTRIES: u64 = 1_000_000;

/// Epsilon values are held in millionths, so that budgets add up exactly.
pub const MICRO: f64 = 1_000_000.0;

/// What a measure computes over the readings of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MeasureFn {
    /// Number of readings.
    Count,
    /// Number of distinct contributors.
    Contributors,
    /// Number of distinct values of a field.
    Distinct,
    /// Sum of a numeric field.
    Sum,
    /// Mean of a numeric field.
    Mean,
    /// Smallest value of a numeric field.
    Min,
    /// Largest value of a numeric field.
    Max,
}

impl MeasureFn {
    fn needs_field(self) -> bool {
        !matches!(self, MeasureFn::Count | MeasureFn::Contributors)
    }

    fn numeric(self) -> bool {
        matches!(
            self,
            MeasureFn::Sum | MeasureFn::Mean | MeasureFn::Min | MeasureFn::Max
        )
    }

    /// How many noisy quantities the measure needs under differential privacy (`None`: it
    /// cannot be released with noise).
    pub fn noisy_quantities(self) -> Option<u32> {
        match self {
            MeasureFn::Count | MeasureFn::Contributors | MeasureFn::Distinct | MeasureFn::Sum => {
                Some(1)
            }
            MeasureFn::Mean => Some(2),
            MeasureFn::Min | MeasureFn::Max => None,
        }
    }
}

/// A measure written as a table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMeasureTable {
    #[serde(rename = "fn")]
    func: MeasureFn,
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    min: Option<f64>,
    #[serde(default)]
    max: Option<f64>,
}

/// The `[stream.aggregate.noise]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNoise {
    pub epsilon: Spanned<f64>,
    pub daily_budget: Spanned<f64>,
    #[serde(default)]
    pub max_contributions: Option<Spanned<u32>>,
    #[serde(default)]
    pub delta: Option<Spanned<f64>>,
}

/// The `[stream.aggregate]` table, less its measures, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAggregateHeader {
    pub window: Spanned<String>,
    #[serde(default)]
    pub allowed_lateness: Option<Spanned<String>>,
    #[serde(default)]
    pub group_by: Vec<Spanned<String>>,
    pub contributor: Spanned<String>,
    #[serde(default)]
    pub min_group_size: Option<Spanned<u32>>,
    #[serde(default)]
    pub max_state_entries: Option<Spanned<u64>>,
    #[serde(default)]
    pub noise: Option<RawNoise>,
    #[serde(default)]
    pub accept_exact_counts: Option<Spanned<bool>>,
}

/// The `[stream.aggregate]` table as written.
#[derive(Debug)]
pub struct RawAggregate {
    pub span: std::ops::Range<usize>,
    pub header: RawAggregateHeader,
    pub measures: Vec<(Spanned<String>, RawMeasureTable)>,
}

/// One output value of an aggregated record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measure {
    /// Output field name.
    pub name: String,
    pub func: MeasureFn,
    /// Input field (declared output path of the chain) for the functions that take one.
    pub field: Option<String>,
    /// Values are clamped to `[min, max]` before they are summed (contribution bounding).
    pub bounds: Option<(f64, f64)>,
}

/// Differential-privacy parameters of an aggregated stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Noise {
    /// Epsilon spent by each window's release, in millionths.
    pub epsilon_micro: u64,
    /// Epsilon a stream may spend per UTC day, in millionths.
    pub daily_budget_micro: u64,
    /// Readings counted per contributor and window; the rest are left out.
    pub max_contributions: u32,
    /// The chance that a group with a single contributor is released at all: what the release
    /// threshold is chosen from (see [`crate::window`]).
    pub delta: f64,
    /// The budget the stream pays from: its own name, or, when other streams with noise
    /// aggregate readings of the same topics, the name of the first of them, whose ledger they
    /// all share (see [`crate::policy::compile`]).
    pub budget_pool: String,
    /// The daily budget of that pool: the smallest of its streams', in millionths.
    pub pool_budget_micro: u64,
}

/// δ when the policy does not say.
pub const DEFAULT_DELTA: f64 = 1e-6;

/// Windowed aggregation of a stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Aggregation {
    #[serde(serialize_with = "serialize_secs")]
    pub window: Duration,
    #[serde(serialize_with = "serialize_secs")]
    pub allowed_lateness: Duration,
    pub group_by: Vec<String>,
    pub contributor: String,
    /// k: a group with fewer distinct contributors is never released.
    pub min_group_size: u32,
    pub measures: Vec<Measure>,
    pub noise: Option<Noise>,
    pub max_state_entries: u64,
    /// The city accepts that exact counts can be differenced (no noise).
    pub accept_exact_counts: bool,
}

impl Aggregation {
    /// The window length in milliseconds (at least 1).
    pub fn window_ms(&self) -> i64 {
        i64::try_from(self.window.as_millis())
            .unwrap_or(i64::MAX)
            .max(1)
    }

    /// Start of the window that holds `t_ms`.
    pub fn window_start(&self, t_ms: i64) -> i64 {
        t_ms - t_ms.rem_euclid(self.window_ms())
    }

    pub fn lateness_ms(&self) -> i64 {
        i64::try_from(self.allowed_lateness.as_millis()).unwrap_or(i64::MAX)
    }

    /// The field names of an aggregated record: the group keys, then the measures.
    pub fn output_fields(&self) -> impl Iterator<Item = &str> {
        self.group_by
            .iter()
            .map(String::as_str)
            .chain(self.measures.iter().map(|m| m.name.as_str()))
    }
}

/// Reads a `[stream.aggregate]` table, recording every problem in `diags`.
pub fn parse(value: Spanned<DeValue<'_>>, diags: &mut Diagnostics) -> Option<RawAggregate> {
    let span = value.span();
    let DeValue::Table(mut table) = value.into_inner() else {
        diags.error(
            span,
            "'aggregate' must be a table: write it as [stream.aggregate]",
        );
        return None;
    };
    let measures_value = table.remove("measures");
    let header =
        diags.section::<RawAggregateHeader>(Spanned::new(span.clone(), DeValue::Table(table)));
    let mut measures = Vec::new();
    match measures_value {
        None => diags.error(
            span.clone(),
            "missing table 'measures': declare what each window releases, e.g. readings = \"count\"",
        ),
        Some(value) => {
            let mspan = value.span();
            match value.into_inner() {
                DeValue::Table(table) => {
                    for (key, value) in table {
                        let name = Spanned::new(key.span(), key.get_ref().to_string());
                        let measure = if let DeValue::String(_) = value.get_ref() {
                            diags.section::<MeasureFn>(value).map(|func| RawMeasureTable {
                                func,
                                field: None,
                                min: None,
                                max: None,
                            })
                        } else {
                            diags.section::<RawMeasureTable>(value)
                        };
                        if let Some(m) = measure {
                            measures.push((name, m));
                        }
                    }
                }
                _ => diags.error(mspan, "'measures' must be a table of name = measure"),
            }
        }
    }
    header.map(|header| RawAggregate {
        span,
        header,
        measures,
    })
}

/// Validates an aggregate table against the stream's declared fields.
pub fn compile(
    raw: RawAggregate,
    fields: &[(String, Treatment)],
    time_bucket: Option<Duration>,
    diags: &mut Diagnostics,
) -> Option<Aggregation> {
    let h = raw.header;
    let declared = |p: &str| fields.iter().find(|(f, _)| f == p).map(|(_, t)| t);
    let mut ok = true;

    let window = super::positive_duration(&h.window, "window", diags);
    ok &= window.is_some();
    let allowed_lateness = match &h.allowed_lateness {
        Some(l) => match humantime::parse_duration(l.get_ref()) {
            Ok(d) => Some(d),
            Err(err) => {
                diags.error(
                    l.span(),
                    format!("invalid allowed_lateness (write e.g. \"30s\"): {err}"),
                );
                None
            }
        },
        None => Some(Duration::ZERO),
    };
    ok &= allowed_lateness.is_some();
    if let (Some(w), Some(l)) = (window, allowed_lateness)
        && l > w * 4
    {
        diags.warning(
            h.allowed_lateness
                .as_ref()
                .map_or(raw.span.clone(), Spanned::span),
            "allowed_lateness is more than four windows: open windows hold readings that long",
        );
    }

    if let (Some(w), Some(b)) = (window, time_bucket)
        && b > w
    {
        diags.error(
            h.window.span(),
            "the stream's time_bucket is coarser than the window: every reading would land at a window's start and most would arrive late",
        );
        ok = false;
    }

    let mut group_by = Vec::new();
    for g in &h.group_by {
        match declared(g.get_ref()) {
            None => {
                diags.error(
                    g.span(),
                    format!("group_by field '{}' is not declared under [stream.fields]", g.get_ref()),
                );
                ok = false;
            }
            Some(Treatment::Pseudonymise) => diags.warning(
                g.span(),
                format!(
                    "grouping by the pseudonym '{}' makes a group per device: each holds one contributor",
                    g.get_ref()
                ),
            ),
            Some(_) => {}
        }
        if group_by.contains(g.get_ref()) {
            diags.error(g.span(), "group_by field listed twice");
            ok = false;
        }
        group_by.push(g.get_ref().clone());
    }

    let contributor = h.contributor.get_ref().clone();
    match declared(&contributor) {
        None => {
            diags.error(
                h.contributor.span(),
                format!("contributor field '{contributor}' is not declared under [stream.fields]"),
            );
            ok = false;
        }
        Some(Treatment::Keep) => {
            let leaf = contributor.rsplit('.').next().unwrap_or(&contributor);
            if super::IDENTIFIER_NAMES.contains(&leaf.to_ascii_lowercase().as_str()) {
                diags.warning(
                    h.contributor.span(),
                    format!("contributor '{contributor}' is kept in clear: pseudonymise it"),
                );
            }
        }
        Some(_) => {}
    }

    let min_group_size = h
        .min_group_size
        .as_ref()
        .map_or(DEFAULT_MIN_GROUP_SIZE, |k| *k.get_ref());
    if let Some(k) = &h.min_group_size {
        if *k.get_ref() == 0 {
            diags.error(k.span(), "min_group_size must be at least 1");
            ok = false;
        } else if *k.get_ref() < 3 {
            diags.warning(
                k.span(),
                format!("min_group_size {} releases groups small enough to single people out: use 3 or more (5 is usual)", k.get_ref()),
            );
        }
    }

    let max_state_entries = h
        .max_state_entries
        .as_ref()
        .map_or(DEFAULT_MAX_STATE_ENTRIES, |m| *m.get_ref());
    if max_state_entries == 0 {
        diags.error(
            h.max_state_entries
                .as_ref()
                .map_or(raw.span.clone(), Spanned::span),
            "max_state_entries must be at least 1",
        );
        ok = false;
    }

    let noise = match &h.noise {
        None => None,
        Some(n) => {
            let eps = *n.epsilon.get_ref();
            let budget = *n.daily_budget.get_ref();
            if !(eps.is_finite() && eps > 0.0 && eps <= 100.0) {
                diags.error(
                    n.epsilon.span(),
                    "epsilon must be above 0 (and at most 100)",
                );
                ok = false;
            } else if eps > 5.0 {
                diags.warning(
                    n.epsilon.span(),
                    "an epsilon above 5 per release gives little protection",
                );
            }
            if !(budget.is_finite() && budget >= eps) {
                diags.error(
                    n.daily_budget.span(),
                    "daily_budget must be at least one release's epsilon",
                );
                ok = false;
            } else if let Some(w) = window
                && eps.is_finite()
                && eps > 0.0
            {
                let per_day = (86_400.0 / w.as_secs_f64()).ceil();
                // In millionths, as the ledger counts, so that 9.6 / 0.1 is 96.
                let affordable =
                    ((budget * MICRO).round() / (eps * MICRO).round().max(1.0)).floor();
                if affordable < per_day {
                    diags.warning(
                        n.daily_budget.span(),
                        format!(
                            "the daily budget pays for {affordable} of the {per_day} windows in a day: later windows are refused"
                        ),
                    );
                }
            }
            let max_contributions = n.max_contributions.as_ref().map_or(1, |m| *m.get_ref());
            if max_contributions == 0 {
                diags.error(
                    n.max_contributions
                        .as_ref()
                        .map_or(raw.span.clone(), Spanned::span),
                    "max_contributions must be at least 1",
                );
                ok = false;
            }
            let delta = n.delta.as_ref().map_or(DEFAULT_DELTA, |d| *d.get_ref());
            if let Some(d) = &n.delta {
                if !(delta.is_finite() && delta > 0.0 && delta < 0.01) {
                    diags.error(d.span(), "delta must be above 0 and below 0.01");
                    ok = false;
                } else if delta > 1e-4 {
                    diags.warning(
                        d.span(),
                        "a delta above 1e-4 releases groups of a single person too often",
                    );
                }
            }
            let daily_budget_micro = (budget * MICRO).round().max(0.0) as u64;
            Some(Noise {
                epsilon_micro: (eps * MICRO).round().max(1.0) as u64,
                daily_budget_micro,
                max_contributions,
                delta,
                budget_pool: String::new(),
                pool_budget_micro: daily_budget_micro,
            })
        }
    };

    let mut measures = Vec::new();
    if raw.measures.is_empty() {
        diags.error(
            raw.span.clone(),
            "an aggregated stream must declare at least one measure",
        );
        ok = false;
    }
    for (name, m) in raw.measures {
        let n = name.get_ref();
        if !super::valid_field_path(n) {
            diags.error(name.span(), format!("invalid measure name '{n}'"));
            ok = false;
        }
        if group_by.contains(n) || measures.iter().any(|x: &Measure| &x.name == n) {
            diags.error(name.span(), format!("output field '{n}' is declared twice"));
            ok = false;
        }
        match (&m.field, m.func.needs_field()) {
            (None, true) => {
                diags.error(
                    name.span(),
                    format!("measure '{n}' needs a field = \"...\""),
                );
                ok = false;
            }
            (Some(_), false) => {
                diags.error(name.span(), format!("measure '{n}' takes no field"));
                ok = false;
            }
            (Some(f), true) => {
                match declared(f) {
                    None => {
                        diags.error(
                        name.span(),
                        format!("measure '{n}' reads '{f}', which is not declared under [stream.fields]"),
                    );
                        ok = false;
                    }
                    Some(Treatment::H3(_) | Treatment::Grid(_) | Treatment::Pseudonymise)
                        if m.func.numeric() =>
                    {
                        diags.error(
                            name.span(),
                            format!("measure '{n}' needs a numeric field; '{f}' is not"),
                        );
                        ok = false;
                    }
                    _ => {}
                }
            }
            (None, false) => {}
        }
        let bounds = match (m.min, m.max) {
            (None, None) => None,
            (Some(lo), Some(hi)) if lo.is_finite() && hi.is_finite() && lo <= hi => Some((lo, hi)),
            _ => {
                diags.error(
                    name.span(),
                    format!("measure '{n}': give both min and max, with min <= max"),
                );
                ok = false;
                None
            }
        };
        if bounds.is_some() && !m.func.numeric() {
            diags.error(
                name.span(),
                format!("measure '{n}': min and max apply to numeric measures only"),
            );
            ok = false;
        }
        if noise.is_some() {
            match m.func.noisy_quantities() {
                None => {
                    diags.error(
                        name.span(),
                        format!("measure '{n}': min and max cannot be released with differential privacy"),
                    );
                    ok = false;
                }
                Some(_) if m.func.numeric() => match bounds {
                    Some((lo, hi)) if lo.fract() == 0.0 && hi.fract() == 0.0 => {}
                    _ => {
                        diags.error(
                            name.span(),
                            format!("measure '{n}': with noise, give integer bounds min and max (they set the noise scale)"),
                        );
                        ok = false;
                    }
                },
                Some(_) => {}
            }
        }
        measures.push(Measure {
            name: n.clone(),
            func: m.func,
            field: m.field,
            bounds,
        });
    }
    let accept_exact_counts = h.accept_exact_counts.as_ref().is_some_and(|a| *a.get_ref());
    if noise.is_none() && !accept_exact_counts {
        diags.warning(
            raw.span.clone(),
            "the counts are exact: two windows that differ by one person tell that person's part; add [stream.aggregate.noise], or set accept_exact_counts = true",
        );
    }
    if !ok {
        return None;
    }
    Some(Aggregation {
        window: window?,
        allowed_lateness: allowed_lateness?,
        group_by,
        contributor,
        min_group_size,
        measures,
        noise,
        max_state_entries,
        accept_exact_counts,
    })
}

#[cfg(test)]
mod tests {
    use crate::diagnostics::Severity;
    use crate::policy::from_toml;

    const BASE: &str = r#"
[[stream]]
name = "footfall"
topics = ["city/footfall/+/probe"]
purpose = "Measure how busy public spaces are"
legal_basis = "public task"
principles = ["community_participation"]
technology = "tech__identifiable_wifi_sensor"
retention = "7d"

[stream.fields]
counter_id = "keep"
mac = "pseudonymise"
rssi = "keep"

[stream.aggregate]
window = "15m"
allowed_lateness = "1m"
group_by = ["counter_id"]
contributor = "mac"

[stream.aggregate.measures]
devices = "contributors"
mean_rssi = { fn = "mean", field = "rssi", min = -100, max = 0 }
"#;

    fn diagnostics(src: &str) -> Vec<(Severity, usize, String)> {
        let diags = match from_toml(src) {
            Ok((_, d)) | Err(d) => d,
        };
        diags
            .into_sorted()
            .into_iter()
            .map(|d| (d.severity, d.position(src).0, d.message))
            .collect()
    }

    #[test]
    fn an_aggregate_compiles_with_defaults() {
        let (policy, diags) = from_toml(BASE).unwrap();
        // Exact counts of a stream of personal data are said to be exact, and not refused.
        let warnings: Vec<_> = diags.0.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(warnings.len(), 1, "{diags:?}");
        assert!(warnings[0].contains("counts are exact"), "{warnings:?}");
        let accepted = BASE.replace(
            "contributor = \"mac\"",
            "contributor = \"mac\"\naccept_exact_counts = true",
        );
        let (_, diags) = from_toml(&accepted).unwrap();
        assert!(diags.0.is_empty(), "{diags:?}");
        let s = &policy.streams()[0];
        let a = s.aggregate.as_ref().unwrap();
        assert_eq!(a.min_group_size, super::DEFAULT_MIN_GROUP_SIZE);
        assert_eq!(a.window.as_secs(), 900);
        assert_eq!(a.allowed_lateness.as_secs(), 60);
        assert_eq!(a.measures[1].bounds, Some((-100.0, 0.0)));
        // Only the group keys and measures leave an aggregated stream.
        assert_eq!(s.output_fields(), ["counter_id", "devices", "mean_rssi"]);
        // The aggregate is part of the policy's content.
        let (other, _) = from_toml(&BASE.replace("\"15m\"", "\"10m\"")).unwrap();
        assert_ne!(policy.hash(), other.hash());
    }

    #[test]
    fn aggregate_errors_are_reported_where_they_are() {
        let src = BASE
            .replace("group_by = [\"counter_id\"]", "group_by = [\"zone\"]")
            .replace("contributor = \"mac\"", "contributor = \"device\"")
            .replace("devices = \"contributors\"", "devices = \"median\"")
            .replace(
                "field = \"rssi\", min = -100, max = 0",
                "field = \"rssi\", min = 0",
            );
        let errors: Vec<_> = diagnostics(&src)
            .into_iter()
            .filter(|d| d.0 == Severity::Error)
            .collect();
        let lines: Vec<usize> = errors.iter().map(|e| e.1).collect();
        assert_eq!(lines, [19, 20, 23, 24], "{errors:#?}");
        assert!(
            errors[0]
                .2
                .contains("group_by field 'zone' is not declared")
        );
        assert!(
            errors[1]
                .2
                .contains("contributor field 'device' is not declared")
        );
        assert!(
            errors[2].2.contains("unknown variant 'median'"),
            "{}",
            errors[2].2
        );
        assert!(errors[3].2.contains("give both min and max"));
    }

    #[test]
    fn weak_and_impossible_noise_settings_are_reported() {
        let src = BASE.replace(
            "contributor = \"mac\"",
            "contributor = \"mac\"\nmin_group_size = 2",
        ) + "\n[stream.aggregate.noise]\nepsilon = 1.0\ndaily_budget = 4.0\n";
        let d = diagnostics(&src);
        assert!(
            d.iter()
                .any(|(s, _, m)| *s == Severity::Warning && m.contains("min_group_size 2")),
            "{d:#?}"
        );
        // 96 windows a day at epsilon 1 do not fit a budget of 4.
        assert!(
            d.iter()
                .any(|(s, _, m)| *s == Severity::Warning
                    && m.contains("pays for 4 of the 96 windows")),
            "{d:#?}"
        );
        let with_max = src.replace(
            "[stream.aggregate.measures]",
            "[stream.aggregate.measures]\nloudest = { fn = \"max\", field = \"rssi\" }",
        );
        let d = diagnostics(&with_max);
        assert!(
            d.iter().any(|(s, _, m)| *s == Severity::Error
                && m.contains("cannot be released with differential privacy")),
            "{d:#?}"
        );
        let unbounded = src.replace(", min = -100, max = 0", "");
        let d = diagnostics(&unbounded);
        assert!(
            d.iter()
                .any(|(s, _, m)| *s == Severity::Error && m.contains("integer bounds")),
            "{d:#?}"
        );
    }

    /// A second stream over the same readings: BASE's stream under another name, topics and
    /// aggregate tail (`noise`, `accept`), or a stream that publishes readings (`raw`).
    fn second(name: &str, topic: &str, tail: &str) -> String {
        BASE.replace("name = \"footfall\"", &format!("name = \"{name}\""))
            .replace("city/footfall/+/probe", topic)
            + tail
    }

    const NOISE: &str = "\n[stream.aggregate.noise]\nepsilon = 0.5\ndaily_budget = 48.0\n";
    const ACCEPT: &str = "contributor = \"mac\"\naccept_exact_counts = true";

    fn errors_and_warnings(src: &str) -> (Vec<String>, Vec<String>) {
        let d = diagnostics(src);
        let of = |severity: Severity| {
            d.iter()
                .filter(|(s, _, m)| *s == severity && m.contains("same topics"))
                .map(|(_, _, m)| m.clone())
                .collect::<Vec<_>>()
        };
        (of(Severity::Error), of(Severity::Warning))
    }

    /// Two aggregates over the same readings: exact counts beside each other are refused unless
    /// both accept them; exact counts beside noisy ones always; noisy ones share one budget.
    #[test]
    fn overlapping_aggregates_are_refused_or_share_a_budget() {
        let exact = BASE.to_owned() + &second("cells", "city/+/+/probe", "");
        let (errors, _) = errors_and_warnings(&exact);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("differencing"), "{errors:?}");

        let accepted = BASE.replace("contributor = \"mac\"", ACCEPT)
            + &second("cells", "city/#", "").replace("contributor = \"mac\"", ACCEPT);
        let (errors, warnings) = errors_and_warnings(&accepted);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(warnings.len(), 1, "{warnings:?}");

        let mixed = BASE.replace("contributor = \"mac\"", ACCEPT)
            + &second("cells", "city/footfall/#", NOISE).replace("contributor = \"mac\"", ACCEPT);
        let (errors, _) = errors_and_warnings(&mixed);
        assert_eq!(errors.len(), 1, "{errors:?}");

        let noisy = BASE.to_owned()
            + NOISE
            + &second(
                "cells",
                "city/footfall/pc-01/probe",
                &NOISE.replace("48.0", "24.0"),
            );
        let (errors, warnings) = errors_and_warnings(&noisy);
        assert!(
            errors.is_empty() && warnings.is_empty(),
            "{errors:?} {warnings:?}"
        );
        let (policy, _) = from_toml(&noisy).unwrap();
        for stream in policy.streams() {
            let noise = stream.aggregate.as_ref().unwrap().noise.as_ref().unwrap();
            assert_eq!(noise.budget_pool, "footfall");
            assert_eq!(noise.pool_budget_micro, 24_000_000);
        }

        // Topics that share no message: nothing to say.
        let apart = BASE.to_owned() + &second("parking", "city/parking/+/probe", "");
        assert_eq!(errors_and_warnings(&apart), (vec![], vec![]));
    }

    /// A stream that publishes readings of the topics an aggregate counts undoes it.
    #[test]
    fn a_stream_of_readings_over_an_aggregate_s_topics_is_refused() {
        let raw = |topic: &str| {
            format!(
                "\n[[stream]]\nname = \"raw\"\ntopics = [\"{topic}\"]\npurpose = \"p\"\nlegal_basis = \"l\"\nprinciples = [\"community_participation\"]\nretention = \"1d\"\n\n[stream.fields]\nrssi = \"keep\"\n"
            )
        };
        let d = diagnostics(&(BASE.to_owned() + NOISE + &raw("city/#")));
        assert!(
            d.iter().any(|(s, _, m)| *s == Severity::Error
                && m.contains("publishes readings of the topics stream 'footfall' aggregates")),
            "{d:#?}"
        );
        let accepted =
            BASE.replace("contributor = \"mac\"", ACCEPT) + &raw("city/footfall/+/probe");
        let d = diagnostics(&accepted);
        assert!(
            d.iter()
                .any(|(s, _, m)| *s == Severity::Warning && m.contains("undo")),
            "{d:#?}"
        );
        assert!(!d.iter().any(|(s, _, _)| *s == Severity::Error), "{d:#?}");
        let d = diagnostics(&(BASE.to_owned() + &raw("city/air/+/reading")));
        assert!(!d.iter().any(|(_, _, m)| m.contains("undo")), "{d:#?}");
    }
}
