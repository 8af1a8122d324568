//! `hubgate dry-run`: what the policy does to sample messages, field by field.
//!
//! Input: one JSON object per line, `{"topic": "...", "payload": {...}}`; `payload` may also be a
//! string, taken as the raw bytes (to try malformed payloads); binary payloads (SenML in CBOR) are
//! given as `payload_hex` instead. `received` (Unix seconds) sets
//! the receive time. For each sample the output names the stream it routes to, the fields that came
//! in (names only: the sample's raw values are never echoed), what each stage did to each field,
//! and the record that would go out. A summary follows.
//!
//! For an aggregated stream, each sample's record goes into its window; a sample that gives no
//! `received` time is taken to arrive on time. After the last sample every window is closed, and
//! the report lists each group with its contributors, released or suppressed below k.
//!
//! Deterministic: a fixed pseudonymisation key (never used to serve data), a fixed receive time
//! unless a sample gives one, and a fixed noise seed, so the same samples always give the same
//! output.

use std::fmt::Write as _;
use std::io::BufRead;

use hubgate_privacy::budget::StreamBudget;
use hubgate_privacy::chain::{self, Fate};
use hubgate_privacy::identifiers::{self, Detector, IdKind};
use hubgate_privacy::noise::SeededRandom;
use hubgate_privacy::pseudonym::Key;
use hubgate_privacy::window::{Absorbed, WindowState};
use hubgate_privacy::{Context, Policy, Value};

use crate::decode::{self, Decoder};

/// Receive time used when a sample gives none: 2024-01-01T00:00:00Z.
const DEFAULT_RECEIVED_MS: i64 = 1_704_067_200_000;

#[derive(Debug, Default)]
struct Summary {
    samples: u64,
    records: u64,
    unrouted: u64,
    rejected: u64,
    kept: u64,
    pseudonymised: u64,
    undeclared: u64,
    identifiers: u64,
    no_key: u64,
    generalised: u64,
    cells: u64,
    unsupported: u64,
    absorbed: u64,
    left_out: u64,
    groups_released: u64,
    groups_suppressed: u64,
    windows_refused: u64,
}

fn time(ms: i64) -> String {
    humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
    )
    .to_string()
}

/// Runs the samples from `input` through `policy`, returning the report.
pub fn run(policy: &Policy, input: impl BufRead) -> anyhow::Result<String> {
    let key = Key::fixed_for_dry_run();
    let names_detector = Detector::new(IdKind::ALL.to_vec(), Vec::new());
    let mut decoder = Decoder::default();
    let mut report = String::new();
    let mut sum = Summary::default();
    let _ = writeln!(report, "policy {}\n", policy.hash_hex());
    let mut windows: Vec<WindowState> = policy
        .streams()
        .iter()
        .map(|_| WindowState::default())
        .collect();
    for sample in read_samples(input)? {
        sum.samples += 1;
        let (topic, payload) = (sample.topic.as_str(), &sample.payload);
        let given_received_ms = sample.received_ms;
        let received_ms = given_received_ms.unwrap_or(DEFAULT_RECEIVED_MS);
        let _ = write!(report, "sample {}: {topic}", sample.line);
        let streams: Vec<usize> = policy.route(topic).collect();
        if streams.is_empty() {
            sum.unrouted += 1;
            let _ = writeln!(report, " → no stream takes this topic: dropped\n");
            continue;
        }
        let _ = writeln!(report);
        let mut once = decode::Once::default();
        for index in streams {
            let stream = &policy.streams()[index];
            let _ = write!(report, "  stream {}: ", stream.name);
            if identifiers::is_media_payload(payload) {
                sum.rejected += 1;
                let _ = writeln!(report, "image or video payload: dropped");
                continue;
            }
            let decoded = match once.get(&mut decoder, stream.format, topic, payload, received_ms) {
                Ok(d) => d.clone(),
                Err(e) => {
                    sum.rejected += 1;
                    let _ = writeln!(report, "{e}: dropped");
                    continue;
                }
            };
            let count = decoded.readings().len();
            for (k, reading) in decoded.readings().iter().enumerate() {
                if k > 0 {
                    let _ = write!(report, "  stream {}: ", stream.name);
                }
                if count > 1 {
                    let _ = write!(report, "reading {} of {count}, ", k + 1);
                }
                let reading = reading.clone();
                let names: Vec<String> = reading
                    .fields
                    .iter()
                    .map(|(p, _)| shown(p, &names_detector))
                    .collect();
                let _ = writeln!(report, "in: {}", names.join(", "));
                if reading.unsupported > 0 {
                    sum.unsupported += u64::from(reading.unsupported);
                    let _ = writeln!(
                        report,
                        "    {} array or null values: dropped",
                        reading.unsupported
                    );
                }
                let ctx = Context {
                    received_ms,
                    key: Some(&key),
                };
                let mut fates = Vec::new();
                let outcome = chain::apply_traced(stream, reading, &ctx, |path, fate| {
                    fates.push((path.to_owned(), fate))
                });
                for (path, fate) in &fates {
                    let what = match fate {
                        Fate::EventTime => "event time".to_owned(),
                        Fate::Kept => {
                            sum.kept += 1;
                            "kept".to_owned()
                        }
                        Fate::Pseudonymised => {
                            sum.pseudonymised += 1;
                            "pseudonymised".to_owned()
                        }
                        Fate::Generalised(cell) => {
                            sum.generalised += 1;
                            format!("generalised into the cell at '{cell}', not passed")
                        }
                        Fate::Undeclared => {
                            sum.undeclared += 1;
                            "not declared: dropped".to_owned()
                        }
                        Fate::IdentifierDropped(kind) => {
                            sum.identifiers += 1;
                            format!("holds an identifier ({}): dropped", kind.name())
                        }
                        Fate::IdentifierPseudonymised(kind) => {
                            sum.identifiers += 1;
                            sum.pseudonymised += 1;
                            format!("holds an identifier ({}): pseudonymised", kind.name())
                        }
                        Fate::NoKey => "to pseudonymise, no key: dropped".to_owned(),
                    };
                    if matches!(fate, Fate::NoKey) {
                        sum.no_key += 1;
                    }
                    let path = shown(path, &names_detector);
                    let _ = writeln!(report, "    {path:<24} {what}");
                }
                match outcome {
                    Ok(out) => {
                        sum.cells += u64::from(out.locations_generalised);
                        let fields: serde_json::Map<String, serde_json::Value> = out
                            .record
                            .fields
                            .iter()
                            .map(|(p, v)| (p.to_string(), json_value(v)))
                            .collect();
                        let at = time(out.record.event_time_ms);
                        let fields = serde_json::Value::Object(fields);
                        let Some(spec) = &stream.aggregate else {
                            sum.records += 1;
                            let _ = writeln!(report, "  out: {fields} at {at}");
                            continue;
                        };
                        let now = given_received_ms.unwrap_or(out.record.event_time_ms);
                        let what = match windows[index].absorb(spec, &out.record, now) {
                            Absorbed::Counted => {
                                sum.absorbed += 1;
                                let start = spec.window_start(out.record.event_time_ms);
                                format!("into the window from {}", time(start))
                            }
                            other => {
                                sum.left_out += 1;
                                format!("left out of the windows ({other:?})")
                            }
                        };
                        let _ = writeln!(report, "  {what}: {fields} at {at}");
                    }
                    Err(rejection) => {
                        sum.rejected += 1;
                        let _ = writeln!(report, "  {rejection}: dropped");
                    }
                }
            }
        }
        let _ = writeln!(report);
    }
    close_windows(policy, &mut windows, &mut report, &mut sum);
    let _ = writeln!(
        report,
        "summary: {} samples, {} records out, {} into windows, {} unrouted, {} rejected whole\n\
         fields: {} kept, {} pseudonymised, {} not declared, {} holding identifiers, {} coordinates \
         generalised into {} cells, {} without a key, {} arrays or nulls",
        sum.samples,
        sum.records,
        sum.absorbed,
        sum.unrouted,
        sum.rejected,
        sum.kept,
        sum.pseudonymised,
        sum.undeclared,
        sum.identifiers,
        sum.generalised,
        sum.cells,
        sum.no_key,
        sum.unsupported,
    );
    if policy.streams().iter().any(|s| s.aggregate.is_some()) {
        let _ = writeln!(
            report,
            "windows: {} groups released, {} suppressed below the minimum group size, {} windows \
             refused by the privacy budget, {} readings left out",
            sum.groups_released, sum.groups_suppressed, sum.windows_refused, sum.left_out,
        );
    }
    Ok(report)
}

/// Closes every window and reports each group, released or suppressed.
fn close_windows(
    policy: &Policy,
    windows: &mut [WindowState],
    report: &mut String,
    sum: &mut Summary,
) {
    let mut rng = SeededRandom::new(0);
    for (stream, state) in policy.streams().iter().zip(windows) {
        let Some(spec) = &stream.aggregate else {
            continue;
        };
        if state.open_windows() == 0 {
            continue;
        }
        let _ = writeln!(
            report,
            "windows of stream {} (k = {}):",
            stream.name, spec.min_group_size
        );
        for (start, key, contributors) in state.groups() {
            let key = group_label(spec, &key);
            let fate = if contributors >= spec.min_group_size as usize {
                "released"
            } else {
                "suppressed"
            };
            let _ = writeln!(
                report,
                "  {} [{key}]: {contributors} contributor(s): {fate}",
                time(start),
            );
        }
        let mut budget = StreamBudget::default();
        let release = state.release(spec, i64::MAX / 4, Some((&mut budget, &mut rng)));
        for record in &release.records {
            let fields: serde_json::Map<String, serde_json::Value> = record
                .fields
                .iter()
                .map(|(p, v)| (p.to_string(), json_value(v)))
                .collect();
            let _ = writeln!(
                report,
                "  out: {} at {}",
                serde_json::Value::Object(fields),
                time(record.event_time_ms)
            );
        }
        if spec.noise.is_some() && !release.records.is_empty() {
            let _ = writeln!(
                report,
                "  (counts carry differential-privacy noise, drawn here from a fixed seed)"
            );
        }
        sum.groups_released += release.records.len() as u64;
        sum.groups_suppressed += u64::from(release.groups_suppressed);
        sum.windows_refused += u64::from(release.windows_refused);
        let _ = writeln!(report);
    }
}

/// A group's key as `name="value", …` (the values of the declared group-by fields).
fn group_label(spec: &hubgate_privacy::policy::aggregate::Aggregation, key: &[Value]) -> String {
    spec.group_by
        .iter()
        .zip(key)
        .map(|(name, v)| format!("{name}={}", json_value(v)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn json_value(v: &Value) -> serde_json::Value {
    match v {
        Value::Int(i) => (*i).into(),
        Value::Float(f) => (*f).into(),
        Value::Str(s) => s.as_str().into(),
        Value::Bool(b) => (*b).into(),
    }
}

/// One sample of a dry run's input.
#[derive(Debug, Clone)]
struct Sample {
    line: usize,
    topic: String,
    payload: Vec<u8>,
    received_ms: Option<i64>,
}

fn read_samples(input: impl BufRead) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for (n, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let sample: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("sample line {}: not a JSON object: {e}", n + 1))?;
        let topic = sample
            .get("topic")
            .and_then(|t| t.as_str())
            .ok_or_else(|| anyhow::anyhow!("sample line {}: needs a \"topic\" string", n + 1))?;
        let payload = match (sample.get("payload"), sample.get("payload_hex")) {
            (Some(serde_json::Value::String(raw)), None) => raw.clone().into_bytes(),
            (Some(other), None) => serde_json::to_vec(other)?,
            (None, Some(serde_json::Value::String(hex))) => {
                decode::from_hex(hex).ok_or_else(|| {
                    anyhow::anyhow!("sample line {}: \"payload_hex\" is not hexadecimal", n + 1)
                })?
            }
            _ => anyhow::bail!(
                "sample line {}: needs a \"payload\" or a \"payload_hex\" string",
                n + 1
            ),
        };
        samples.push(Sample {
            line: n + 1,
            topic: topic.to_owned(),
            payload,
            received_ms: sample
                .get("received")
                .and_then(serde_json::Value::as_f64)
                .map(|s| (s * 1000.0) as i64),
        });
    }
    Ok(samples)
}

/// A field path as the report shows it: a path that holds an identifier (a SenML name that is a
/// device's MAC address, say) is not echoed.
fn shown(path: &str, detector: &Detector) -> String {
    match detector.find(path) {
        Some(kind) => format!("<a name holding an identifier ({})>", kind.name()),
        None => path.to_owned(),
    }
}

/// Sample line, reading (when its payload gives several) and stream.
type Slot = (usize, Option<usize>, String);

/// What one policy does to the samples, in a form two policies can be compared in.
#[derive(Debug, Default)]
struct Evaluation {
    /// Per sample line and stream: the fields of the record that leaves (aggregated streams: that
    /// goes into the windows), or why there is none.
    /// Keyed by sample line, reading (when a payload gives several) and stream.
    outputs: std::collections::BTreeMap<Slot, Result<Vec<String>, String>>,
    /// Per aggregated stream, window start and group key: whether the group is released.
    groups: std::collections::BTreeMap<(String, i64, String), bool>,
}

fn evaluate(policy: &Policy, samples: &[Sample]) -> Evaluation {
    let key = Key::fixed_for_dry_run();
    let mut decoder = Decoder::default();
    let mut eval = Evaluation::default();
    let mut windows: Vec<WindowState> = policy
        .streams()
        .iter()
        .map(|_| WindowState::default())
        .collect();
    for sample in samples {
        let received_ms = sample.received_ms.unwrap_or(DEFAULT_RECEIVED_MS);
        let mut once = decode::Once::default();
        for index in policy.route(&sample.topic) {
            let stream = &policy.streams()[index];
            let slot = (sample.line, None, stream.name.clone());
            if identifiers::is_media_payload(&sample.payload) {
                eval.outputs
                    .insert(slot, Err("image or video payload".into()));
                continue;
            }
            let decoded = match once.get(
                &mut decoder,
                stream.format,
                &sample.topic,
                &sample.payload,
                received_ms,
            ) {
                Ok(d) => d.clone(),
                Err(e) => {
                    eval.outputs.insert(slot, Err(e.to_string()));
                    continue;
                }
            };
            let several = decoded.readings().len() > 1;
            for (k, reading) in decoded.readings().iter().enumerate() {
                let slot = (sample.line, several.then_some(k + 1), stream.name.clone());
                let reading = reading.clone();
                let ctx = Context {
                    received_ms,
                    key: Some(&key),
                };
                match chain::apply_traced(stream, reading, &ctx, |_, _| {}) {
                    Ok(out) => {
                        let mut fields: Vec<String> = out
                            .record
                            .fields
                            .iter()
                            .map(|(p, _)| p.to_string())
                            .collect();
                        fields.sort();
                        eval.outputs.insert(slot, Ok(fields));
                        if let Some(spec) = &stream.aggregate {
                            let now = sample.received_ms.unwrap_or(out.record.event_time_ms);
                            let _ = windows[index].absorb(spec, &out.record, now);
                        }
                    }
                    Err(rejection) => {
                        eval.outputs.insert(slot, Err(rejection.to_string()));
                    }
                }
            }
        }
    }
    for (stream, state) in policy.streams().iter().zip(&windows) {
        let Some(spec) = &stream.aggregate else {
            continue;
        };
        for (start, key, contributors) in state.groups() {
            eval.groups.insert(
                (stream.name.clone(), start, group_label(spec, &key)),
                contributors >= spec.min_group_size as usize,
            );
        }
    }
    eval
}

/// `hubgate dry-run --against OLD`: what changing from `old` to `new` changes in the output for
/// the same samples: fields newly passed or dropped, records newly kept or no longer kept, and
/// groups newly released or suppressed. Field names and group keys only, never a sample's values
/// (group keys are values of the declared group-by fields, as a released record carries them).
pub fn diff(old: &Policy, new: &Policy, input: impl BufRead) -> anyhow::Result<String> {
    let samples = read_samples(input)?;
    let (before, after) = (evaluate(old, &samples), evaluate(new, &samples));
    let mut report = String::new();
    let _ = writeln!(
        report,
        "policy {} → {} over {} samples\n",
        old.hash_hex(),
        new.hash_hex(),
        samples.len()
    );
    let (mut passed, mut dropped, mut kept, mut lost, mut changes) = (0, 0, 0, 0, 0);
    let slots: std::collections::BTreeSet<&Slot> =
        before.outputs.keys().chain(after.outputs.keys()).collect();
    for slot in slots {
        let (line, reading, stream) = slot;
        let line = match reading {
            Some(k) => format!("{line}, reading {k}"),
            None => line.to_string(),
        };
        let was = before.outputs.get(slot);
        let is = after.outputs.get(slot);
        let describe = |o: Option<&Result<Vec<String>, String>>| match o {
            None => "not taken by the stream".to_owned(),
            Some(Ok(_)) => "kept".to_owned(),
            Some(Err(why)) => format!("dropped ({why})"),
        };
        match (was, is) {
            (Some(Ok(a)), Some(Ok(b))) => {
                let newly: Vec<&String> = b.iter().filter(|f| !a.contains(f)).collect();
                let gone: Vec<&String> = a.iter().filter(|f| !b.contains(f)).collect();
                if newly.is_empty() && gone.is_empty() {
                    continue;
                }
                changes += 1;
                let _ = write!(report, "sample {line}, stream {stream}:");
                if !newly.is_empty() {
                    passed += newly.len();
                    let names: Vec<&str> = newly.iter().map(|s| s.as_str()).collect();
                    let _ = write!(report, " newly passed: {};", names.join(", "));
                }
                if !gone.is_empty() {
                    dropped += gone.len();
                    let names: Vec<&str> = gone.iter().map(|s| s.as_str()).collect();
                    let _ = write!(report, " newly dropped: {};", names.join(", "));
                }
                report.pop();
                report.push('\n');
            }
            (a, b) if a.is_some_and(Result::is_ok) != b.is_some_and(Result::is_ok) => {
                changes += 1;
                if b.is_some_and(Result::is_ok) {
                    kept += 1;
                } else {
                    lost += 1;
                }
                let _ = writeln!(
                    report,
                    "sample {line}, stream {stream}: was {}, now {}",
                    describe(a),
                    describe(b)
                );
            }
            _ => {}
        }
    }
    let (mut released, mut suppressed) = (0, 0);
    let groups: std::collections::BTreeSet<&(String, i64, String)> =
        before.groups.keys().chain(after.groups.keys()).collect();
    for group in groups {
        let was = before.groups.get(group).copied().unwrap_or(false);
        let is = after.groups.get(group).copied().unwrap_or(false);
        if was == is {
            continue;
        }
        changes += 1;
        let (stream, start, key) = group;
        if is {
            released += 1;
        } else {
            suppressed += 1;
        }
        let _ = writeln!(
            report,
            "stream {stream}, window {} [{key}]: newly {}",
            time(*start),
            if is { "released" } else { "suppressed" }
        );
    }
    if changes == 0 {
        let _ = writeln!(report, "no difference in the output for these samples");
    }
    let _ = writeln!(
        report,
        "\nsummary: {passed} fields newly passed, {dropped} newly dropped; {kept} records newly kept, {lost} no longer kept; {released} groups newly released, {suppressed} newly suppressed"
    );
    Ok(report)
}
