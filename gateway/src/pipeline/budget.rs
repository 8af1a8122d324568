//! The privacy-budget ledger on disk, and the random source for differential-privacy noise.
//!
//! The ledger ([`hubgate_privacy::budget::Ledger`]) is written to `<data_dir>/privacy-budget.json`
//! after every release that settled a window (paid for or refused) and before the released records are kept, so a crash or
//! a restart can never hand a stream its budget back: at worst a window is paid for and not
//! released. The file is replaced atomically (write, fsync, rename, fsync the directory). A ledger
//! file that cannot be read stops the gateway at start rather than starting from zero.

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use hubgate_privacy::budget::Ledger;
use hubgate_privacy::noise::RandomSource;

/// File name of the ledger in the data directory.
pub const LEDGER_FILE: &str = "privacy-budget.json";

/// The ledger and where it is kept.
#[derive(Debug)]
pub struct BudgetFile {
    path: PathBuf,
    pub ledger: Ledger,
}

impl BudgetFile {
    /// Opens the ledger in `dir`, creating the directory; a missing file is an empty ledger.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the data directory {}", dir.display()))?;
        let path = dir.join(LEDGER_FILE);
        let mut ledger: Ledger = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "the privacy-budget ledger {} is damaged; refusing to start with a fresh budget",
                    path.display()
                )
            })?,
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ledger::default(),
            Err(err) => {
                return Err(err).with_context(|| format!("reading {}", path.display()));
            }
        };
        ledger.upgrade();
        Ok(Self { path, ledger })
    }

    /// Writes the ledger durably, replacing the previous file atomically.
    pub fn save(&self) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.ledger)?;
        let tmp = self.path.with_extension("json.tmp");
        {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
        }
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Random words from the operating system's CSPRNG (`getrandom`), fetched 32 at a time.
#[derive(Debug, Default)]
pub struct OsRandom {
    buf: [u64; 32],
    next: usize,
}

impl OsRandom {
    pub fn new() -> Self {
        Self {
            buf: [0; 32],
            next: 32,
        }
    }
}

impl RandomSource for OsRandom {
    fn next_u64(&mut self) -> u64 {
        if self.next == self.buf.len() {
            let mut bytes = [0u8; 256];
            // getrandom blocks until the kernel's pool is ready and retries interruptions; it
            // fails only where no system source exists at all, and noise must not be made up.
            while let Err(err) = getrandom::fill(&mut bytes) {
                tracing::error!(%err, "no random source for privacy noise; retrying");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            for (word, chunk) in self.buf.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(chunk);
                *word = u64::from_le_bytes(b);
            }
            self.next = 0;
        }
        let word = self.buf[self.next];
        self.buf[self.next] = 0;
        self.next += 1;
        word
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let day = 20_000 * 86_400_000;
        let mut file = BudgetFile::open(dir.path()).unwrap();
        file.ledger
            .pool("footfall")
            .charge("footfall", day, 3_000_000, 4_000_000)
            .unwrap();
        file.save().unwrap();
        drop(file);

        let mut reopened = BudgetFile::open(dir.path()).unwrap();
        let budget = reopened.ledger.pool("footfall");
        assert_eq!(budget.spent_on_day_of(day), 3_000_000);
        assert!(
            budget
                .charge("footfall", day + 60_000, 3_000_000, 4_000_000)
                .is_err()
        );
    }

    #[test]
    fn a_damaged_ledger_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(LEDGER_FILE),
            b"{\"streams\": {\"footfall\": ",
        )
        .unwrap();
        let err = BudgetFile::open(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("damaged"), "{err:#}");
    }

    #[test]
    fn os_random_words_differ() {
        let mut rng = OsRandom::new();
        let words: std::collections::HashSet<u64> = (0..100).map(|_| rng.next_u64()).collect();
        assert_eq!(words.len(), 100);
    }
}
