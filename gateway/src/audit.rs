//! The audit log: an append-only, hash-chained record of what the gateway did to the data it holds.
//!
//! One JSON object per line in `<data_dir>/audit.jsonl`:
//!
//! ```json
//! {"seq":7,"time_ms":1795564800000,"event":"purge","data":{"stream":"noise",…},"prev":"…","hash":"…"}
//! ```
//!
//! `hash` is the lowercase hex SHA-256 of the line's bytes before `,"hash":`, and `prev` is the
//! previous entry's `hash` (64 zeros for the first entry). Changing an entry breaks its own hash;
//! removing, inserting or reordering entries, or rewriting one with a fresh hash, breaks the
//! chain at the entry after. [`verify`] (`hubgate audit verify FILE`) names the first broken
//! entry and prints the last entry's hash: entries cut off the end leave no trace in the file
//! itself, so an auditor keeps that hash (or compares it with an earlier one) to notice them. Entries are written with
//! `O_APPEND` and synced one by one: the events are rare (purges, key rotations and
//! destructions, budget spends and refusals, starts), and an audit entry that a crash could take
//! back is worth little.
//!
//! Entries name streams, sequence ranges, times, counts and hashes, never a value or an
//! identifier. A write that fails is logged and counted (`hubgate_audit_write_errors_total`); the
//! gateway goes on, since stopping would lose more than the entry.
//!
//! Recorded now: `start` (policy hash, version), `purge` (stream, reason, records, sequence and
//! time range), `outbox_key_destroyed`, `pseudonym_key_rotated`, `pseudonym_key_destroyed`,
//! `privacy_budget_spent`, `privacy_budget_refused`.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use hubgate_exporters::catalogue;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One entry, as written.
#[derive(Debug, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub time_ms: i64,
    pub event: String,
    pub data: serde_json::Value,
    pub prev: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const HASH_FIELD: &[u8] = b",\"hash\":\"";

/// Splits a line into the bytes its hash covers and the hash it claims.
fn split_hash(line: &[u8]) -> Option<(&[u8], &str)> {
    let at = line
        .windows(HASH_FIELD.len())
        .rposition(|w| w == HASH_FIELD)?;
    let claimed = line.get(at + HASH_FIELD.len()..line.len().checked_sub(2)?)?;
    (line.ends_with(b"\"}") && claimed.len() == 64)
        .then(|| std::str::from_utf8(claimed).ok().map(|h| (&line[..at], h)))
        .flatten()
}

#[derive(Debug)]
struct Tail {
    file: File,
    next_seq: u64,
    prev: String,
}

/// The audit log of a gateway.
#[derive(Debug)]
pub struct AuditLog {
    tail: Mutex<Tail>,
    write_errors: metrics::Counter,
}

impl AuditLog {
    /// Opens (or creates) the log and finds where its chain ends. A last line without its newline
    /// (the process died while writing it) is cut off, and the cut is itself recorded.
    pub fn open(path: &Path) -> io::Result<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let torn = bytes.len() - complete;
        if torn > 0 {
            file.set_len(complete as u64)?;
            file.seek(SeekFrom::End(0))?;
            file.sync_data()?;
        }
        let (next_seq, prev) = match bytes[..complete]
            .split(|b| *b == b'\n')
            .rfind(|l| !l.is_empty())
        {
            Some(last) => {
                let invalid = |why: String| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "the last audit entry of {} is not valid: {why}",
                            path.display()
                        ),
                    )
                };
                let entry: Entry =
                    serde_json::from_slice(last).map_err(|e| invalid(e.to_string()))?;
                let (_, hash) = split_hash(last).ok_or_else(|| invalid("no hash".into()))?;
                (entry.seq + 1, hash.to_owned())
            }
            None => (1, GENESIS.to_owned()),
        };
        let log = Self {
            tail: Mutex::new(Tail {
                file,
                next_seq,
                prev,
            }),
            write_errors: metrics::counter!(catalogue::AUDIT_WRITE_ERRORS),
        };
        if torn > 0 {
            log.record(
                crate::pipeline::now_ms(),
                "audit_tail_cut",
                serde_json::json!({ "bytes": torn }),
            );
        }
        Ok(log)
    }

    /// Appends an entry and syncs it. `data` must hold no value or identifier from a reading.
    pub fn record(&self, time_ms: i64, event: &str, data: serde_json::Value) {
        let mut tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = Entry {
            seq: tail.next_seq,
            time_ms,
            event: event.to_owned(),
            data,
            prev: tail.prev.clone(),
        };
        let length = tail.file.metadata().map(|m| m.len());
        let written = serde_json::to_vec(&entry)
            .map_err(io::Error::other)
            .and_then(|mut line| {
                // `{…}` becomes `{…,"hash":"<SHA-256 of {…>"}`.
                line.pop();
                let hash = hex(&Sha256::digest(&line));
                line.extend_from_slice(HASH_FIELD);
                line.extend_from_slice(hash.as_bytes());
                line.extend_from_slice(b"\"}\n");
                tail.file.write_all(&line)?;
                tail.file.sync_data()?;
                Ok(hash)
            });
        match written {
            Ok(hash) => {
                tail.prev = hash;
                tail.next_seq += 1;
            }
            Err(err) => {
                // Whatever part of the entry reached the file would fork the chain: cut it off.
                if let Ok(length) = length {
                    let _ = tail.file.set_len(length);
                }
                self.write_errors.increment(1);
                tracing::error!(%err, event, "cannot write the audit log");
            }
        }
    }
}

/// What [`verify`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The whole chain holds: its number of entries and the hash of the last line.
    Intact { entries: u64, last_hash: String },
    /// The first entry that does not follow from the one before, by line number (from 1).
    Broken { line: usize, reason: String },
}

/// Checks the chain of an audit log file from its first entry.
pub fn verify(path: &Path) -> io::Result<Verdict> {
    let reader = BufReader::new(File::open(path)?);
    let mut prev = GENESIS.to_owned();
    let mut expected_seq = None;
    let mut entries = 0;
    for (i, line) in reader.split(b'\n').enumerate() {
        let line = line?;
        let number = i + 1;
        let broken = |reason: String| {
            Ok(Verdict::Broken {
                line: number,
                reason,
            })
        };
        let entry: Entry = match serde_json::from_slice(&line) {
            Ok(entry) => entry,
            Err(e) => return broken(format!("not an audit entry: {e}")),
        };
        let Some((covered, claimed)) = split_hash(&line) else {
            return broken("it has no hash".into());
        };
        if hex(&Sha256::digest(covered)) != claimed {
            return broken("its content does not match its hash".into());
        }
        if entry.prev != prev {
            return broken("its prev hash does not match the entry before it".into());
        }
        if expected_seq.is_some_and(|s| s != entry.seq) {
            return broken(format!(
                "sequence {} where {} was expected",
                entry.seq,
                expected_seq.unwrap_or_default()
            ));
        }
        expected_seq = Some(entry.seq + 1);
        prev = claimed.to_owned();
        entries += 1;
    }
    Ok(Verdict::Intact {
        entries,
        last_hash: prev,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn log_with(dir: &Path, n: u64) -> std::path::PathBuf {
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..n {
            log.record(
                1_000 + i as i64,
                "purge",
                json!({"stream": "noise", "records": i}),
            );
        }
        path
    }

    #[test]
    fn an_intact_chain_verifies_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_with(dir.path(), 3);
        AuditLog::open(&path)
            .unwrap()
            .record(2_000, "start", json!({}));
        let Verdict::Intact { entries, last_hash } = verify(&path).unwrap() else {
            panic!("{:?}", verify(&path));
        };
        assert_eq!(entries, 4);
        let text = std::fs::read_to_string(&path).unwrap();
        let last = text.lines().last().unwrap();
        assert!(last.ends_with(&format!(",\"hash\":\"{last_hash}\"}}")));
        let entry: Entry = serde_json::from_str(last).unwrap();
        assert_eq!((entry.seq, entry.event.as_str()), (4, "start"));
    }

    #[test]
    fn tampering_with_one_entry_is_found_at_the_entry_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_with(dir.path(), 5);
        let text = std::fs::read_to_string(&path).unwrap();
        // Change a count in entry 3: its own hash no longer matches.
        let tampered = text.replacen("\"records\":2", "\"records\":0", 1);
        assert_ne!(tampered, text);
        std::fs::write(&path, &tampered).unwrap();
        assert!(matches!(
            verify(&path).unwrap(),
            Verdict::Broken { line: 3, .. }
        ));
        // Change it and give it a fresh hash: the entry after it no longer follows.
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let changed = lines[2].replacen("\"records\":2", "\"records\":0", 1);
        let (covered, _) = split_hash(changed.as_bytes()).unwrap();
        let rehashed = format!(
            "{},\"hash\":\"{}\"}}",
            std::str::from_utf8(covered).unwrap(),
            hex(&Sha256::digest(covered))
        );
        lines[2] = rehashed;
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        assert!(matches!(
            verify(&path).unwrap(),
            Verdict::Broken { line: 4, .. }
        ));
        // Removing entry 2 breaks the chain at the entry that followed it.
        let mut lines: Vec<&str> = text.lines().collect();
        lines.remove(1);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        assert!(matches!(
            verify(&path).unwrap(),
            Verdict::Broken { line: 2, .. }
        ));
        // A forged log must still start from the fixed genesis.
        let forged = "{\"seq\":1,\"time_ms\":0,\"event\":\"x\",\"data\":{},\"prev\":\"ab\"";
        let line = format!("{forged},\"hash\":\"{}\"}}\n", hex(&Sha256::digest(forged)));
        std::fs::write(&path, line).unwrap();
        assert!(matches!(
            verify(&path).unwrap(),
            Verdict::Broken { line: 1, .. }
        ));
    }

    #[test]
    fn a_torn_last_line_is_cut_and_the_cut_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_with(dir.path(), 2);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"seq\":3,\"time").unwrap();
        drop(file);
        let log = AuditLog::open(&path).unwrap();
        log.record(3_000, "start", json!({}));
        assert!(matches!(
            verify(&path).unwrap(),
            Verdict::Intact { entries: 4, .. }
        ));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"event\":\"audit_tail_cut\""));
    }
}
