//! The policy language: what a city allows each stream to collect, why, and for how long.
//!
//! A policy is a list of `[[stream]]` tables in the gateway's TOML configuration:
//!
//! ```toml
//! [[stream]]
//! name = "air_quality"
//! topics = ["city/air/+/reading"]
//! format = "json"
//! purpose = "Inform public-health advice on air pollution"
//! legal_basis = "public task (GDPR Art. 6(1)(e))"
//! principles = ["sustainability_resilience"]
//! retention = "30d"
//! time_field = "ts"
//!
//! [stream.fields]
//! station_id = "keep"
//! pm25 = "keep"
//! "location.district" = "keep"
//! ```
//!
//! Parsing is split in two, as everywhere in hubgate's configuration: TOML into the plain `Raw*`
//! types (serde, `deny_unknown_fields`, positions kept), then [`compile`] validates them into a
//! [`Policy`], collecting every error with its position. The compiled policy has a content hash
//! ([`Policy::hash_hex`]) computed over its canonical form, so comments and layout do not change
//! it, and every record the gateway emits carries it.

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use toml::Spanned;
use toml::de::DeValue;

pub mod aggregate;

use crate::diagnostics::Diagnostics;
use crate::identifiers::{Detector, IdKind};
use crate::topic::TopicFilter;

/// Version of the policy language; part of the hashed content.
pub const POLICY_LANGUAGE_VERSION: u32 = 1;

/// Lifetime of a pseudonymisation key when the policy does not say.
pub const DEFAULT_KEY_EPOCH: Duration = Duration::from_secs(24 * 3600);

/// Retention above this is reported as a warning by `hubgate check`.
const LONG_RETENTION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Payload encodings a stream can declare.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// A JSON object; nested objects are flattened into dotted paths.
    #[default]
    Json,
    /// A SenML pack (RFC 8428) in JSON.
    SenmlJson,
    /// A SenML pack (RFC 8428) in CBOR.
    SenmlCbor,
    /// A FIWARE NGSI entity (Smart Data Models), key-values or normalised, NGSI v2 or NGSI-LD.
    Ngsi,
    /// Sparkplug B (Eclipse Sparkplug) protobuf payloads on the `spBv1.0` topic namespace.
    SparkplugB,
    /// LoRaWAN uplink events of ChirpStack v4, in JSON (see [`crate::lorawan`]).
    Chirpstack,
    /// LoRaWAN uplink messages of The Things Stack v3 (see [`crate::lorawan`]).
    Ttn,
}

impl PayloadFormat {
    /// Whether the format is a LoRaWAN network server's, with the fields of [`crate::lorawan`].
    pub fn is_lorawan(self) -> bool {
        matches!(self, PayloadFormat::Chirpstack | PayloadFormat::Ttn)
    }

    /// The event time's field when the stream declares none: the network server's time for
    /// LoRaWAN uplinks.
    pub fn default_time_field(self) -> Option<&'static str> {
        self.is_lorawan().then_some(crate::lorawan::TIME)
    }
}

/// The principles of the UN-Habitat International Guidelines on People-Centred Smart Cities that a
/// stream serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Principle {
    /// Shared prosperity.
    SharedProsperity,
    /// Sustainability, resilience and crisis response.
    SustainabilityResilience,
    /// Community participation and collaboration.
    CommunityParticipation,
    /// Human rights, equity and inclusion.
    HumanRightsEquityInclusion,
}

impl Principle {
    /// The guideline's own wording.
    pub fn title(self) -> &'static str {
        match self {
            Principle::SharedProsperity => "shared prosperity",
            Principle::SustainabilityResilience => "sustainability, resilience and crisis response",
            Principle::CommunityParticipation => "community participation and collaboration",
            Principle::HumanRightsEquityInclusion => "human rights, equity and inclusion",
        }
    }
}

/// What happens to a declared field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Treatment {
    /// The value passes unchanged (string values are still scanned for identifiers).
    Keep,
    /// The value is replaced by its keyed pseudonym (ISO/IEC 20889: pseudonymisation).
    Pseudonymise,
    /// A location generalised to an H3 cell (ISO/IEC 20889: generalisation). The declared path is
    /// the output; `lat` and `lon` name the payload fields it is computed from, which never pass.
    H3(H3Cell),
    /// A location generalised to the south-west corner of a square grid cell of `step` degrees,
    /// written `"lat,lon"` (ISO/IEC 20889: generalisation), for systems that do not use H3.
    Grid(GridCell),
}

impl Treatment {
    /// The names a treatment is written with in the policy.
    pub const NAMES: &'static [&'static str] = &["keep", "pseudonymise", "h3", "grid"];

    /// The payload paths of the coordinates a location treatment is computed from.
    pub fn coordinates(&self) -> Option<(&str, &str)> {
        match self {
            Treatment::H3(c) => Some((&c.lat, &c.lon)),
            Treatment::Grid(g) => Some((&g.lat, &g.lon)),
            Treatment::Keep | Treatment::Pseudonymise => None,
        }
    }
}

/// Parameters of the `grid` treatment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridCell {
    /// Cell size in degrees of latitude and longitude (0.01° of latitude is about 1.1 km).
    pub step: f64,
    /// Payload path of the latitude, in degrees (WGS 84).
    pub lat: String,
    /// Payload path of the longitude, in degrees (WGS 84).
    pub lon: String,
}

impl GridCell {
    /// Decimal places that show a multiple of `step` exactly (at most 6).
    pub fn decimals(&self) -> usize {
        (0..=6)
            .find(|d| {
                let scaled = self.step * 10f64.powi(*d as i32);
                (scaled - scaled.round()).abs() < 1e-9
            })
            .unwrap_or(6)
    }
}

/// Parameters of the `h3` treatment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct H3Cell {
    /// H3 resolution, 0 (continents) to 15 (about 1 m²); 8 is about 0.74 km², 9 about 0.1 km².
    pub resolution: u8,
    /// Payload path of the latitude, in degrees (WGS 84).
    pub lat: String,
    /// Payload path of the longitude, in degrees (WGS 84).
    pub lon: String,
}

impl H3Cell {
    /// The average area of a cell at this resolution, in km² (H3's published averages).
    pub fn average_area_km2(&self) -> f64 {
        h3o::Resolution::try_from(self.resolution).map_or(f64::NAN, h3o::Resolution::area_km2)
    }
}

/// What happens to a string value in which a direct identifier is detected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdAction {
    /// The field is dropped.
    #[default]
    Drop,
    /// The value is replaced by its keyed pseudonym.
    Pseudonymise,
}

/// The `[stream.identifiers]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentifiers {
    #[serde(default)]
    pub action: IdAction,
    /// Detectors to run; all of them when absent.
    #[serde(default)]
    pub detect: Option<Spanned<Vec<IdKind>>>,
    /// Regular expressions for the licence plates of the city's region.
    #[serde(default)]
    pub plate_patterns: Vec<Spanned<String>>,
}

/// Identifier suppression settings of a stream.
#[derive(Debug, Clone, Serialize)]
pub struct IdentifierPolicy {
    pub action: IdAction,
    pub detect: Vec<IdKind>,
    pub plate_patterns: Vec<String>,
    #[serde(skip)]
    pub detector: Detector,
}

/// Field names that usually hold a direct identifier: keeping one in clear earns a warning.
const IDENTIFIER_NAMES: &[&str] = &[
    "mac",
    "mac_address",
    "bssid",
    "imsi",
    "imei",
    "msisdn",
    "email",
    "e_mail",
    "phone",
    "phone_number",
    "plate",
    "licence_plate",
    "license_plate",
    "number_plate",
    "ip",
    "ip_address",
    "device_mac",
    "name",
    "user",
    "user_id",
    "username",
];

/// A `[[stream]]` table, less its `fields`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStreamHeader {
    pub name: Spanned<String>,
    pub topics: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pub format: PayloadFormat,
    pub purpose: Spanned<String>,
    pub legal_basis: Spanned<String>,
    pub principles: Spanned<Vec<Spanned<Principle>>>,
    /// The sensing technology, as a DTPR technology id (`tech__air_quality`).
    #[serde(default)]
    pub technology: Option<Spanned<String>>,
    /// Whether the sensors may capture personal data (for the transparency register). A stream
    /// that pseudonymises processes personal data whatever this says.
    #[serde(default)]
    pub personal_data: Option<Spanned<bool>>,
    pub retention: Spanned<String>,
    #[serde(default)]
    pub time_field: Option<Spanned<String>>,
    /// Event times are floored to a multiple of this ("15m").
    #[serde(default)]
    pub time_bucket: Option<Spanned<String>>,
    /// How long one pseudonymisation key lives ("24h" by default).
    #[serde(default)]
    pub key_epoch: Option<Spanned<String>>,
    #[serde(default)]
    pub identifiers: Option<RawIdentifiers>,
}

/// A `[[stream]]` table as written.
#[derive(Debug)]
pub struct RawStream {
    pub span: std::ops::Range<usize>,
    pub header: RawStreamHeader,
    /// Declared field paths with their treatments, in file order.
    pub fields: Vec<(Spanned<String>, Treatment)>,
    pub aggregate: Option<aggregate::RawAggregate>,
}

/// Reads the `stream` array of tables, recording every problem in `diags`.
///
/// Each stream, and each field of a stream, is deserialised on its own, so one mistake does not
/// hide the others.
pub fn parse_streams(value: Spanned<DeValue<'_>>, diags: &mut Diagnostics) -> Vec<RawStream> {
    let span = value.span();
    let DeValue::Array(items) = value.into_inner() else {
        diags.error(
            span,
            "'stream' must be an array of tables: write each one as [[stream]]",
        );
        return Vec::new();
    };
    let mut streams = Vec::new();
    for item in items {
        let item_span = item.span();
        let DeValue::Table(mut table) = item.into_inner() else {
            diags.error(item_span, "each stream must be a table");
            continue;
        };
        let fields_value = table.remove("fields");
        let aggregate_value = table.remove("aggregate");
        let header = diags
            .section::<RawStreamHeader>(Spanned::new(item_span.clone(), DeValue::Table(table)));
        let fields = match fields_value {
            None => {
                diags.error(
                    item_span.clone(),
                    "missing table 'fields': declare every field the stream may pass",
                );
                Vec::new()
            }
            Some(fields) => parse_fields(fields, diags),
        };
        let aggregate = aggregate_value.and_then(|a| aggregate::parse(a, diags));
        if let Some(header) = header {
            streams.push(RawStream {
                span: item_span,
                header,
                fields,
                aggregate,
            });
        }
    }
    streams
}

fn parse_fields(
    value: Spanned<DeValue<'_>>,
    diags: &mut Diagnostics,
) -> Vec<(Spanned<String>, Treatment)> {
    let span = value.span();
    let DeValue::Table(table) = value.into_inner() else {
        diags.error(span, "'fields' must be a table of field path = treatment");
        return Vec::new();
    };
    let mut fields = Vec::new();
    for (key, value) in table {
        let path = Spanned::new(key.span(), key.get_ref().to_string());
        // A dotted key without quotes (location.lat = "keep") makes a nested table whose keys are
        // not treatments; say so rather than report an unknown variant.
        if let DeValue::Table(t) = value.get_ref()
            && !t
                .keys()
                .any(|k| Treatment::NAMES.contains(&k.get_ref().as_ref()))
        {
            diags.error(
                key.span(),
                format!(
                    "'{p}' is a table, not a treatment: quote dotted paths, as in \"{p}.<name>\" = \"keep\"",
                    p = path.get_ref()
                ),
            );
            continue;
        }
        if let Some(treatment) = diags.section::<Treatment>(value) {
            fields.push((path, treatment));
        }
    }
    fields
}

/// Whether `id` has the form of a DTPR technology id.
fn valid_technology(id: &str) -> bool {
    id.strip_prefix("tech__").is_some_and(|rest| {
        !rest.is_empty()
            && rest.len() <= 60
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    })
}

/// A compiled, validated stream policy.
#[derive(Debug, Clone, Serialize)]
pub struct StreamPolicy {
    pub name: String,
    pub topics: Vec<TopicFilter>,
    pub format: PayloadFormat,
    pub purpose: String,
    pub legal_basis: String,
    pub principles: Vec<Principle>,
    /// The sensing technology, as a DTPR technology id (`tech__air_quality`), when declared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub technology: Option<String>,
    /// Whether the sensors may capture personal data, as the policy declares it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub personal_data: Option<bool>,
    /// How long records of this stream may be kept.
    #[serde(serialize_with = "serialize_secs")]
    pub retention: Duration,
    /// Payload field that holds the event time (Unix seconds, or RFC 3339 in UTC).
    pub time_field: Option<String>,
    /// Event times are floored to a multiple of this.
    #[serde(serialize_with = "serialize_opt_secs")]
    pub time_bucket: Option<Duration>,
    /// Lifetime of one pseudonymisation key.
    #[serde(serialize_with = "serialize_secs")]
    pub key_epoch: Duration,
    /// Identifier suppression over the string values that pass.
    pub identifiers: IdentifierPolicy,
    /// Declared field paths and their treatments, in file order.
    pub fields: Vec<(String, Treatment)>,
    /// Windowed aggregation: when present, only aggregates of the fields leave the gateway.
    pub aggregate: Option<aggregate::Aggregation>,
}

fn serialize_opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs()),
        None => s.serialize_none(),
    }
}

fn serialize_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

impl StreamPolicy {
    /// The treatment of a field path, if the policy declares it.
    pub fn treatment(&self, path: &str) -> Option<&Treatment> {
        self.fields.iter().find(|(p, _)| p == path).map(|(_, t)| t)
    }

    /// Whether records of this stream need a pseudonymisation key.
    pub fn needs_key(&self) -> bool {
        self.identifiers.action == IdAction::Pseudonymise
            || self
                .fields
                .iter()
                .any(|(_, t)| *t == Treatment::Pseudonymise)
    }

    /// Whether the stream processes personal data: it pseudonymises (declared fields, or the
    /// identifiers it finds), or its policy says its sensors may capture personal data.
    pub fn processes_personal_data(&self) -> bool {
        self.needs_key() || self.personal_data == Some(true)
    }

    /// How long a record of this stream is held before anyone may see it, when it is held: a
    /// stream that processes personal data, is not aggregated and has a `time_bucket` releases
    /// each bucket's records only once the bucket has ended, together, in an order unrelated
    /// to their arrival, so that neither the moment a record appears nor its place among the
    /// others tells more than its coarsened time. (An aggregated stream releases only at the
    /// end of its windows.)
    pub fn release_delay(&self) -> Option<Duration> {
        if self.aggregate.is_some() || !self.processes_personal_data() {
            return None;
        }
        self.time_bucket
    }

    /// The field names of the records the stream emits.
    pub fn output_fields(&self) -> Vec<&str> {
        match &self.aggregate {
            Some(a) => a.output_fields().collect(),
            None => self.fields.iter().map(|(p, _)| p.as_str()).collect(),
        }
    }

    /// Whether the stream takes messages from this topic.
    pub fn takes_topic(&self, topic: &str) -> bool {
        self.topics.iter().any(|f| f.matches(topic))
    }
}

/// A compiled policy: every stream, and the content hash that identifies it.
#[derive(Debug, Clone)]
pub struct Policy {
    streams: Vec<StreamPolicy>,
    hash: [u8; 32],
}

#[derive(Serialize)]
struct CanonicalPolicy<'a> {
    language_version: u32,
    streams: &'a [StreamPolicy],
}

impl PartialEq for Policy {
    /// Two policies are the same when their content hashes are.
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
    }
}

impl Policy {
    /// Builds a policy from already validated streams and computes its hash.
    pub fn new(streams: Vec<StreamPolicy>) -> Self {
        let canonical = CanonicalPolicy {
            language_version: POLICY_LANGUAGE_VERSION,
            streams: &streams,
        };
        // Serialising plain data structures to JSON cannot fail.
        let bytes = serde_json::to_vec(&canonical).unwrap_or_default();
        let hash = Sha256::digest(&bytes).into();
        Self { streams, hash }
    }

    pub fn streams(&self) -> &[StreamPolicy] {
        &self.streams
    }

    /// The canonical JSON form of the policy: the bytes whose SHA-256 is [`Policy::hash`].
    pub fn canonical_json(&self) -> String {
        let canonical = CanonicalPolicy {
            language_version: POLICY_LANGUAGE_VERSION,
            streams: &self.streams,
        };
        serde_json::to_string(&canonical).unwrap_or_default()
    }

    pub fn stream(&self, name: &str) -> Option<&StreamPolicy> {
        self.streams.iter().find(|s| s.name == name)
    }

    /// SHA-256 of the canonical JSON form of the policy.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// The hash as lowercase hex, as carried by every record.
    pub fn hash_hex(&self) -> String {
        self.hash.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Indexes of the streams whose topic filters match `topic`, in policy order.
    pub fn route<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = usize> + 'a {
        self.streams
            .iter()
            .enumerate()
            .filter(move |(_, s)| s.takes_topic(topic))
            .map(|(i, _)| i)
    }

    /// Every distinct topic filter, in policy order: what the gateway subscribes to.
    pub fn subscriptions(&self) -> Vec<&str> {
        let mut seen = HashSet::new();
        self.streams
            .iter()
            .flat_map(|s| s.topics.iter().map(TopicFilter::as_str))
            .filter(|t| seen.insert(*t))
            .collect()
    }
}

/// A duration longer than zero, written as "15m"; errors are recorded in `diags`.
fn positive_duration(d: &Spanned<String>, what: &str, diags: &mut Diagnostics) -> Option<Duration> {
    match humantime::parse_duration(d.get_ref()) {
        Ok(v) if !v.is_zero() => Some(v),
        Ok(_) => {
            diags.error(d.span(), format!("{what} must be longer than zero"));
            None
        }
        Err(err) => {
            diags.error(
                d.span(),
                format!("invalid {what} (write e.g. \"15m\"): {err}"),
            );
            None
        }
    }
}

fn valid_stream_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

fn valid_field_path(path: &str) -> bool {
    !path.is_empty()
        && path
            .split('.')
            .all(|seg| !seg.is_empty() && !seg.chars().any(char::is_control))
}

/// Validates raw streams into a policy, recording every problem in `diags`.
///
/// Returns `None` when there is at least one error.
pub fn compile(raw: Vec<RawStream>, diags: &mut Diagnostics) -> Option<Policy> {
    let errors_before = diags.0.len();
    let mut names = HashSet::new();
    let mut streams = Vec::new();
    let mut name_spans = Vec::new();
    for stream in raw {
        let h = stream.header;
        let name = h.name.get_ref().clone();
        name_spans.push(h.name.span());
        if !valid_stream_name(&name) {
            diags.error(
                h.name.span(),
                format!("stream name '{name}' must be lowercase letters, digits and '_', starting with a letter, at most 63 characters"),
            );
        } else if !names.insert(name.clone()) {
            diags.error(h.name.span(), format!("stream '{name}' is declared twice"));
        }

        let mut topics = Vec::new();
        if h.topics.get_ref().is_empty() {
            diags.error(
                h.topics.span(),
                format!("stream '{name}' declares no topics"),
            );
        }
        for topic in h.topics.get_ref() {
            match TopicFilter::new(topic.get_ref()) {
                Ok(filter) => topics.push(filter),
                Err(err) => diags.error(topic.span(), format!("invalid topic filter: {err}")),
            }
        }

        for (text, what) in [(&h.purpose, "purpose"), (&h.legal_basis, "legal_basis")] {
            if text.get_ref().trim().is_empty() {
                diags.error(
                    text.span(),
                    format!("stream '{name}' must state its {what}"),
                );
            }
        }

        let mut principles = Vec::new();
        if h.principles.get_ref().is_empty() {
            diags.error(
                h.principles.span(),
                format!("stream '{name}' must name at least one guideline principle it serves"),
            );
        }
        for p in h.principles.get_ref() {
            if principles.contains(p.get_ref()) {
                diags.error(p.span(), "principle listed twice");
            } else {
                principles.push(*p.get_ref());
            }
        }

        let technology = match &h.technology {
            Some(t) if !valid_technology(t.get_ref()) => {
                diags.error(
                    t.span(),
                    format!("technology '{}' must be a DTPR technology id: 'tech__' then lowercase letters, digits and '_' (e.g. \"tech__air_quality\")", t.get_ref()),
                );
                None
            }
            Some(t) => Some(t.get_ref().clone()),
            None => {
                diags.warning(
                    h.name.span(),
                    format!("stream '{name}' names no sensing technology (technology = \"tech__…\", a DTPR id): the transparency register will say it is not declared"),
                );
                None
            }
        };

        let retention = match humantime::parse_duration(h.retention.get_ref()) {
            Ok(d) if d.is_zero() => {
                diags.error(h.retention.span(), "retention must be longer than zero");
                Duration::ZERO
            }
            Ok(d) => {
                if d > LONG_RETENTION {
                    diags.warning(
                        h.retention.span(),
                        format!("stream '{name}' keeps records for more than a year: check that its purpose needs it"),
                    );
                }
                d
            }
            Err(err) => {
                diags.error(
                    h.retention.span(),
                    format!("invalid retention (write e.g. \"30d\" or \"12h\"): {err}"),
                );
                Duration::ZERO
            }
        };

        let time_field = h
            .time_field
            .as_ref()
            .map(|t| {
                if !valid_field_path(t.get_ref()) {
                    diags.error(t.span(), format!("invalid field path '{}'", t.get_ref()));
                }
                t.get_ref().clone()
            })
            .or_else(|| h.format.default_time_field().map(String::from));

        let time_bucket = h
            .time_bucket
            .as_ref()
            .and_then(|b| positive_duration(b, "time_bucket", diags));
        let key_epoch = h
            .key_epoch
            .as_ref()
            .and_then(|e| positive_duration(e, "key_epoch", diags))
            .unwrap_or(DEFAULT_KEY_EPOCH);
        if let Some(e) = &h.key_epoch
            && key_epoch > Duration::from_secs(7 * 24 * 3600)
        {
            diags.warning(
                e.span(),
                "a key epoch longer than 7 days lets pseudonyms link a device over a long time",
            );
        }

        let identifiers = compile_identifiers(h.identifiers, diags);

        let pseudonymises = identifiers.action == IdAction::Pseudonymise
            || stream
                .fields
                .iter()
                .any(|(_, t)| *t == Treatment::Pseudonymise);
        let personal_data = h.personal_data.as_ref().map(|p| {
            if !*p.get_ref() && pseudonymises {
                diags.error(
                    p.span(),
                    format!("stream '{name}' pseudonymises identifiers, so it processes personal data: personal_data cannot be false"),
                );
            }
            *p.get_ref()
        });

        let mut fields: Vec<(String, Treatment)> = Vec::new();
        for (path, treatment) in &stream.fields {
            let p = path.get_ref();
            if !valid_field_path(p) {
                diags.error(
                    path.span(),
                    format!("invalid field path '{p}': use names separated by '.'"),
                );
                continue;
            }
            if let Treatment::H3(cell) = treatment {
                if cell.resolution > 15 {
                    diags.error(
                        path.span(),
                        format!(
                            "H3 resolution {} is out of range (0 to 15)",
                            cell.resolution
                        ),
                    );
                } else if cell.resolution > 10 {
                    diags.warning(
                        path.span(),
                        format!("H3 resolution {} is finer than about 0.015 km²: it may single out a person", cell.resolution),
                    );
                }
            }
            if let Treatment::Grid(grid) = treatment {
                if !(grid.step.is_finite() && grid.step >= 0.000_001 && grid.step <= 10.0) {
                    diags.error(
                        path.span(),
                        "grid step must be between 0.000001 and 10 degrees",
                    );
                } else if grid.step < 0.001 {
                    diags.warning(
                        path.span(),
                        format!("a grid step of {}° is finer than about 100 m: it may single out a person", grid.step),
                    );
                }
            }
            if let Some((lat, lon)) = treatment.coordinates() {
                for src in [lat, lon] {
                    if !valid_field_path(src) {
                        diags.error(path.span(), format!("invalid field path '{src}'"));
                    } else if stream
                        .fields
                        .iter()
                        .any(|(q, t)| q.get_ref() == src && *t == Treatment::Keep)
                    {
                        diags.warning(
                            path.span(),
                            format!("'{src}' is generalised to a cell but also kept in clear"),
                        );
                    }
                }
            }
            if h.format.is_lorawan()
                && let Some(protected) = crate::lorawan::protected(p)
                && !protected.allows(treatment)
            {
                diags.error(path.span(), protected.explain(p));
            }
            if *treatment == Treatment::Keep {
                let leaf = p.rsplit('.').next().unwrap_or(p).to_ascii_lowercase();
                if IDENTIFIER_NAMES.contains(&leaf.as_str()) {
                    diags.warning(
                        path.span(),
                        format!("'{p}' looks like a direct identifier kept in clear: pseudonymise it, or drop it"),
                    );
                }
            }
            fields.push((p.clone(), treatment.clone()));
        }
        for (path, _) in &stream.fields {
            let p = path.get_ref();
            let prefix = format!("{p}.");
            if let Some((other, _)) = fields.iter().find(|(o, _)| o.starts_with(&prefix)) {
                diags.error(
                    path.span(),
                    format!(
                        "'{p}' is an object, since '{other}' is declared: declare leaf fields only"
                    ),
                );
            }
        }
        let aggregate = stream
            .aggregate
            .and_then(|a| aggregate::compile(a, &fields, time_bucket, diags));
        if stream.fields.is_empty() {
            diags.warning(
                stream.span.clone(),
                format!("stream '{name}' passes no fields"),
            );
        }
        if (pseudonymises || personal_data == Some(true))
            && aggregate.is_none()
            && time_bucket.is_none()
        {
            diags.warning(
                h.name.span(),
                format!(
                    "stream '{name}' processes personal data and has no time_bucket: its records leave as they arrive, so their timing tells when each reading was made; set a time_bucket (records are then released at the end of each bucket, in no order of arrival)"
                ),
            );
        }

        streams.push(StreamPolicy {
            name,
            topics,
            format: h.format,
            purpose: h.purpose.into_inner().trim().to_owned(),
            legal_basis: h.legal_basis.into_inner().trim().to_owned(),
            technology,
            personal_data,
            principles,
            retention,
            time_field,
            time_bucket,
            key_epoch,
            identifiers,
            fields,
            aggregate,
        });
    }
    if streams.len() == name_spans.len() {
        overlapping_aggregates(&mut streams, &name_spans, diags);
    }
    let has_new_errors = diags.0[errors_before..]
        .iter()
        .any(|d| d.severity == crate::diagnostics::Severity::Error);
    (!has_new_errors).then(|| Policy::new(streams))
}

/// Aggregated streams that take readings of the same topics (their filters overlap) let a group
/// one suppresses be derived from the other's (a total less the visible cells). Without noise
/// that is refused, unless both accept exact counts (then warned); with noise, they pay from one
/// shared budget, the smallest of their daily budgets, so that the epsilon spent on one
/// population of devices in a day stays bounded.
fn overlapping_aggregates(
    streams: &mut [StreamPolicy],
    name_spans: &[std::ops::Range<usize>],
    diags: &mut Diagnostics,
) {
    let n = streams.len();
    let overlap = |a: &StreamPolicy, b: &StreamPolicy| {
        a.topics
            .iter()
            .any(|x| b.topics.iter().any(|y| x.overlaps(y)))
    };
    // The budget pool of each noisy stream: the first stream it overlaps with, transitively.
    let mut pool: Vec<usize> = (0..n).collect();
    for j in 0..n {
        for i in 0..j {
            let (a, b) = (&streams[i], &streams[j]);
            if !overlap(a, b) {
                continue;
            }
            let (x, y) = match (&a.aggregate, &b.aggregate) {
                (Some(x), Some(y)) => (x, y),
                (None, None) => continue,
                (Some(agg), None) | (None, Some(agg)) => {
                    // Readings published one by one undo the counts of the same readings.
                    let (raw, aggregated) = if a.aggregate.is_none() {
                        (a, b)
                    } else {
                        (b, a)
                    };
                    let message = format!(
                        "stream '{}' publishes readings of the topics stream '{}' aggregates: its records undo the aggregate's minimum group size{}",
                        raw.name,
                        aggregated.name,
                        if agg.noise.is_some() {
                            " and noise"
                        } else {
                            ""
                        }
                    );
                    if agg.noise.is_none() && agg.accept_exact_counts {
                        diags.warning(name_spans[j].clone(), message);
                    } else {
                        diags.error(
                            name_spans[j].clone(),
                            format!("{message}; give the streams topics that do not overlap"),
                        );
                    }
                    continue;
                }
            };
            match (&x.noise, &y.noise) {
                (Some(_), Some(_)) => {
                    let root = pool[i];
                    let old = pool[j];
                    for p in pool.iter_mut() {
                        if *p == old {
                            *p = root;
                        }
                    }
                }
                (noise_x, noise_y) => {
                    let message = format!(
                        "streams '{}' and '{}' aggregate readings of the same topics and not both with noise: a group one suppresses can be derived from the other's (differencing)",
                        a.name, b.name
                    );
                    // Exact counts beside noisy ones undo the noise: never accepted.
                    let exact_both = noise_x.is_none() && noise_y.is_none();
                    if exact_both && x.accept_exact_counts && y.accept_exact_counts {
                        diags.warning(name_spans[j].clone(), message);
                    } else {
                        let fix = if exact_both {
                            "add [stream.aggregate.noise] to both, or set accept_exact_counts = true in both"
                        } else {
                            "add [stream.aggregate.noise] to both"
                        };
                        diags.error(name_spans[j].clone(), format!("{message}; {fix}"));
                    }
                }
            }
        }
    }
    for i in 0..n {
        let root = pool[i];
        let cap = (0..n)
            .filter(|&j| pool[j] == root)
            .filter_map(|j| streams[j].aggregate.as_ref()?.noise.as_ref())
            .map(|noise| noise.daily_budget_micro)
            .min();
        let root_name = streams[root].name.clone();
        if let Some(noise) = streams[i].aggregate.as_mut().and_then(|a| a.noise.as_mut()) {
            noise.budget_pool = root_name;
            noise.pool_budget_micro = cap.unwrap_or(noise.daily_budget_micro);
        }
    }
}

fn compile_identifiers(raw: Option<RawIdentifiers>, diags: &mut Diagnostics) -> IdentifierPolicy {
    let raw = raw.unwrap_or(RawIdentifiers {
        action: IdAction::Drop,
        detect: None,
        plate_patterns: Vec::new(),
    });
    let detect = match &raw.detect {
        Some(kinds) => {
            let missing: Vec<&str> = IdKind::ALL
                .iter()
                .filter(|k| !kinds.get_ref().contains(k))
                .map(|k| k.name())
                .collect();
            if !missing.is_empty() {
                diags.warning(
                    kinds.span(),
                    format!("identifier detectors turned off: {}", missing.join(", ")),
                );
            }
            kinds.get_ref().clone()
        }
        None => IdKind::ALL.to_vec(),
    };
    let mut plates = Vec::new();
    for pattern in &raw.plate_patterns {
        match crate::identifiers::plate_pattern(pattern.get_ref()) {
            Ok(re) => plates.push(re),
            Err(err) => diags.error(pattern.span(), format!("invalid plate pattern: {err}")),
        }
    }
    IdentifierPolicy {
        action: raw.action,
        detect: detect.clone(),
        plate_patterns: raw
            .plate_patterns
            .iter()
            .map(|p| p.get_ref().clone())
            .collect(),
        detector: Detector::new(detect, plates),
    }
}

/// Parses and compiles a document that holds only `[[stream]]` tables (used by tests and tools).
pub fn from_toml(source: &str) -> Result<(Policy, Diagnostics), Diagnostics> {
    let doc = crate::diagnostics::parse_document(source)?;
    let mut diags = Diagnostics::default();
    let mut raw = Vec::new();
    for (key, value) in doc {
        if key.get_ref() == "stream" {
            raw = parse_streams(value, &mut diags);
        } else {
            diags.error(
                key.span(),
                format!("unknown section '{}', expected 'stream'", key.get_ref()),
            );
        }
    }
    match compile(raw, &mut diags) {
        Some(policy) if !diags.has_errors() => Ok((policy, diags)),
        _ => Err(diags),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostics::Severity;

    const AIR: &str = r#"
[[stream]]
name = "air_quality"
topics = ["city/air/+/reading"]
purpose = "Inform public-health advice"
legal_basis = "public task"
principles = ["sustainability_resilience"]
technology = "tech__air_quality"
retention = "30d"
time_field = "ts"

[stream.fields]
station_id = "keep"
"location.district" = "keep"
pm25 = "keep"
"#;

    fn errors(src: &str) -> Vec<(usize, usize, String)> {
        let diags = from_toml(src).expect_err("policy must be rejected");
        diags
            .into_sorted()
            .into_iter()
            .filter(|d| d.severity == Severity::Error)
            .map(|d| {
                let (l, c) = d.position(src);
                (l, c, d.message)
            })
            .collect()
    }

    #[test]
    fn a_valid_policy_compiles() {
        let (policy, diags) = from_toml(AIR).unwrap();
        assert!(diags.0.is_empty(), "{diags:?}");
        let s = &policy.streams()[0];
        assert_eq!(s.name, "air_quality");
        assert_eq!(s.retention, Duration::from_secs(30 * 86400));
        assert_eq!(s.time_field.as_deref(), Some("ts"));
        let paths: Vec<_> = s.fields.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["station_id", "location.district", "pm25"]);
        assert_eq!(
            policy.route("city/air/st-1/reading").collect::<Vec<_>>(),
            [0]
        );
        assert_eq!(policy.route("city/noise/m-1").count(), 0);
        assert_eq!(policy.hash_hex().len(), 64);
    }

    /// LoRaWAN streams: the device's identity may be pseudonymised, never kept; the frame
    /// counter never passes; positions only as cells; the event time is the network server's.
    #[test]
    fn lorawan_identity_counter_and_positions_are_protected() {
        let stream = |fields: &str| {
            format!(
                "[[stream]]\nname = \"bins\"\ntopics = [\"application/+/device/+/event/up\"]\n\
                 format = \"chirpstack\"\npurpose = \"Bins\"\nlegal_basis = \"public task\"\n\
                 principles = [\"sustainability_resilience\"]\ntechnology = \"tech__waste\"\n\
                 retention = \"1d\"\n\n[stream.fields]\nfill = \"keep\"\n{fields}"
            )
        };
        let (policy, _) = from_toml(&stream(
            "\"lorawan.dev_eui\" = \"pseudonymise\"\n\
             cell = { h3 = { resolution = 7, lat = \"lorawan.gateway.lat\", lon = \"lorawan.gateway.lon\" } }\n\
             \"lorawan.rssi\" = \"keep\"\n",
        ))
        .unwrap();
        assert_eq!(
            policy.streams()[0].time_field.as_deref(),
            Some(crate::lorawan::TIME)
        );
        for (line, why) in [
            (
                "\"lorawan.dev_eui\" = \"keep\"",
                "identifies the LoRaWAN device",
            ),
            (
                "\"lorawan.device_name\" = \"keep\"",
                "identifies the LoRaWAN device",
            ),
            (
                "\"lorawan.f_cnt\" = \"keep\"",
                "links the device's messages",
            ),
            (
                "\"lorawan.f_cnt\" = \"pseudonymise\"",
                "links the device's messages",
            ),
            ("\"lorawan.gateway.lat\" = \"keep\"", "locates the device"),
            (
                "\"lorawan.location.lon\" = \"pseudonymise\"",
                "locates the device",
            ),
        ] {
            let src = stream(&format!("{line}\n"));
            let errors = errors(&src);
            assert_eq!(errors.len(), 1, "{line}: {errors:?}");
            assert_eq!(errors[0].0, 13, "{line}: reported at its key");
            assert!(errors[0].2.contains(why), "{line}: {errors:?}");
        }
        // The same names in a JSON stream are the payload's own.
        let json = stream("\"lorawan.dev_eui\" = \"keep\"\n").replace("chirpstack", "json");
        assert!(from_toml(&json).is_ok());
    }

    #[test]
    fn the_hash_ignores_layout_but_not_content() {
        let (a, _) = from_toml(AIR).unwrap();
        let reformatted = AIR.replace(
            "pm25 = \"keep\"",
            "# particulate matter\npm25   =   \"keep\"",
        );
        let (b, _) = from_toml(&reformatted).unwrap();
        assert_eq!(a.hash(), b.hash());
        let (c, _) = from_toml(&AIR.replace("\"30d\"", "\"31d\"")).unwrap();
        assert_ne!(a.hash(), c.hash());
        let (d, _) = from_toml(&AIR.replace("pm25 = \"keep\"\n", "")).unwrap();
        assert_ne!(a.hash(), d.hash());
    }

    #[test]
    fn an_unknown_key_is_reported_at_the_typo() {
        let src = AIR.replace("time_field = \"ts\"", "time_feild = \"ts\"");
        let errs = errors(&src);
        assert_eq!(errs.len(), 1, "{errs:?}");
        let (line, col, msg) = &errs[0];
        assert!(msg.contains("unknown field 'time_feild'"), "{msg}");
        assert_eq!((*line, *col), (10, 1));
    }

    #[test]
    fn every_error_is_reported_with_its_position() {
        let src = r#"
[[stream]]
name = "Air Quality"
topics = ["city/#/x"]
purpose = ""
legal_basis = "public task"
principles = ["sustainability_resilience"]
retention = "30 fortnights"

[stream.fields]
pm25 = "keep"
pm10 = "blur"

[[stream]]
name = "noise"
topics = ["city/noise/+"]
purpose = "Noise maps"
legal_basis = "public task"
principles = []
retention = "7d"

[stream.fields]
laeq = "keep"
"#;
        let errs = errors(src);
        let lines: Vec<usize> = errs.iter().map(|e| e.0).collect();
        assert_eq!(lines, [3, 4, 5, 8, 12, 19], "{errs:#?}");
        assert!(errs[0].2.contains("stream name 'Air Quality'"));
        assert!(errs[1].2.contains("'#' must be the last level"));
        assert!(errs[2].2.contains("must state its purpose"));
        assert!(errs[3].2.contains("invalid retention"));
        assert!(
            errs[4].2.contains("unknown variant 'blur'"),
            "{}",
            errs[4].2
        );
        assert!(errs[5].2.contains("at least one guideline principle"));
    }

    #[test]
    fn unquoted_dotted_paths_are_explained() {
        let src = AIR.replace(
            "\"location.district\" = \"keep\"",
            "location.district = \"keep\"",
        );
        let errs = errors(&src);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].2.contains("quote dotted paths"), "{}", errs[0].2);
    }

    #[test]
    fn object_paths_and_duplicates_are_rejected() {
        // The same stream twice, the first with an object path.
        let src = format!("{AIR}\"location\" = \"keep\"\n{AIR}");
        let errs = errors(&src);
        assert!(
            errs.iter().any(|e| e.2.contains("'location' is an object")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.2.contains("declared twice")),
            "{errs:?}"
        );
    }

    #[test]
    fn missing_fields_table_is_an_error() {
        let src = AIR.split("[stream.fields]").next().unwrap().to_owned();
        let errs = errors(&src);
        assert!(errs[0].2.contains("missing table 'fields'"), "{errs:?}");
    }

    #[test]
    fn long_retention_is_a_warning() {
        let (_, diags) = from_toml(&AIR.replace("\"30d\"", "\"400days\"")).unwrap();
        assert_eq!(diags.0.len(), 1);
        assert_eq!(diags.0[0].severity, Severity::Warning);
    }

    #[test]
    fn technology_and_personal_data_are_checked_for_the_register() {
        let (policy, _) = from_toml(AIR).unwrap();
        assert_eq!(
            policy.streams()[0].technology.as_deref(),
            Some("tech__air_quality")
        );
        // Not declaring the technology is a warning at the stream's name.
        let (_, diags) =
            from_toml(&AIR.replace("technology = \"tech__air_quality\"\n", "")).unwrap();
        assert_eq!(diags.0.len(), 1);
        assert!(diags.0[0].message.contains("names no sensing technology"));
        // A technology that is not a DTPR id.
        let errs = errors(&AIR.replace("\"tech__air_quality\"", "\"Air Sensor\""));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].0, 8);
        // A stream that pseudonymises cannot say it processes no personal data.
        let src = AIR
            .replace("station_id = \"keep\"", "station_id = \"pseudonymise\"")
            .replace(
                "retention = \"30d\"",
                "retention = \"30d\"\npersonal_data = false",
            );
        let errs = errors(&src);
        assert!(
            errs[0].2.contains("personal_data cannot be false"),
            "{errs:?}"
        );
        // Declaring it changes the policy's hash: the register is part of what the hash names.
        let (declared, _) = from_toml(&AIR.replace(
            "retention = \"30d\"",
            "retention = \"30d\"\npersonal_data = true",
        ))
        .unwrap();
        assert_eq!(declared.streams()[0].personal_data, Some(true));
        assert_ne!(declared.hash(), policy.hash());
    }
}
