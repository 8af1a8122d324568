//! `hubgate dry-run`: what the policy does to sample messages, field by field.
//!
//! Input: one JSON object per line, `{"topic": "...", "payload": {...}}`; `payload` may also be a
//! string, taken as the raw bytes (to try malformed payloads), and `received` (Unix seconds) sets
//! the receive time. For each sample the output names the stream it routes to, the fields that came
//! in (names only: the sample's raw values are never echoed), what each stage did to each field,
//! and the record that would go out. A summary follows.
//!
//! Deterministic: a fixed pseudonymisation key (never used to serve data) and a fixed receive time
//! unless a sample gives one, so the same samples always give the same output.

use std::fmt::Write as _;
use std::io::BufRead;

use hubgate_privacy::chain::{self, Fate};
use hubgate_privacy::identifiers;
use hubgate_privacy::pseudonym::Key;
use hubgate_privacy::{Context, Policy, Value};

use crate::decode;

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
}

/// Runs the samples from `input` through `policy`, returning the report.
pub fn run(policy: &Policy, input: impl BufRead) -> anyhow::Result<String> {
    let key = Key::fixed_for_dry_run();
    let mut report = String::new();
    let mut sum = Summary::default();
    let _ = writeln!(report, "policy {}\n", policy.hash_hex());
    for (n, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        sum.samples += 1;
        let sample: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("sample line {}: not a JSON object: {e}", n + 1))?;
        let topic = sample
            .get("topic")
            .and_then(|t| t.as_str())
            .ok_or_else(|| anyhow::anyhow!("sample line {}: needs a \"topic\" string", n + 1))?;
        let payload = match sample.get("payload") {
            Some(serde_json::Value::String(raw)) => raw.clone().into_bytes(),
            Some(other) => serde_json::to_vec(other)?,
            None => anyhow::bail!("sample line {}: needs a \"payload\"", n + 1),
        };
        let received_ms = sample
            .get("received")
            .and_then(serde_json::Value::as_f64)
            .map_or(DEFAULT_RECEIVED_MS, |s| (s * 1000.0) as i64);
        let _ = write!(report, "sample {}: {topic}", n + 1);
        let streams: Vec<usize> = policy.route(topic).collect();
        if streams.is_empty() {
            sum.unrouted += 1;
            let _ = writeln!(report, " → no stream takes this topic: dropped\n");
            continue;
        }
        let _ = writeln!(report);
        for index in streams {
            let stream = &policy.streams()[index];
            let _ = write!(report, "  stream {}: ", stream.name);
            if identifiers::is_media_payload(&payload) {
                sum.rejected += 1;
                let _ = writeln!(report, "image or video payload: dropped");
                continue;
            }
            let reading = match decode::json(&payload) {
                Ok(r) => r,
                Err(e) => {
                    sum.rejected += 1;
                    let _ = writeln!(report, "{e}: dropped");
                    continue;
                }
            };
            let names: Vec<&str> = reading.fields.iter().map(|(p, _)| p.as_str()).collect();
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
                        format!("generalised into the H3 cell '{cell}', not passed")
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
                let _ = writeln!(report, "    {path:<24} {what}");
            }
            match outcome {
                Ok(out) => {
                    sum.records += 1;
                    sum.cells += u64::from(out.locations_generalised);
                    let fields: serde_json::Map<String, serde_json::Value> = out
                        .record
                        .fields
                        .iter()
                        .map(|(p, v)| (p.clone(), json_value(v)))
                        .collect();
                    let time = humantime::format_rfc3339_millis(
                        std::time::UNIX_EPOCH
                            + std::time::Duration::from_millis(
                                out.record.event_time_ms.max(0) as u64
                            ),
                    );
                    let _ = writeln!(
                        report,
                        "  out: {} at {time}",
                        serde_json::Value::Object(fields)
                    );
                }
                Err(rejection) => {
                    sum.rejected += 1;
                    let _ = writeln!(report, "  {rejection}: dropped");
                }
            }
        }
        let _ = writeln!(report);
    }
    let _ = writeln!(
        report,
        "summary: {} samples, {} records out, {} unrouted, {} rejected whole\n\
         fields: {} kept, {} pseudonymised, {} not declared, {} holding identifiers, {} coordinates \
         generalised into {} cells, {} without a key, {} arrays or nulls",
        sum.samples,
        sum.records,
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
    Ok(report)
}

fn json_value(v: &Value) -> serde_json::Value {
    match v {
        Value::Int(i) => (*i).into(),
        Value::Float(f) => (*f).into(),
        Value::Str(s) => s.clone().into(),
        Value::Bool(b) => (*b).into(),
    }
}
