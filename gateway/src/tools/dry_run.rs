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
//! Pseudonyms are made under a fresh random key for each run, so no one can recompute them from a
//! guessed identifier, and are shown as labels (`pseudonym-1`, …) numbered in order of first
//! appearance: one identifier has one label throughout the run. With a fixed receive time unless a
//! sample gives one, and a fixed noise seed, the same samples always give the same output.

use std::fmt::Write as _;
use std::io::BufRead;

use hubgate_privacy::budget::PoolBudget;
use hubgate_privacy::chain::{self, Fate};
use hubgate_privacy::identifiers::{self, Detector, IdKind};
use hubgate_privacy::noise::SeededRandom;
use hubgate_privacy::pseudonym::Key;
use hubgate_privacy::window::{Absorbed, Noising, Selection, WindowState};
use hubgate_privacy::{Context, Outcome, Policy, Reading, Record, Value};

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

impl Summary {
    /// Counts what a stage did to a field, and says it.
    fn fate(&mut self, fate: &Fate) -> String {
        match fate {
            Fate::EventTime => "event time".to_owned(),
            Fate::Kept => {
                self.kept += 1;
                "kept".to_owned()
            }
            Fate::Pseudonymised => {
                self.pseudonymised += 1;
                "pseudonymised".to_owned()
            }
            Fate::Generalised(cell) => {
                self.generalised += 1;
                format!("generalised into the cell at '{cell}', not passed")
            }
            Fate::Undeclared => {
                self.undeclared += 1;
                "not declared: dropped".to_owned()
            }
            Fate::IdentifierDropped(kind) => {
                self.identifiers += 1;
                format!("holds an identifier ({}): dropped", kind.name())
            }
            Fate::IdentifierPseudonymised(kind) => {
                self.identifiers += 1;
                self.pseudonymised += 1;
                format!("holds an identifier ({}): pseudonymised", kind.name())
            }
            Fate::NoKey => {
                self.no_key += 1;
                "to pseudonymise, no key: dropped".to_owned()
            }
        }
    }

    /// The report's closing lines; the windows' only if the policy `aggregates`.
    fn write(&self, report: &mut String, aggregates: bool) {
        let _ = writeln!(
            report,
            "summary: {} samples, {} records out, {} into windows, {} unrouted, {} rejected whole\n\
             fields: {} kept, {} pseudonymised, {} not declared, {} holding identifiers, {} coordinates \
             generalised into {} cells, {} without a key, {} arrays or nulls",
            self.samples,
            self.records,
            self.absorbed,
            self.unrouted,
            self.rejected,
            self.kept,
            self.pseudonymised,
            self.undeclared,
            self.identifiers,
            self.generalised,
            self.cells,
            self.no_key,
            self.unsupported,
        );
        if aggregates {
            let _ = writeln!(
                report,
                "windows: {} groups released, {} suppressed below the minimum group size, {} windows \
                 refused by the privacy budget, {} readings left out",
                self.groups_released, self.groups_suppressed, self.windows_refused, self.left_out,
            );
        }
    }
}

/// A pseudonymisation key of this run alone, from the operating system's CSPRNG.
fn fresh_key() -> anyhow::Result<Key> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("no random key for the dry run's pseudonyms: {e}"))?;
    Ok(Key::new(bytes))
}

/// The labels pseudonyms are shown under: `pseudonym-N`, N in order of first appearance.
#[derive(Debug, Default)]
struct Masks {
    labels: std::collections::HashMap<String, String>,
}

impl Masks {
    /// Gives the pseudonym `value` a label, if it has none yet.
    fn learn(&mut self, value: &Value) {
        if let Value::Str(s) = value {
            let next = self.labels.len() + 1;
            self.labels
                .entry(s.to_string())
                .or_insert_with(|| format!("pseudonym-{next}"));
        }
    }

    /// A value as the report shows it: a pseudonym by its label.
    fn show(&self, value: &Value) -> serde_json::Value {
        match value {
            Value::Str(s) => match self.labels.get(s.as_str()) {
                Some(label) => label.as_str().into(),
                None => s.as_str().into(),
            },
            other => json_value(other),
        }
    }

    /// Learns the pseudonyms a chain put in `record`: the fields whose fate says so.
    fn learn_from(&mut self, record: &Record, fates: &[(String, Fate)]) {
        for (path, fate) in fates {
            if matches!(fate, Fate::Pseudonymised | Fate::IdentifierPseudonymised(_))
                && let Some((_, value)) = record.fields.iter().find(|(p, _)| p.as_str() == path)
            {
                self.learn(value);
            }
        }
    }
}

/// Runs the samples from `input` through `policy`, returning the report.
pub fn run(policy: &Policy, input: impl BufRead) -> anyhow::Result<String> {
    let mut dry = DryRun {
        policy,
        key: fresh_key()?,
        masks: Masks::default(),
        names: Detector::new(
            IdKind::ALL.to_vec(),
            policy
                .streams()
                .iter()
                .flat_map(|s| s.identifiers.detector.plates().iter().cloned())
                .collect(),
        ),
        decoder: Decoder::default(),
        windows: policy
            .streams()
            .iter()
            .map(|_| WindowState::default())
            .collect(),
        report: String::new(),
        sum: Summary::default(),
    };
    let _ = writeln!(dry.report, "policy {}\n", policy.hash_hex());
    for sample in read_samples(input)? {
        dry.sample(&sample);
    }
    close_windows(
        policy,
        &mut dry.windows,
        &dry.masks,
        &mut dry.report,
        &mut dry.sum,
    );
    let aggregates = policy.streams().iter().any(|s| s.aggregate.is_some());
    dry.sum.write(&mut dry.report, aggregates);
    Ok(dry.report)
}

/// A dry run under way: the policy's state after the samples so far, and the report on them.
struct DryRun<'p> {
    policy: &'p Policy,
    key: Key,
    masks: Masks,
    /// Finds the field names that hold an identifier, which the report does not echo.
    names: Detector,
    decoder: Decoder,
    /// Per stream, in policy order.
    windows: Vec<WindowState>,
    report: String,
    sum: Summary,
}

impl DryRun<'_> {
    /// Reports what each stream the sample routes to does with it.
    fn sample(&mut self, sample: &Sample) {
        self.sum.samples += 1;
        let topic = sample.topic.as_str();
        let _ = write!(
            self.report,
            "sample {}: {}",
            sample.line,
            masked_topic(topic, &self.names)
        );
        let streams: Vec<usize> = self.policy.route(topic).collect();
        if streams.is_empty() {
            self.sum.unrouted += 1;
            let _ = writeln!(self.report, " → no stream takes this topic: dropped\n");
            return;
        }
        let _ = writeln!(self.report);
        // Each format is decoded once for all the streams that read it.
        let mut once = decode::Once::default();
        for index in streams {
            self.stream(sample, index, &mut once);
        }
        let _ = writeln!(self.report);
    }

    /// Reports what the stream at `index` does with the sample: each reading it decodes to.
    fn stream(&mut self, sample: &Sample, index: usize, once: &mut decode::Once) {
        let stream = &self.policy.streams()[index];
        let received_ms = sample.received_ms.unwrap_or(DEFAULT_RECEIVED_MS);
        let _ = write!(self.report, "  stream {}: ", stream.name);
        if identifiers::is_media_payload(&sample.payload) {
            self.sum.rejected += 1;
            let _ = writeln!(self.report, "image or video payload: dropped");
            return;
        }
        let decoded = match once.get(
            &mut self.decoder,
            stream.format,
            &sample.topic,
            &sample.payload,
            received_ms,
        ) {
            Ok(d) => d.clone(),
            Err(e) => {
                self.sum.rejected += 1;
                let _ = writeln!(self.report, "{e}: dropped");
                return;
            }
        };
        let count = decoded.readings().len();
        for (k, reading) in decoded.readings().iter().enumerate() {
            if k > 0 {
                let _ = write!(self.report, "  stream {}: ", stream.name);
            }
            if count > 1 {
                let _ = write!(self.report, "reading {} of {count}, ", k + 1);
            }
            self.reading(sample, index, reading.clone());
        }
    }

    /// Reports what the stream at `index` does to each field of a reading, and what comes out.
    fn reading(&mut self, sample: &Sample, index: usize, reading: Reading) {
        let stream = &self.policy.streams()[index];
        let names: Vec<String> = reading
            .fields
            .iter()
            .map(|(p, _)| shown(p, &self.names))
            .collect();
        let _ = writeln!(self.report, "in: {}", names.join(", "));
        if reading.unsupported > 0 {
            self.sum.unsupported += u64::from(reading.unsupported);
            let _ = writeln!(
                self.report,
                "    {} array or null values: dropped",
                reading.unsupported
            );
        }
        let ctx = Context {
            received_ms: sample.received_ms.unwrap_or(DEFAULT_RECEIVED_MS),
            key: Some(&self.key),
        };
        let mut fates = Vec::new();
        let outcome = chain::apply_traced(stream, reading, &ctx, |path, fate| {
            fates.push((path.to_owned(), fate))
        });
        for (path, fate) in &fates {
            let what = self.sum.fate(fate);
            let path = shown(path, &self.names);
            let _ = writeln!(self.report, "    {path:<24} {what}");
        }
        match outcome {
            Ok(out) => {
                self.masks.learn_from(&out.record, &fates);
                self.record(index, sample.received_ms, &out);
            }
            Err(rejection) => {
                self.sum.rejected += 1;
                let _ = writeln!(self.report, "  {rejection}: dropped");
            }
        }
    }

    /// Reports the record the stream at `index` makes of a reading: out, or into its window when
    /// the stream aggregates (at the sample's `received` time if given, else on time).
    fn record(&mut self, index: usize, received_ms: Option<i64>, out: &Outcome) {
        self.sum.cells += u64::from(out.locations_generalised);
        let fields = json_fields(&out.record, &self.masks);
        let at = time(out.record.event_time_ms);
        let stream = &self.policy.streams()[index];
        let Some(spec) = &stream.aggregate else {
            self.sum.records += 1;
            let release = match stream.release_delay() {
                // Held until its bucket has ended: visible no earlier than the bucket's end.
                Some(bucket) => format!(
                    ", released no earlier than its bucket's end, {}",
                    time(
                        out.record
                            .event_time_ms
                            .saturating_add(i64::try_from(bucket.as_millis()).unwrap_or(0))
                    )
                ),
                None => String::new(),
            };
            let _ = writeln!(self.report, "  out: {fields} at {at}{release}");
            return;
        };
        let now = received_ms.unwrap_or(out.record.event_time_ms);
        let what = match self.windows[index].absorb(spec, &out.record, now) {
            Absorbed::Counted => {
                self.sum.absorbed += 1;
                let start = spec.window_start(out.record.event_time_ms);
                format!("into the window from {}", time(start))
            }
            other => {
                self.sum.left_out += 1;
                format!("left out of the windows ({other:?})")
            }
        };
        let _ = writeln!(self.report, "  {what}: {fields} at {at}");
    }
}

/// A record's fields as a JSON object, pseudonyms by their labels.
fn json_fields(record: &Record, masks: &Masks) -> serde_json::Value {
    serde_json::Value::Object(
        record
            .fields
            .iter()
            .map(|(p, v)| (p.to_string(), masks.show(v)))
            .collect(),
    )
}

/// Closes every window and reports each group, released or suppressed.
fn close_windows(
    policy: &Policy,
    windows: &mut [WindowState],
    masks: &Masks,
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
        let k = u64::from(spec.min_group_size);
        let selection = spec
            .noise
            .as_ref()
            .map(|noise| Selection::new(spec, noise, 1));
        let mut last_start = i64::MIN;
        for (start, key, contributors) in state.groups() {
            last_start = last_start.max(start);
            let key = group_label(spec, &key, masks);
            // The number of contributors is not shown: only which side of k it is on.
            let fate = match selection {
                _ if (contributors as u64) < k => {
                    format!("fewer than {k} contributors: suppressed")
                }
                Some(selection) => format!(
                    "at least {k} contributors: released if its noisy count reaches {}",
                    selection.threshold(),
                ),
                None => format!("at least {k} contributors: released"),
            };
            let _ = writeln!(report, "  {} [{key}]: {fate}", time(start));
        }
        let mut pool = PoolBudget::default();
        let closed = last_start
            .saturating_add(spec.window_ms())
            .saturating_add(spec.lateness_ms());
        let noising = Noising {
            pool: &mut pool,
            stream: &stream.name,
            random: &mut rng,
        };
        let release = state.release(spec, closed, Some(noising));
        for record in &release.records {
            let _ = writeln!(
                report,
                "  out: {} at {}",
                json_fields(record, masks),
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

/// A group's key as `name="value", …` (the values of the declared group-by fields, pseudonyms
/// by their labels).
fn group_label(
    spec: &hubgate_privacy::policy::aggregate::Aggregation,
    key: &[Value],
    masks: &Masks,
) -> String {
    spec.group_by
        .iter()
        .zip(key)
        .map(|(name, v)| format!("{name}={}", masks.show(v)))
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

/// A topic as the report shows it: a level that holds an identifier is not echoed.
fn masked_topic(topic: &str, detector: &Detector) -> String {
    topic
        .split('/')
        .map(|level| shown(level, detector))
        .collect::<Vec<_>>()
        .join("/")
}

/// A field path as the report shows it: a path that holds an identifier in any spelling the
/// detectors know (a SenML name that is a device's MAC address, say) is not echoed.
fn shown(path: &str, detector: &Detector) -> String {
    match detector.identify(path, None) {
        Some(found) => format!("<a name holding an identifier ({})>", found.kind.name()),
        None => path.to_owned(),
    }
}

/// Sample line, reading (when its payload gives several) and stream.
type Slot = (usize, Option<usize>, String);

/// The fields of a slot's record, sorted, or why it has none.
type Output = Result<Vec<String>, String>;

/// Aggregated stream, window start and group key.
type Group = (String, i64, String);

/// What one policy does to the samples, in a form two policies can be compared in.
#[derive(Debug, Default)]
struct Evaluation {
    /// Per sample line and stream: the fields of the record that leaves (aggregated streams: that
    /// goes into the windows), or why there is none.
    /// Keyed by sample line, reading (when a payload gives several) and stream.
    outputs: std::collections::BTreeMap<Slot, Output>,
    /// Per aggregated stream, window start and group key: whether the group is released.
    groups: std::collections::BTreeMap<Group, bool>,
}

/// What `policy` does to `samples`, pseudonymising under `key`; `masks` learns the pseudonyms.
fn evaluate(policy: &Policy, samples: &[Sample], key: &Key, masks: &mut Masks) -> Evaluation {
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
                    key: Some(key),
                };
                let mut fates = Vec::new();
                match chain::apply_traced(stream, reading, &ctx, |path, fate| {
                    fates.push((path.to_owned(), fate));
                }) {
                    Ok(out) => {
                        masks.learn_from(&out.record, &fates);
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
    release_groups(policy, &windows, masks, &mut eval);
    eval
}

/// Whether each window group of `windows` is released: under noise, when it is more likely to be
/// than not; else when it has k contributors.
fn release_groups(policy: &Policy, windows: &[WindowState], masks: &Masks, eval: &mut Evaluation) {
    for (stream, state) in policy.streams().iter().zip(windows) {
        let Some(spec) = &stream.aggregate else {
            continue;
        };
        let selection = spec.noise.as_ref().map(|n| Selection::new(spec, n, 1));
        for (start, key, contributors) in state.groups() {
            let released = match selection {
                Some(selection) => selection.release_probability(contributors as u64) >= 0.5,
                None => contributors >= spec.min_group_size as usize,
            };
            eval.groups.insert(
                (stream.name.clone(), start, group_label(spec, &key, masks)),
                released,
            );
        }
    }
}

/// `hubgate dry-run --against OLD`: what changing from `old` to `new` changes in the output for
/// the same samples: fields newly passed or dropped, records newly kept or no longer kept, and
/// groups newly released or suppressed. Field names and group keys only, never a sample's values
/// (group keys are values of the declared group-by fields, as a released record carries them).
pub fn diff(old: &Policy, new: &Policy, input: impl BufRead) -> anyhow::Result<String> {
    let samples = read_samples(input)?;
    // One key and one set of labels for both policies: a pseudonym keeps its label across them.
    let key = fresh_key()?;
    let mut masks = Masks::default();
    let before = evaluate(old, &samples, &key, &mut masks);
    let after = evaluate(new, &samples, &key, &mut masks);
    let mut report = String::new();
    let _ = writeln!(
        report,
        "policy {} → {} over {} samples\n",
        old.hash_hex(),
        new.hash_hex(),
        samples.len()
    );
    let mut changes = Changes::default();
    let slots: std::collections::BTreeSet<&Slot> =
        before.outputs.keys().chain(after.outputs.keys()).collect();
    for slot in slots {
        changes.output(
            &mut report,
            slot,
            before.outputs.get(slot),
            after.outputs.get(slot),
        );
    }
    let groups: std::collections::BTreeSet<&Group> =
        before.groups.keys().chain(after.groups.keys()).collect();
    for group in groups {
        let was = before.groups.get(group).copied().unwrap_or(false);
        let is = after.groups.get(group).copied().unwrap_or(false);
        changes.group(&mut report, group, was, is);
    }
    if changes.lines == 0 {
        let _ = writeln!(report, "no difference in the output for these samples");
    }
    let Changes {
        passed,
        dropped,
        kept,
        lost,
        released,
        suppressed,
        ..
    } = changes;
    let _ = writeln!(
        report,
        "\nsummary: {passed} fields newly passed, {dropped} newly dropped; {kept} records newly kept, {lost} no longer kept; {released} groups newly released, {suppressed} newly suppressed"
    );
    Ok(report)
}

/// What changing the policy changes, counted as [`diff`] reports it.
#[derive(Debug, Default)]
struct Changes {
    passed: usize,
    dropped: usize,
    kept: usize,
    lost: usize,
    released: usize,
    suppressed: usize,
    /// Lines reported: outputs and groups that differ.
    lines: usize,
}

impl Changes {
    /// Reports how a slot's output changed, if it did: from `was` under the old policy to `is`
    /// under the new (`None`: the stream does not take the sample).
    fn output(
        &mut self,
        report: &mut String,
        (line, reading, stream): &Slot,
        was: Option<&Output>,
        is: Option<&Output>,
    ) {
        let line = match reading {
            Some(k) => format!("{line}, reading {k}"),
            None => line.to_string(),
        };
        let describe = |o: Option<&Output>| match o {
            None => "not taken by the stream".to_owned(),
            Some(Ok(_)) => "kept".to_owned(),
            Some(Err(why)) => format!("dropped ({why})"),
        };
        match (was, is) {
            (Some(Ok(a)), Some(Ok(b))) => {
                let newly: Vec<&str> = b
                    .iter()
                    .filter(|f| !a.contains(f))
                    .map(String::as_str)
                    .collect();
                let gone: Vec<&str> = a
                    .iter()
                    .filter(|f| !b.contains(f))
                    .map(String::as_str)
                    .collect();
                if newly.is_empty() && gone.is_empty() {
                    return;
                }
                self.lines += 1;
                let _ = write!(report, "sample {line}, stream {stream}:");
                if !newly.is_empty() {
                    self.passed += newly.len();
                    let _ = write!(report, " newly passed: {};", newly.join(", "));
                }
                if !gone.is_empty() {
                    self.dropped += gone.len();
                    let _ = write!(report, " newly dropped: {};", gone.join(", "));
                }
                report.pop();
                report.push('\n');
            }
            (a, b) if a.is_some_and(Result::is_ok) != b.is_some_and(Result::is_ok) => {
                self.lines += 1;
                if b.is_some_and(Result::is_ok) {
                    self.kept += 1;
                } else {
                    self.lost += 1;
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

    /// Reports a group of a window that is newly released or newly suppressed: released under
    /// the old policy if `was`, under the new if `is`.
    fn group(&mut self, report: &mut String, (stream, start, key): &Group, was: bool, is: bool) {
        if was == is {
            return;
        }
        self.lines += 1;
        if is {
            self.released += 1;
        } else {
            self.suppressed += 1;
        }
        let _ = writeln!(
            report,
            "stream {stream}, window {} [{key}]: newly {}",
            time(*start),
            if is { "released" } else { "suppressed" }
        );
    }
}
