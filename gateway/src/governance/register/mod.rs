//! The transparency register: what the hub collects, why, how it reduces it, who receives it and
//! how long it is kept, generated from the compiled policy and the deployment's configuration,
//! never written by hand.
//!
//! Per stream it gives the elements of the DTPR taxonomy (Digital Trust for Places & Routines:
//! accountable, purpose, technology, data, process, access, storage, retention), with DTPR ids
//! where the taxonomy has one (`tech__…`, `process__de_identified`, `process__aggregated`,
//! `process__k_anonymity`, `process__differential_privacy`, `storage__stored_locally`,
//! `retention__data_retained`), and the fields of public sensor registers such as Amsterdam's
//! (type, owner, location, purpose, personal data, end date).
//!
//! One [`Register`] renders five ways: JSON (`/transparency.json`, and `GetPolicy` over gRPC), an
//! HTML page (`/transparency`, see [`html`]), plain text (`hubgate explain`), a record of
//! processing activities after GDPR Article 30 (`/processing-record`, `hubgate explain --format
//! art30`), and Smart Data Models `PrivacyObject` entities for FIWARE and OASC MIMs platforms
//! (`/transparency.ngsi-ld.json`, `hubgate explain --format ngsi-ld`, see [`ngsi_ld`]). Every
//! rendering carries the policy's hash.

pub mod html;
pub mod ngsi_ld;

use std::fmt::Write as _;
use std::time::Duration;

use hubgate_privacy::Policy;
use hubgate_privacy::policy::aggregate::{Aggregation, Measure, MeasureFn, Noise};
use hubgate_privacy::policy::{IdAction, StreamPolicy, Treatment};
use hubgate_privacy::window::Selection;
use serde::Serialize;

use crate::config::{Config, GrpcConfig, NatsConfig, RegisterConfig, TokenConfig, UpstreamConfig};

/// Version of the register's JSON form.
pub const REGISTER_VERSION: u32 = 1;

/// Said where the configuration leaves a fact out.
const NOT_DECLARED: &str = "not declared";

/// The register of a running policy.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Register {
    pub register_version: u32,
    /// Content hash of the compiled policy (as in every record and in the audit log).
    pub policy_hash: String,
    /// The hub's name: its MQTT client id, which is unique per gateway.
    pub hub: String,
    /// When the policy was loaded, RFC 3339 UTC.
    pub loaded_at: String,
    pub software: String,
    pub accountable: Accountable,
    /// Where the hub and its sensors are.
    pub location: Option<String>,
    /// The public address of the transparency page.
    pub public_url: Option<String>,
    /// When the deployment is planned to end.
    pub end_date: Option<String>,
    pub streams: Vec<StreamEntry>,
}

/// Who is accountable for the hub.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Accountable {
    pub controller: Option<String>,
    pub contact: Option<String>,
    pub dpo_contact: Option<String>,
}

/// One element of the notice: a DTPR id where the taxonomy has one, a title and what it means
/// here.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Element {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtpr: Option<String>,
    pub title: String,
    pub description: String,
}

/// A payload field the stream reads, and what happens to it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FieldEntry {
    pub field: String,
    pub treatment: String,
    pub description: String,
}

/// A guideline principle, by id and title.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PrincipleEntry {
    pub id: String,
    pub title: String,
}

/// The fields of a public sensor register (Amsterdam's, for one).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SensorRegisterEntry {
    #[serde(rename = "type")]
    pub sensor_type: String,
    pub owner: String,
    pub location: String,
    pub purpose: String,
    pub personal_data: bool,
    pub end_date: String,
}

/// Everything the register says about one stream.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StreamEntry {
    pub name: String,
    pub technology: Element,
    pub purpose: String,
    pub legal_basis: String,
    pub principles: Vec<PrincipleEntry>,
    /// Whether personal data is processed at the hub (before it is reduced).
    pub personal_data: bool,
    pub personal_data_note: String,
    /// MQTT topic filters the stream takes readings from.
    pub topics: Vec<String>,
    /// The payload fields read, and their treatment; every other field is dropped unread.
    pub data_collected: Vec<FieldEntry>,
    pub data_dropped: String,
    /// The fields of the records that leave the hub.
    pub data_published: Vec<String>,
    pub time: String,
    /// When records become visible to anyone outside the hub.
    pub release: String,
    /// How long records are held before they are released, at most (seconds); none when they
    /// leave as they are kept.
    pub release_delay_seconds: Option<u64>,
    pub processing: Vec<Element>,
    pub storage: Vec<Element>,
    pub access: Vec<Element>,
    /// Who receives the published records, as URIs: `urn:ngsi-ld:User:<token name>` for each API
    /// client that may subscribe (`urn:ngsi-ld:User:any-api-client` when the API asks for no
    /// token), and the addresses of the upstream hub and the NATS server that records are sent to.
    pub recipients: Vec<String>,
    pub retention: Element,
    pub retention_seconds: u64,
    pub sensor_register: SensorRegisterEntry,
}

/// What the register says of the hub's configuration, beside the policy.
#[derive(Debug, Clone, Copy)]
pub struct Deployment<'a> {
    /// The hub's name (its MQTT client id).
    pub hub: &'a str,
    pub site: &'a RegisterConfig,
    pub upstream: Option<&'a UpstreamConfig>,
    pub nats: Option<&'a NatsConfig>,
    pub grpc: &'a GrpcConfig,
}

impl Register {
    /// The register of `config`'s policy, loaded at `loaded_at` (RFC 3339).
    pub fn new(config: &Config, loaded_at: &str) -> Self {
        Self::build(
            &config.policy,
            Deployment {
                hub: &config.mqtt.client_id,
                site: &config.register,
                upstream: config.upstream.as_ref(),
                nats: config.nats.as_ref(),
                grpc: &config.grpc,
            },
            loaded_at,
        )
    }

    /// The register of `policy` on a hub deployed as `deployment` says: the site, the upstream
    /// hub and NATS server records go to, the API's TLS and client tokens.
    pub fn build(policy: &Policy, deployment: Deployment<'_>, loaded_at: &str) -> Self {
        let site = deployment.site;
        Self {
            register_version: REGISTER_VERSION,
            policy_hash: policy.hash_hex(),
            hub: deployment.hub.to_owned(),
            loaded_at: loaded_at.to_owned(),
            software: format!("hubgate {}", env!("CARGO_PKG_VERSION")),
            accountable: Accountable {
                controller: site.controller.clone(),
                contact: site.contact.clone(),
                dpo_contact: site.dpo_contact.clone(),
            },
            location: site.location.clone(),
            public_url: site.public_url.clone(),
            end_date: site.end_date.clone(),
            streams: policy
                .streams()
                .iter()
                .map(|s| stream_entry(s, deployment))
                .collect(),
        }
    }

    /// The JSON form (`/transparency.json`, `GetPolicy`).
    pub fn to_json(&self) -> String {
        // Plain data: serialising cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Plain text for `hubgate explain`.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let or_not = |o: &Option<String>| o.clone().unwrap_or_else(|| NOT_DECLARED.to_owned());
        let _ = writeln!(
            out,
            "Transparency register (generated from the running policy)"
        );
        let _ = writeln!(out, "policy {}", self.policy_hash);
        let _ = writeln!(out, "loaded {} by {}", self.loaded_at, self.software);
        let _ = writeln!(out);
        let _ = writeln!(out, "Accountable: {}", or_not(&self.accountable.controller));
        let _ = writeln!(out, "Contact: {}", or_not(&self.accountable.contact));
        if let Some(dpo) = &self.accountable.dpo_contact {
            let _ = writeln!(out, "Data protection officer: {dpo}");
        }
        let _ = writeln!(out, "Location: {}", or_not(&self.location));
        let _ = writeln!(out, "End date: {}", or_not(&self.end_date));
        for s in &self.streams {
            let _ = writeln!(out, "\n== {} ==", s.name);
            let _ = writeln!(
                out,
                "Technology: {}{}",
                s.technology.title,
                s.technology
                    .dtpr
                    .as_ref()
                    .map(|id| format!(" ({id})"))
                    .unwrap_or_default()
            );
            let _ = writeln!(out, "Purpose: {}", s.purpose);
            let _ = writeln!(out, "Legal basis: {}", s.legal_basis);
            let principles: Vec<&str> = s.principles.iter().map(|p| p.title.as_str()).collect();
            let _ = writeln!(out, "Guideline principles: {}", principles.join("; "));
            let _ = writeln!(
                out,
                "Personal data: {} ({})",
                if s.personal_data { "yes" } else { "no" },
                s.personal_data_note
            );
            let _ = writeln!(out, "Data collected:");
            for f in &s.data_collected {
                let _ = writeln!(out, "  - {}: {}", f.field, f.description);
            }
            let _ = writeln!(out, "  {}", s.data_dropped);
            let _ = writeln!(out, "Published fields: {}", s.data_published.join(", "));
            let _ = writeln!(out, "Time: {}", s.time);
            let _ = writeln!(out, "Release: {}", s.release);
            for (heading, elements) in [
                ("Processing", &s.processing),
                ("Storage", &s.storage),
                ("Access", &s.access),
            ] {
                let _ = writeln!(out, "{heading}:");
                for e in elements {
                    let id = e
                        .dtpr
                        .as_ref()
                        .map(|d| format!(" [{d}]"))
                        .unwrap_or_default();
                    let _ = writeln!(out, "  - {}{id}: {}", e.title, e.description);
                }
            }
            let _ = writeln!(out, "Retention: {}", s.retention.description);
        }
        out
    }

    /// A record of processing activities after GDPR Article 30(1), in Markdown, one processing
    /// activity per stream.
    pub fn to_art30(&self) -> String {
        let mut out = String::new();
        let or_not = |o: &Option<String>| o.clone().unwrap_or_else(|| NOT_DECLARED.to_owned());
        let _ = writeln!(out, "# Record of processing activities (GDPR Article 30)\n");
        let _ = writeln!(
            out,
            "Generated from the running policy `{}` (loaded {}, {}). Every statement below is \
             derived from that policy and the hub's configuration.\n",
            self.policy_hash, self.loaded_at, self.software
        );
        let _ = writeln!(
            out,
            "- **Controller** (Art. 30(1)(a)): {}",
            or_not(&self.accountable.controller)
        );
        let _ = writeln!(out, "- **Contact**: {}", or_not(&self.accountable.contact));
        let _ = writeln!(
            out,
            "- **Data protection officer**: {}",
            or_not(&self.accountable.dpo_contact)
        );
        let _ = writeln!(
            out,
            "- **Location of the processing**: {}",
            or_not(&self.location)
        );
        let _ = writeln!(out, "- **Planned end**: {}", or_not(&self.end_date));
        for s in &self.streams {
            art30_activity(&mut out, s);
        }
        out
    }
}

/// Writes one stream's processing activity, a table of the items of Article 30(1).
fn art30_activity(out: &mut String, s: &StreamEntry) {
    let _ = writeln!(out, "\n## Processing activity: {}\n", s.name);
    let _ = writeln!(out, "| Article 30(1) | |\n|---|---|");
    art30_row(out, "(b) Purpose", &s.purpose);
    art30_row(out, "Legal basis (Art. 6)", &s.legal_basis);
    art30_row(
        out,
        "(c) Categories of data subjects",
        if s.personal_data {
            "People whose devices or vehicles the sensors detect in the monitored area"
        } else {
            "None expected: the stream is not designed to process personal data"
        },
    );
    let data: Vec<String> = s
        .data_collected
        .iter()
        .map(|f| format!("{} ({})", f.field, f.treatment))
        .collect();
    art30_row(
        out,
        "(c) Categories of personal data",
        &format!(
            "{}. Personal data: {} ({}). Read from the payload: {}. {}",
            s.technology.title,
            if s.personal_data { "yes" } else { "no" },
            s.personal_data_note,
            data.join(", "),
            s.data_dropped
        ),
    );
    let recipients: Vec<String> = s
        .access
        .iter()
        .map(|e| format!("{}: {}", e.title, e.description))
        .collect();
    art30_row(out, "(d) Categories of recipients", &recipients.join(" "));
    art30_row(
        out,
        "(e) Transfers to third countries",
        "None by the gateway: records stay on the hub unless an upstream hub is named among the recipients",
    );
    art30_row(out, "(f) Time limits for erasure", &s.retention.description);
    let measures: Vec<String> = s
        .processing
        .iter()
        .chain(&s.storage)
        .map(|e| format!("{}: {}", e.title, e.description))
        .collect();
    art30_row(
        out,
        "(g) Technical and organisational security measures",
        &format!(
            "{} Audit: a hash-chained audit log records policy loads, key rotations and destructions, purges and privacy-budget spending.",
            measures.join(" ")
        ),
    );
}

/// One row of an Article 30 table; the value is kept on one line and cannot end the cell.
fn art30_row(out: &mut String, k: &str, v: &str) {
    let _ = writeln!(
        out,
        "| {k} | {} |",
        v.replace('|', "\\|").replace('\n', " ")
    );
}

fn stream_entry(s: &StreamPolicy, d: Deployment<'_>) -> StreamEntry {
    let technology = technology(s.technology.as_deref());
    let pseudonymised = pseudonymised_fields(s);
    let (personal_data, personal_data_note) = personal_data(s, &pseudonymised);
    let forwarded = d.upstream.filter(|u| {
        u.streams
            .as_ref()
            .is_none_or(|names| names.contains(&s.name))
    });
    let exported = d.nats.filter(|n| {
        n.streams
            .as_ref()
            .is_none_or(|names| names.contains(&s.name))
    });
    let sensor_register = sensor_register(s, d.site, &technology, personal_data);
    StreamEntry {
        name: s.name.clone(),
        technology,
        purpose: s.purpose.clone(),
        legal_basis: s.legal_basis.clone(),
        principles: principles(s),
        personal_data,
        personal_data_note,
        topics: s.topics.iter().map(|t| t.as_str().to_owned()).collect(),
        data_collected: data_collected(s),
        data_dropped: "Every other field of a reading is dropped on arrival, unread.".to_owned(),
        data_published: s.output_fields().into_iter().map(str::to_owned).collect(),
        time: time_treatment(s),
        release: release(s),
        release_delay_seconds: s.release_delay().map(|d| d.as_secs()),
        processing: processing(s, &pseudonymised),
        storage: storage(forwarded),
        access: access(s, d.grpc, forwarded.is_some(), exported),
        recipients: recipients(s, d.grpc, forwarded, exported),
        retention_seconds: s.retention.as_secs(),
        retention: retention(s),
        sensor_register,
    }
}

/// The URIs of who receives the stream's records: each API client that may subscribe, by its
/// token's name; the upstream hub and the NATS server, by address (without credentials).
fn recipients(
    s: &StreamPolicy,
    grpc: &GrpcConfig,
    forwarded: Option<&UpstreamConfig>,
    exported: Option<&NatsConfig>,
) -> Vec<String> {
    let mut out: Vec<String> = if grpc.tokens.is_empty() {
        vec!["urn:ngsi-ld:User:any-api-client".to_owned()]
    } else {
        grpc.tokens
            .iter()
            .filter(|t| may_subscribe(t, s))
            .map(|t| format!("urn:ngsi-ld:User:{}", urn_part(&t.name)))
            .collect()
    };
    out.extend(forwarded.map(|up| crate::config::redacted(&up.endpoint)));
    out.extend(exported.map(|n| crate::config::redacted(&n.url)));
    out
}

/// `name` as a URN's specific part: characters outside letters, digits and `-._~` are
/// percent-encoded.
pub(crate) fn urn_part(name: &str) -> String {
    const KEPT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(name, KEPT).to_string()
}

/// Whether the client holding `token` may subscribe to `s`.
fn may_subscribe(token: &TokenConfig, s: &StreamPolicy) -> bool {
    token.streams.iter().any(|n| n == "*" || *n == s.name)
}

/// The paths of the fields the stream pseudonymises.
fn pseudonymised_fields(s: &StreamPolicy) -> Vec<&str> {
    s.fields
        .iter()
        .filter(|(_, t)| *t == Treatment::Pseudonymise)
        .map(|(p, _)| p.as_str())
        .collect()
}

/// Whether the hub processes personal data for the stream, and why the register says so.
fn personal_data(s: &StreamPolicy, pseudonymised: &[&str]) -> (bool, String) {
    let pseudonymises = !pseudonymised.is_empty() || s.identifiers.action == IdAction::Pseudonymise;
    let personal_data = pseudonymises || s.personal_data == Some(true);
    let note = if !pseudonymises && personal_data {
        "the policy declares that the sensors may capture personal data; identifiers found in text are dropped at the hub".to_owned()
    } else if personal_data {
        let mut note = String::from("device or personal identifiers are read at the hub");
        if !pseudonymised.is_empty() {
            let _ = write!(
                note,
                " and replaced there by keyed pseudonyms ({})",
                pseudonymised.join(", ")
            );
        }
        if s.aggregate.is_some() {
            note.push_str("; only aggregates of groups leave the hub");
        }
        note
    } else {
        "no field is declared as identifying; identifiers found in text are dropped".to_owned()
    };
    (personal_data, note)
}

/// The guideline principles the stream follows, by id and title.
fn principles(s: &StreamPolicy) -> Vec<PrincipleEntry> {
    s.principles
        .iter()
        .map(|p| PrincipleEntry {
            id: serde_json::to_value(p)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            title: p.title().to_owned(),
        })
        .collect()
}

/// The payload fields the stream reads, each with its treatment, then its time field.
fn data_collected(s: &StreamPolicy) -> Vec<FieldEntry> {
    let mut data_collected: Vec<FieldEntry> = s
        .fields
        .iter()
        .map(|(path, treatment)| {
            let (name, description) = field_treatment(treatment, s.key_epoch);
            FieldEntry {
                field: path.clone(),
                treatment: name.to_owned(),
                description,
            }
        })
        .collect();
    if let Some(time) = &s.time_field {
        data_collected.push(FieldEntry {
            field: time.clone(),
            treatment: "time".to_owned(),
            description: "the reading's time".to_owned(),
        });
    }
    data_collected
}

/// A field treatment's name and what it does to the field; pseudonym keys change every
/// `key_epoch`.
fn field_treatment(treatment: &Treatment, key_epoch: Duration) -> (&'static str, String) {
    match treatment {
        Treatment::Keep => (
            "keep",
            "kept as sent (text is scanned for identifiers)".to_owned(),
        ),
        Treatment::Pseudonymise => (
            "pseudonymise",
            format!(
                "replaced by a keyed pseudonym; the key changes every {} and is then destroyed, so pseudonyms of different periods cannot be linked",
                plain_duration(key_epoch).trim_start_matches("1 ")
            ),
        ),
        Treatment::H3(cell) => (
            "h3",
            format!(
                "the position ({}, {}) is generalised to an H3 cell of resolution {} (about {} on average); the coordinates are dropped",
                cell.lat,
                cell.lon,
                cell.resolution,
                area(cell.average_area_km2())
            ),
        ),
        Treatment::Grid(grid) => (
            "grid",
            format!(
                "the position ({}, {}) is generalised to a grid cell of {}° (about {:.1} km north to south); the coordinates are dropped",
                grid.lat,
                grid.lon,
                grid.step,
                grid.step * 111.2
            ),
        ),
    }
}

/// What happens to the readings' times.
/// When records become visible outside the hub.
fn release(s: &StreamPolicy) -> String {
    match (&s.aggregate, s.release_delay()) {
        (Some(a), _) => format!(
            "only at the end of each window of {}{}, one record per group that passes",
            plain_duration(a.window),
            if a.allowed_lateness.is_zero() {
                String::new()
            } else {
                format!(
                    " and its allowed lateness of {}",
                    plain_duration(a.allowed_lateness)
                )
            }
        ),
        (None, Some(bucket)) => format!(
            "held until the end of each {} and released together, in an order unrelated to arrival, so that neither when a record appears nor its place tells more than its rounded time",
            plain_duration(bucket)
        ),
        (None, None) => "as soon as they are stored".to_owned(),
    }
}

fn time_treatment(s: &StreamPolicy) -> String {
    match (&s.aggregate, s.time_bucket) {
        (Some(a), _) => format!(
            "readings are counted in windows of {}; records carry the window's start",
            plain_duration(a.window)
        ),
        (None, Some(bucket)) => format!(
            "reading times are rounded down to {}",
            plain_duration(bucket)
        ),
        (None, None) => "reading times are kept as sent".to_owned(),
    }
}

/// The DTPR process elements: de-identification, then aggregation and what protects it.
fn processing(s: &StreamPolicy, pseudonymised: &[&str]) -> Vec<Element> {
    let mut processing = vec![de_identified(s, pseudonymised)];
    if let Some(a) = &s.aggregate {
        processing.push(aggregated(a));
        if a.min_group_size > 1 || a.noise.is_some() {
            processing.push(k_anonymity(a));
        }
        if let Some(noise) = &a.noise {
            processing.push(differential_privacy(s, a, noise));
        }
    }
    processing
}

/// `process__de_identified`: each step that removes or coarsens what identifies.
fn de_identified(s: &StreamPolicy, pseudonymised: &[&str]) -> Element {
    let detected: Vec<&str> = s.identifiers.detect.iter().map(|k| k.name()).collect();
    let mut steps = vec![format!(
        "every field the policy does not declare is dropped on arrival; text values in which a direct identifier is found ({}) are {}",
        detected.join(", "),
        match s.identifiers.action {
            IdAction::Drop => "dropped",
            IdAction::Pseudonymise => "replaced by keyed pseudonyms",
        }
    )];
    if !pseudonymised.is_empty() {
        steps.push(format!("{} pseudonymised", pseudonymised.join(", ")));
    }
    let generalised: Vec<&str> = s
        .fields
        .iter()
        .filter(|(_, t)| t.coordinates().is_some())
        .map(|(p, _)| p.as_str())
        .collect();
    if !generalised.is_empty() {
        steps.push(format!(
            "locations generalised ({})",
            generalised.join(", ")
        ));
    }
    if s.time_bucket.is_some() {
        steps.push("times coarsened".to_owned());
    }
    Element {
        dtpr: Some("process__de_identified".to_owned()),
        title: "De-identified".to_owned(),
        description: format!("{}.", capitalise(&steps.join("; "))),
    }
}

/// `process__aggregated`: the groups, the window and the figures published.
fn aggregated(a: &Aggregation) -> Element {
    let measures: Vec<String> = a
        .measures
        .iter()
        .map(|m| format!("{} ({})", m.name, measure_text(a, m)))
        .collect();
    Element {
        dtpr: Some("process__aggregated".to_owned()),
        title: "Aggregated".to_owned(),
        description: format!(
            "Readings are combined per {} in windows of {}; only these figures leave the hub: {}. No individual reading or pseudonym is published.",
            if a.group_by.is_empty() {
                "stream".to_owned()
            } else {
                a.group_by.join(" and ")
            },
            plain_duration(a.window),
            measures.join(", ")
        ),
    }
}

/// What a measure of an aggregation figures, in words.
fn measure_text(a: &Aggregation, m: &Measure) -> String {
    let field = m.field.as_deref().unwrap_or_default();
    match m.func {
        MeasureFn::Count => "number of readings".to_owned(),
        MeasureFn::Contributors => format!("number of distinct {}", a.contributor),
        MeasureFn::Distinct => format!("number of distinct {field}"),
        MeasureFn::Sum => format!("sum of {field}"),
        MeasureFn::Mean => format!("mean of {field}"),
        MeasureFn::Min => format!("minimum of {field}"),
        MeasureFn::Max => format!("maximum of {field}"),
    }
}

/// `process__k_anonymity`: the least group published and, under noise, the release threshold.
fn k_anonymity(a: &Aggregation) -> Element {
    let description = match &a.noise {
        None => format!(
            "A group is published only when at least {} distinct {} contributed to it in the window; smaller groups are discarded.",
            a.min_group_size, a.contributor
        ),
        Some(noise) => {
            let selection = Selection::new(a, noise, 1);
            format!(
                "A group is published only when at least {k} distinct {c} contributed to it in the window and its noisy count of them reaches {t} (more in a window the key change falls in); other groups are discarded. A group of exactly {k} is published with probability at most {d:e}, so whether a group appears does not reveal whether one {c} was in it.",
                k = a.min_group_size,
                c = a.contributor,
                t = selection.threshold(),
                d = selection.group_delta(),
            )
        }
    };
    Element {
        dtpr: Some("process__k_anonymity".to_owned()),
        title: "k-anonymity".to_owned(),
        description,
    }
}

/// `process__differential_privacy`: the noise added and the budget that bounds it.
fn differential_privacy(s: &StreamPolicy, a: &Aggregation, noise: &Noise) -> Element {
    let pool = if noise.budget_pool == s.name && noise.pool_budget_micro == noise.daily_budget_micro
    {
        String::new()
    } else {
        format!(
            ", for every stream of the budget pool '{}' together (streams that count the same readings)",
            noise.budget_pool
        )
    };
    Element {
        dtpr: Some("process__differential_privacy".to_owned()),
        title: "Differential privacy".to_owned(),
        description: format!(
            "Random noise (discrete Laplace) is added to every published figure: (ε = {}, δ = {:e})-differential privacy per window of {} for each {}, which is counted at most {} times per window and key period; every window is paid for as it closes, at most {} per UTC day{pool}; publication stops for the day when the budget is spent.",
            noise.epsilon_micro as f64 / 1e6,
            noise.delta,
            plain_duration(a.window),
            a.contributor,
            noise.max_contributions,
            noise.pool_budget_micro as f64 / 1e6,
        ),
    }
}

/// Where the published records are kept: on the hub, and at the upstream hub it forwards to.
fn storage(forwarded: Option<&UpstreamConfig>) -> Vec<Element> {
    let mut storage = vec![Element {
        dtpr: Some("storage__stored_locally".to_owned()),
        title: "Stored locally".to_owned(),
        description: "Only the records left after the steps above are stored, on the hub's own disk, encrypted under per-stream keys (ChaCha20-Poly1305). Raw readings are never stored.".to_owned(),
    }];
    if let Some(up) = forwarded {
        storage.push(Element {
            dtpr: None,
            title: "Forwarded to an upstream hub".to_owned(),
            description: format!(
                "The published records are sent to the hub at {} (as origin '{}'), which keeps them under its own policy.",
                crate::config::redacted(&up.endpoint),
                up.origin
            ),
        });
    }
    storage
}

/// Who receives the stream's records: subscribers of the API, the upstream hub if the records
/// are `forwarded`, and the hub's operators.
fn access(
    s: &StreamPolicy,
    grpc: &GrpcConfig,
    forwarded: bool,
    exported: Option<&NatsConfig>,
) -> Vec<Element> {
    let mut access = vec![Element {
        dtpr: None,
        title: "Dashboards and services".to_owned(),
        description: format!(
            "Applications connected to the hub's gRPC API receive the published fields ({}) of the records, never raw readings. {}{}",
            s.output_fields().join(", "),
            who_may_subscribe(s, &grpc.tokens),
            transport(grpc)
        ),
    }];
    if forwarded {
        access.push(Element {
            dtpr: None,
            title: "Upstream hub".to_owned(),
            description: "The operator of the upstream hub named under storage.".to_owned(),
        });
    }
    if let Some(nats) = exported {
        access.push(Element {
            dtpr: None,
            title: "City data platform (NATS)".to_owned(),
            description: format!(
                "The published records are sent to the NATS server at {} (JetStream stream '{}', subject '{}.{}'), where the platform's own access rules decide who reads them.",
                crate::config::redacted(&nats.url),
                nats.jetstream,
                nats.subject_prefix,
                s.name
            ),
        });
    }
    access.push(Element {
        dtpr: None,
        title: "Operators and auditors".to_owned(),
        description: "The hub's operators see counts and figures (metrics, audit log), never raw values or identifiers.".to_owned(),
    });
    access
}

/// Which API clients may subscribe to the stream, by the tokens configured.
fn who_may_subscribe(s: &StreamPolicy, tokens: &[TokenConfig]) -> String {
    let holders: Vec<&str> = tokens
        .iter()
        .filter(|t| may_subscribe(t, s))
        .map(|t| t.name.as_str())
        .collect();
    if tokens.is_empty() {
        "No client authentication is configured: any client that can reach the API's address may subscribe.".to_owned()
    } else if holders.is_empty() {
        "No client holds a token for this stream: nobody can subscribe to it.".to_owned()
    } else {
        format!(
            "Only clients holding a token for this stream may subscribe: {}.",
            holders.join(", ")
        )
    }
}

/// How the API's connections are protected, as a sentence following the subscribers'.
fn transport(grpc: &GrpcConfig) -> &'static str {
    match &grpc.tls {
        Some(tls) if tls.client_ca_file.is_some() => {
            " Connections are encrypted (TLS), and clients must also present a certificate from the hub's client authority."
        }
        Some(_) => " Connections are encrypted (TLS).",
        None => {
            " The gateway itself does not encrypt the connections (it serves the machine it runs on, or a proxy in front of it that does)."
        }
    }
}

/// `retention__data_retained`: how long the records are kept, and how they are destroyed.
fn retention(s: &StreamPolicy) -> Element {
    Element {
        dtpr: Some("retention__data_retained".to_owned()),
        title: "Data retained".to_owned(),
        description: format!(
            "Published records are kept on the hub for {} and then destroyed by erasing their encryption keys (cryptographic erase, NIST SP 800-88). Raw readings are not retained.",
            plain_duration(s.retention)
        ),
    }
}

/// The stream's line in a public sensor register.
fn sensor_register(
    s: &StreamPolicy,
    site: &RegisterConfig,
    technology: &Element,
    personal_data: bool,
) -> SensorRegisterEntry {
    SensorRegisterEntry {
        sensor_type: technology.title.clone(),
        owner: site
            .controller
            .clone()
            .unwrap_or_else(|| NOT_DECLARED.to_owned()),
        location: site
            .location
            .clone()
            .unwrap_or_else(|| NOT_DECLARED.to_owned()),
        purpose: s.purpose.clone(),
        personal_data,
        end_date: site
            .end_date
            .clone()
            .unwrap_or_else(|| "none planned".to_owned()),
    }
}

/// The technology element for a DTPR technology id.
fn technology(id: Option<&str>) -> Element {
    let Some(id) = id else {
        return Element {
            dtpr: None,
            title: "Sensor (technology not declared)".to_owned(),
            description: "The policy does not name the sensing technology.".to_owned(),
        };
    };
    let (title, description) = match id {
        "tech__air_quality" => (
            "Air quality sensor",
            "Measures pollutants in the air, such as particulate matter and nitrogen dioxide.",
        ),
        "tech__sound_level_meter" => (
            "Sound level meter",
            "Measures how loud it is. It does not record sound.",
        ),
        "tech__identifiable_wifi_sensor" => (
            "Wi-Fi sensor",
            "Detects the Wi-Fi signals that phones and other devices send, including their device identifiers.",
        ),
        _ => ("", ""),
    };
    let title = if title.is_empty() {
        capitalise(&id.trim_start_matches("tech__").replace('_', " "))
    } else {
        title.to_owned()
    };
    Element {
        dtpr: Some(id.to_owned()),
        title,
        description: description.to_owned(),
    }
}

fn capitalise(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// "30 days", "1 hour", "90 seconds".
pub fn plain_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (n, unit) = if secs > 0 && secs.is_multiple_of(86_400) {
        (secs / 86_400, "day")
    } else if secs > 0 && secs.is_multiple_of(3600) {
        (secs / 3600, "hour")
    } else if secs > 0 && secs.is_multiple_of(60) {
        (secs / 60, "minute")
    } else {
        (secs, "second")
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

fn area(km2: f64) -> String {
    if km2 >= 1.0 {
        format!("{km2:.1} km²")
    } else {
        format!("{:.0} m²", km2 * 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEFAULT_CONFIG, parse};

    fn default_register() -> Register {
        let (config, _) = parse(DEFAULT_CONFIG).unwrap();
        Register::new(&config, "2026-11-25T09:00:00Z")
    }

    #[test]
    fn the_register_says_what_the_policy_does() {
        let register = default_register();
        let (config, _) = parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(register.policy_hash, config.policy.hash_hex());
        assert_eq!(register.streams.len(), config.policy.streams().len());
        let footfall = register
            .streams
            .iter()
            .find(|s| s.name == "footfall")
            .unwrap();
        assert!(footfall.personal_data);
        assert_eq!(
            footfall.technology.dtpr.as_deref(),
            Some("tech__identifiable_wifi_sensor")
        );
        let ids: Vec<&str> = footfall
            .processing
            .iter()
            .filter_map(|e| e.dtpr.as_deref())
            .collect();
        assert_eq!(
            ids,
            [
                "process__de_identified",
                "process__aggregated",
                "process__k_anonymity"
            ]
        );
        let k = &footfall.processing[2].description;
        assert!(k.contains("at least 5 distinct mac"), "{k}");
        assert_eq!(
            footfall.data_published,
            ["counter_id", "readings", "devices", "mean_rssi"]
        );
        assert_eq!(footfall.retention_seconds, 7 * 86_400);
        assert!(footfall.retention.description.contains("7 days"));
        let mac = footfall
            .data_collected
            .iter()
            .find(|f| f.field == "mac")
            .unwrap();
        assert_eq!(mac.treatment, "pseudonymise");
        assert!(
            mac.description.contains("changes every day"),
            "{}",
            mac.description
        );
        let parking = register
            .streams
            .iter()
            .find(|s| s.name == "parking")
            .unwrap();
        assert!(parking.personal_data, "declared by the policy");
        assert!(parking.personal_data_note.contains("declares"));

        let air = register
            .streams
            .iter()
            .find(|s| s.name == "air_quality")
            .unwrap();
        assert!(!air.personal_data);
        assert!(
            air.processing
                .iter()
                .all(|e| e.dtpr.as_deref() != Some("process__aggregated"))
        );
        let cell = air
            .data_collected
            .iter()
            .find(|f| f.field == "cell")
            .unwrap();
        // H3 resolution 9 averages about 0.105 km².
        assert!(
            cell.description.contains("resolution 9 (about 105"),
            "{}",
            cell.description
        );
        assert_eq!(
            air.sensor_register.owner,
            "Example City, Urban Services (demonstration hub)"
        );
        assert_eq!(air.sensor_register.end_date, "none planned");
        assert!(
            air.access[0]
                .description
                .contains("No client authentication is configured")
        );
        assert!(
            air.storage
                .iter()
                .all(|e| e.title != "Forwarded to an upstream hub")
        );
    }

    #[test]
    fn every_rendering_carries_the_policy_hash_and_each_stream() {
        let register = default_register();
        let json: serde_json::Value = serde_json::from_str(&register.to_json()).unwrap();
        assert_eq!(json["policy_hash"], register.policy_hash.as_str());
        assert_eq!(json["register_version"], 1);
        assert_eq!(json["streams"][1]["sensor_register"]["personal_data"], true);
        for text in [register.to_text(), register.to_art30()] {
            assert!(text.contains(&register.policy_hash));
            for s in &register.streams {
                assert!(text.contains(&s.name), "{} missing", s.name);
            }
        }
        let art30 = register.to_art30();
        for heading in [
            "(b) Purpose",
            "(c) Categories of data subjects",
            "(d) Categories of recipients",
            "(f) Time limits for erasure",
            "(g) Technical and organisational security measures",
        ] {
            assert!(art30.contains(heading), "{heading}");
        }
    }

    #[test]
    fn upstream_forwarding_and_site_facts_appear() {
        let (config, _) = parse(DEFAULT_CONFIG).unwrap();
        let site = RegisterConfig {
            controller: Some("City".to_owned()),
            end_date: Some("2030-12-31".to_owned()),
            ..RegisterConfig::default()
        };
        let upstream = UpstreamConfig {
            endpoint: "http://hub.example:50051".to_owned(),
            origin: "north-1".to_owned(),
            streams: Some(vec!["air_quality".to_owned()]),
            batch: 256,
            window: 4096,
            reconnect_backoff_max: Duration::from_secs(30),
            token_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        };
        let grpc = GrpcConfig {
            tokens: vec![TokenConfig {
                name: "north-dashboard".to_owned(),
                sha256: "0".repeat(64),
                streams: vec!["air_quality".to_owned()],
                policy: false,
                footprint: false,
                push: false,
                origins: Vec::new(),
                max_calls: None,
            }],
            tls: Some(crate::config::TlsConfig {
                cert_file: "hub.crt".into(),
                key_file: "hub.key".into(),
                client_ca_file: Some("clients.crt".into()),
            }),
            ..GrpcConfig::default()
        };
        let register = Register::build(
            &config.policy,
            Deployment {
                hub: "north-1",
                site: &site,
                upstream: Some(&upstream),
                nats: None,
                grpc: &grpc,
            },
            "2026-11-25T09:00:00Z",
        );
        let air = &register.streams[0];
        assert!(
            air.storage
                .iter()
                .any(|e| e.description.contains("hub.example:50051"))
        );
        assert!(air.access.iter().any(|e| e.title == "Upstream hub"));
        assert!(air.access[0].description.contains(
            "Only clients holding a token for this stream may subscribe: north-dashboard."
        ));
        let noise = register.streams.iter().find(|s| s.name == "noise").unwrap();
        assert!(noise.access[0].description.contains("nobody can subscribe"));
        assert!(
            noise.access[0]
                .description
                .contains("encrypted (TLS), and clients must also present a certificate")
        );
        let noise = register.streams.iter().find(|s| s.name == "noise").unwrap();
        assert!(
            noise.storage.iter().all(|e| e.dtpr.is_some()),
            "noise is not forwarded"
        );
        assert_eq!(air.sensor_register.end_date, "2030-12-31");
        assert_eq!(air.sensor_register.location, "not declared");
        assert_eq!(register.accountable.controller.as_deref(), Some("City"));
    }

    #[test]
    fn durations_read_plainly() {
        assert_eq!(plain_duration(Duration::from_secs(30 * 86_400)), "30 days");
        assert_eq!(plain_duration(Duration::from_secs(3600)), "1 hour");
        assert_eq!(plain_duration(Duration::from_secs(90)), "90 seconds");
        assert_eq!(plain_duration(Duration::from_secs(600)), "10 minutes");
    }
}
