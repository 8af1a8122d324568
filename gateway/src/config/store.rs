//! `[store]`: the data directory, the outbox's engine, size cap and commit spacing.

use std::time::Duration;

use hubgate_privacy::diagnostics::Diagnostics;
use serde::Deserialize;

use super::keys::Keys;
use super::units::{byte_size, duration};

/// The store of filtered records that Subscribe replays from: the durable outbox on disk, and the
/// newest records of each stream in memory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Where the gateway keeps its state (the outbox and the privacy-budget ledger); relative paths
    /// are taken from the working directory.
    pub data_dir: std::path::PathBuf,
    /// Bytes of records the outbox may hold over all streams, e.g. "1GiB"; what happens beyond is
    /// `on_full`.
    #[serde(deserialize_with = "byte_size")]
    pub max_bytes: u64,
    /// What happens when the outbox is full: `drop_oldest` (the oldest records are purged) or
    /// `stop_acking` (nothing more is taken from the broker, which holds the messages, until
    /// retention frees room).
    pub on_full: OnFull,
    /// Newest records held in memory per stream, so live subscribers do not read the disk; one
    /// further behind than this reads from it.
    pub memory_records_per_stream: usize,
    /// Size of redb's write-ahead log, `<data_dir>/outbox/outbox.log`, allocated whole at the
    /// first start (default "8MiB"; from "512KiB" to "1GiB"). Smaller suits a small volume;
    /// a commit larger than half of it is written to redb directly, at redb's cost.
    #[serde(deserialize_with = "byte_size")]
    pub log_bytes: u64,
    /// The outbox's storage engine: `redb` (`<data_dir>/outbox/outbox.redb` and its write-ahead
    /// log `outbox.log`, in builds with the `redb` feature, the default) or `sled`
    /// (`<data_dir>/outbox/sled/`).
    pub engine: Engine,
    /// Shortest time between the starts of two commits of the outbox (default "1ms"): messages
    /// that arrive sooner join the next commit. A commit costs a fixed amount of CPU and disk
    /// writes, whatever it holds, besides its records' own share, so a longer interval costs less
    /// per reading at moderate rates, and adds up to as much latency (records reach subscribers,
    /// and QoS 1 messages are acknowledged, only once committed). "0s" commits each turn as soon
    /// as the last commit is done.
    #[serde(deserialize_with = "duration")]
    pub commit_interval: Duration,
    /// Longest time between the starts of two commits (default "10ms"; never less than
    /// `commit_interval`). Under sustained traffic commits are spaced by 1 ms per 20,000
    /// messages a second taken in, and at lower rates by the time 8 messages take to come,
    /// within `commit_interval` and this: fewer, larger commits, at some latency. A message after
    /// a quiet spell is committed at once.
    #[serde(deserialize_with = "duration")]
    pub commit_interval_max: Duration,
}

/// The outbox's storage engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    Sled,
    Redb,
}

/// What happens when the outbox is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    DropOldest,
    StopAcking,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            data_dir: "hubgate-data".into(),
            max_bytes: 1 << 30,
            log_bytes: 8 << 20,
            on_full: OnFull::DropOldest,
            memory_records_per_stream: 512,
            engine: if cfg!(feature = "redb") {
                Engine::Redb
            } else {
                Engine::Sled
            },
            commit_interval: DEFAULT_COMMIT_INTERVAL,
            commit_interval_max: DEFAULT_COMMIT_INTERVAL_MAX,
        }
    }
}

/// `store.commit_interval` when none is given (BENCHMARKS.md, "CPU at fixed rates, and the commit interval").
const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_millis(1);

/// `store.commit_interval_max` when none is given (BENCHMARKS.md, "CPU at fixed rates, and the commit interval").
const DEFAULT_COMMIT_INTERVAL_MAX: Duration = Duration::from_millis(10);

/// Longest `store.commit_interval` and `store.commit_interval_max` accepted.
const MAX_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

impl StoreConfig {
    /// Disk space the outbox may take, at most: the records' cap, redb's log when that is the
    /// engine, and room for the engine's own overhead (a quarter of the cap, at least 1 MiB) and
    /// the key file. `check` reports it.
    pub fn space_needed(&self) -> u64 {
        let log = if self.engine == Engine::Redb {
            self.log_bytes
        } else {
            0
        };
        self.max_bytes + log + (self.max_bytes / 4).max(1 << 20)
    }

    pub(super) fn check(&self, keys: &Keys, diags: &mut Diagnostics) {
        if self.memory_records_per_stream == 0 {
            diags.error(
                keys.at("memory_records_per_stream"),
                "store.memory_records_per_stream must be at least 1",
            );
        }
        if !(512 << 10..=1 << 30).contains(&self.log_bytes) {
            diags.error(
                keys.at("log_bytes"),
                "store.log_bytes must be between 512KiB and 1GiB",
            );
        }
        if self.max_bytes < 1 << 16 {
            diags.error(
                keys.at("max_bytes"),
                "store.max_bytes must be at least 64KiB",
            );
        }
        for (key, value) in [
            ("commit_interval", self.commit_interval),
            ("commit_interval_max", self.commit_interval_max),
        ] {
            if value > MAX_COMMIT_INTERVAL {
                diags.error(
                    keys.at(key),
                    format!("store.{key} must be at most 1s (it delays every record and acknowledgement)"),
                );
            }
        }
        if self.engine == Engine::Redb && !cfg!(feature = "redb") {
            diags.error(
                keys.at("engine"),
                "store.engine = \"redb\" needs a build with the redb feature (cargo build --features redb)",
            );
        }
    }
}
