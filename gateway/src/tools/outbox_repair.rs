//! `hubgate outbox verify` and `hubgate outbox salvage`: the outbox of a stopped gateway, read
//! offline.
//!
//! Both read a working copy of the outbox made inside the data directory (opening an outbox
//! replays its write-ahead log into the engine, and the directory looked at stays as it was);
//! the copy's key file is overwritten with zeros before it is removed, so that no copy of a data
//! key outlives the key's destruction in the original. Both take the data directory's lock: a
//! running gateway's outbox is not read.
//!
//! - `verify` opens the copy as the gateway would, then reads every batch of every stream and
//!   authenticates it under its key: what is damaged, where, and which sequences it held.
//! - `salvage` copies what is readable into a new data directory: every record under its own
//!   sequence (sealed again under new keys), every checkpoint, each stream's next sequence (so no
//!   sequence is handed out twice), and the data directory's other files as they are. What could
//!   not be read stays a hole that the new outbox reports at start and serves as a Gap.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::config::Engine;
use crate::outbox::{self, Append, Commit, Damage, Finding, Outbox};

/// What a look at an outbox found.
#[derive(Debug, Default)]
pub struct Report {
    pub engine: Option<Engine>,
    pub findings: Vec<Finding>,
    /// Per stream: records readable, and the ranges that are not.
    pub streams: Vec<(String, u64, Vec<Damage>)>,
}

impl Report {
    /// Whether records were lost: a damaged range, or a finding that lost some.
    pub fn lost(&self) -> bool {
        self.findings.iter().any(|f| f.lost) || self.streams.iter().any(|s| !s.2.is_empty())
    }

    /// The report as text, a line per finding and per stream.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            out.push_str(&format!("outbox/{}: {}: {}\n", f.file, f.at, f.what));
        }
        for (stream, records, damaged) in &self.streams {
            out.push_str(&format!("stream {stream:?}: {records} records readable"));
            if damaged.is_empty() {
                out.push('\n');
            }
            for d in damaged {
                out.push_str(&format!(
                    "\n  sequences {}-{} ({} records) lost: {}",
                    d.first,
                    d.last,
                    d.last - d.first + 1,
                    d.why
                ));
            }
            if !damaged.is_empty() {
                out.push('\n');
            }
        }
        out
    }
}

/// The engine whose files `data_dir/outbox` holds.
fn engine_of(data_dir: &Path) -> anyhow::Result<Engine> {
    let dir = data_dir.join("outbox");
    if dir.join("outbox.redb").exists() {
        Ok(Engine::Redb)
    } else if dir.join("sled").exists() {
        Ok(Engine::Sled)
    } else {
        anyhow::bail!(
            "{} holds no outbox (neither outbox.redb nor sled/)",
            dir.display()
        )
    }
}

/// A working copy of a data directory's outbox, inside it; zeroed and removed when dropped.
struct WorkingCopy {
    /// The data directory the copy's outbox is in.
    data_dir: PathBuf,
}

impl WorkingCopy {
    fn make(data_dir: &Path) -> anyhow::Result<Self> {
        remove_stale_copies(data_dir);
        let copy = data_dir.join(format!("outbox-verify.{}", std::process::id()));
        copy_tree(&data_dir.join("outbox"), &copy.join("outbox"))
            .with_context(|| format!("cannot copy the outbox to {}", copy.display()))?;
        Ok(Self { data_dir: copy })
    }
}

impl Drop for WorkingCopy {
    fn drop(&mut self) {
        erase(&self.data_dir);
    }
}

/// Overwrites the key file of a working copy in place with zeros, synced, then removes the copy.
fn erase(copy: &Path) {
    let keys = copy.join("outbox/keys");
    if let Ok(file) = std::fs::OpenOptions::new().write(true).open(&keys) {
        let len = file.metadata().map_or(0, |m| m.len());
        let zeros = vec![0u8; usize::try_from(len).unwrap_or(0)];
        let _ = std::os::unix::fs::FileExt::write_all_at(&file, &zeros, 0);
        let _ = file.sync_data();
    }
    let _ = std::fs::remove_dir_all(copy);
}

/// Removes the working copies a tool that was killed left behind (under the data directory's
/// lock, which the caller holds).
fn remove_stale_copies(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("outbox-verify.")
        {
            erase(&entry.path());
        }
    }
}

/// Copies the tree `from` into `to` (directories 0700, files 0600). Files are read and written,
/// not cloned: a file system that shares blocks between copies (a reflink) would keep a data
/// key's bytes once the original erases it in place.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            let bytes = zeroize::Zeroizing::new(std::fs::read(entry.path())?);
            std::io::Write::write_all(
                &mut std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&target)?,
                &bytes,
            )?;
        }
    }
    Ok(())
}

/// The data directory's lock, as the gateway takes it.
fn lock(data_dir: &Path) -> anyhow::Result<std::fs::File> {
    anyhow::ensure!(
        data_dir.join("outbox").is_dir(),
        "{} holds no outbox",
        data_dir.display()
    );
    crate::app::lock_data_dir(data_dir)
}

/// Opens the outbox in `copy` and looks at all of it; `deep` authenticates every batch.
fn look(outbox: &dyn Outbox, engine: Engine) -> anyhow::Result<Report> {
    let mut report = Report {
        engine: Some(engine),
        findings: outbox.findings(),
        streams: Vec::new(),
    };
    for stream in outbox.streams()? {
        let survey = match outbox.survey(&stream, true) {
            Ok(survey) => survey,
            Err(err) => {
                report.findings.push(Finding {
                    file: outbox.data_file().into(),
                    at: format!("stream {stream:?}"),
                    what: format!("the stream cannot be read through: {err}"),
                    lost: true,
                });
                continue;
            }
        };
        let mut damaged = survey.damaged;
        let stored = outbox.next_sequence(&stream)?;
        if let Some(noted) = outbox.high_water().next(&stream).filter(|&n| n > stored) {
            damaged.push(Damage {
                first: stored,
                last: noted - 1,
                why: "the newest records: damaged or missing (the sequence marks noted them)",
            });
        }
        report.streams.push((stream, survey.records, damaged));
    }
    Ok(report)
}

/// `hubgate outbox verify DATA_DIR`: the report, or an error when the outbox cannot be opened.
pub fn verify(data_dir: &Path) -> anyhow::Result<Report> {
    let _lock = lock(data_dir)?;
    let engine = engine_of(data_dir)?;
    let copy = WorkingCopy::make(data_dir)?;
    let outbox = open(engine, &copy.data_dir)?;
    look(&*outbox, engine)
}

fn open(engine: Engine, data_dir: &Path) -> anyhow::Result<Arc<dyn Outbox>> {
    let log = data_dir.join("outbox/outbox.log");
    let log_bytes = std::fs::metadata(&log).map_or(8 << 20, |m| m.len());
    outbox::open(engine, data_dir, log_bytes.max(512 << 10))
        .map_err(|err| anyhow::anyhow!("the outbox cannot be opened: {err}"))
}

/// How long one data key seals in the salvaged outbox: the shortest any stream uses, since the
/// streams' retention is not known here (the keys of the new outbox rotate at least as often as
/// the old ones did).
const SALVAGE_KEY_PERIOD: Duration = Duration::from_secs(1);

/// Records copied per read.
const CHUNK: usize = 4096;

/// `hubgate outbox salvage DATA_DIR --into NEW`: copies what is readable into the new data
/// directory `into` (which must not exist, or be empty); returns what was lost.
pub fn salvage(data_dir: &Path, into: &Path) -> anyhow::Result<Report> {
    let _lock = lock(data_dir)?;
    let engine = engine_of(data_dir)?;
    if into.exists() {
        anyhow::ensure!(
            std::fs::read_dir(into)?.next().is_none(),
            "{} is not empty: salvage writes a new data directory",
            into.display()
        );
    }
    let copy = WorkingCopy::make(data_dir)?;
    let from = open(engine, &copy.data_dir)?;
    let report = look(&*from, engine)?;
    let _new_lock = crate::app::lock_data_dir(into)?;
    for entry in std::fs::read_dir(data_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == "outbox" || name == "lock" || name.starts_with("outbox-verify.") {
            continue;
        }
        let target = into.join(&*name);
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    let to = open(engine, into)?;
    let mut report = report;
    let mut streams = from.streams()?;
    for noted in from.high_water().streams() {
        if !streams.contains(&noted) {
            streams.push(noted);
        }
    }
    for stream in streams {
        let skipped = copy_stream(&*from, &*to, &stream)?;
        if !skipped.is_empty() {
            let known = report.streams.iter_mut().find(|s| s.0 == stream);
            match known {
                Some(entry) => entry.2.extend(skipped),
                None => report.streams.push((stream.clone(), 0, skipped)),
            }
        }
        let next = from
            .next_sequence(&stream)?
            .max(from.high_water().next(&stream).unwrap_or(0));
        to.high_water().note([(stream.clone(), next)])?;
    }
    to.high_water().sync()?;
    for name in from.checkpoint_names()? {
        match from.checkpoint(&name) {
            Ok(Some(bytes)) => to.commit(&Commit {
                appends: Vec::new(),
                checkpoints: vec![(name, bytes)],
            })?,
            Ok(None) | Err(_) => report.findings.push(Finding {
                file: from.data_file().into(),
                at: format!("checkpoint {name:?}"),
                what: "a checkpoint that cannot be read: left out".into(),
                lost: true,
            }),
        }
    }
    Ok(report)
}

/// The lowest sequence after `at` (before `end`) from which `stream` can be read again: tried at
/// growing distances (1, 2, 4, …), then narrowed down between the last that failed and the first
/// that did not. Damage the engine cannot read through is skipped, and no more.
fn readable_after(outbox: &dyn Outbox, stream: &str, at: u64, end: u64) -> Option<u64> {
    let readable = |s: u64| outbox.read(stream, s, 1).is_ok();
    let (mut failed, mut step) = (at, 1);
    let mut found = loop {
        let probe = at.checked_add(step).filter(|&p| p < end)?;
        if readable(probe) {
            break probe;
        }
        failed = probe;
        step *= 2;
    };
    while found - failed > 1 {
        let mid = failed + (found - failed) / 2;
        if readable(mid) {
            found = mid;
        } else {
            failed = mid;
        }
    }
    Some(found)
}

/// Copies the readable records of `stream`, each under its own sequence, in runs of consecutive
/// sequences kept at the same time. Returns the ranges the engine could not read through.
fn copy_stream(from: &dyn Outbox, to: &dyn Outbox, stream: &str) -> anyhow::Result<Vec<Damage>> {
    let mut skipped = Vec::new();
    let end = from.next_sequence(stream)?;
    let mut next = from.oldest(stream)?.map_or(end, |b| b.first);
    while next < end {
        let read = match from.read(stream, next, CHUNK) {
            Ok(read) => read,
            Err(err) => {
                let after = readable_after(from, stream, next, end);
                let last = after.unwrap_or(end) - 1;
                tracing::error!(stream, first = next, last, %err, "cannot read these sequences: they are left out");
                skipped.push(Damage {
                    first: next,
                    last,
                    why: "the engine cannot read through these sequences",
                });
                match after {
                    Some(after) => {
                        next = after;
                        continue;
                    }
                    None => break,
                }
            }
        };
        let skipped = read.damaged.iter().map(|d| d.1 + 1).max();
        let Some(last) = read.records.last().map(|r| r.sequence) else {
            match skipped {
                Some(after) if after > next => {
                    next = after;
                    continue;
                }
                _ => break,
            }
        };
        let mut run: Option<Append> = None;
        for record in read.records {
            let continues = run.as_ref().is_some_and(|a| {
                a.first + a.records.len() as u64 == record.sequence && a.kept_ms == record.kept_ms
            });
            if !continues && let Some(done) = run.take() {
                to.commit(&Commit {
                    appends: vec![done],
                    checkpoints: Vec::new(),
                })?;
            }
            run.get_or_insert_with(|| Append {
                stream: stream.to_owned(),
                first: record.sequence,
                kept_ms: record.kept_ms,
                key_period: SALVAGE_KEY_PERIOD,
                records: Vec::new(),
            })
            .records
            .push(bytes::Bytes::from(record.bytes));
        }
        if let Some(done) = run {
            to.commit(&Commit {
                appends: vec![done],
                checkpoints: Vec::new(),
            })?;
        }
        next = last + 1;
    }
    Ok(skipped)
}
