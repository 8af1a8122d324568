//! Pseudonymisation keys: one random 256-bit key per stream (purpose) and per key epoch.
//!
//! Keys live in memory only and are never written, logged or sent. When a stream's epoch ends, its
//! key is replaced by a fresh random one and the old key is wiped from memory (zeroised on drop),
//! which makes the old epoch's pseudonyms unlinkable to anything from then on (crypto-shredding).
//! Each rotation and destruction is counted and written to the audit log, without the key.
//!
//! Epochs are aligned to the Unix epoch (`floor(now / key_epoch)`), so a restart within an epoch
//! also starts a new key: pseudonyms never survive a restart.
//!
//! These keys make pseudonyms; the keys that seal records on disk are the outbox's data keys
//! ([`crate::outbox::data_keys`]), a system of their own.
//!
//! Metrics: `hubgate_key_rotations_total{stream}`, `hubgate_keys_destroyed_total{stream}`.

use hubgate_exporters::catalogue;
use hubgate_privacy::Policy;
use hubgate_privacy::pseudonym::Key;

#[derive(Debug)]
struct StreamKey {
    name: String,
    epoch_ms: i64,
    current: Option<(i64, Key)>,
    /// Keys made so far for this stream.
    generation: u64,
}

/// The current key of every stream that pseudonymises.
#[derive(Debug)]
pub struct PseudonymKeys {
    streams: Vec<Option<StreamKey>>,
    audit: Option<std::sync::Arc<crate::governance::audit::AuditLog>>,
}

impl PseudonymKeys {
    /// Keys for `policy`'s streams; rotations and destructions go to `audit` when given.
    pub fn new(
        policy: &Policy,
        audit: Option<std::sync::Arc<crate::governance::audit::AuditLog>>,
    ) -> Self {
        let streams = policy
            .streams()
            .iter()
            .map(|s| {
                s.needs_key().then(|| StreamKey {
                    name: s.name.clone(),
                    epoch_ms: i64::try_from(s.key_epoch.as_millis())
                        .unwrap_or(i64::MAX)
                        .max(1),
                    current: None,
                    generation: 0,
                })
            })
            .collect();
        Self { streams, audit }
    }

    /// Makes every stream's key for the epoch that contains `now_ms`, rotating those whose epoch
    /// changed: on the clock, so that when a key changes says nothing of when readings came.
    pub fn rotate_due(&mut self, now_ms: i64) {
        for index in 0..self.streams.len() {
            let _ = self.key(index, now_ms);
        }
    }

    /// The key of stream `index` for the epoch that contains `now_ms`, rotating if the epoch
    /// changed. `None` for streams that do not pseudonymise, or if no random key could be made
    /// (then the chain drops what it would have pseudonymised).
    ///
    /// Rotations and destructions are audited at the epoch's start, not at `now_ms`: the first
    /// reading of an epoch, which may be what rotates the key, leaves no trace of its time.
    pub fn key(&mut self, index: usize, now_ms: i64) -> Option<&Key> {
        let stream = self.streams.get_mut(index)?.as_mut()?;
        let epoch = now_ms.div_euclid(stream.epoch_ms);
        let epoch_start = epoch.saturating_mul(stream.epoch_ms);
        if stream.current.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let fresh = random_key();
            // Dropping the old key zeroises it.
            if let Some((old_epoch, old)) = stream.current.take() {
                drop(old);
                metrics::counter!(catalogue::KEYS_DESTROYED, "stream" => stream.name.clone())
                    .increment(1);
                tracing::info!(stream = %stream.name, epoch = old_epoch, "pseudonymisation key destroyed");
                if let Some(audit) = &self.audit {
                    audit.record(
                        epoch_start,
                        "pseudonym_key_destroyed",
                        serde_json::json!({ "stream": stream.name, "epoch": old_epoch }),
                    );
                }
            }
            match fresh {
                Some(key) => {
                    metrics::counter!(catalogue::KEY_ROTATIONS, "stream" => stream.name.clone())
                        .increment(1);
                    tracing::info!(stream = %stream.name, epoch, "new pseudonymisation key");
                    if let Some(audit) = &self.audit {
                        audit.record(
                            epoch_start,
                            "pseudonym_key_rotated",
                            serde_json::json!({ "stream": stream.name, "epoch": epoch }),
                        );
                    }
                    stream.current = Some((epoch, key));
                    stream.generation += 1;
                }
                None => {
                    tracing::error!(stream = %stream.name, "no random source for a pseudonymisation key; values to pseudonymise are dropped");
                    return None;
                }
            }
        }
        stream.current.as_ref().map(|(_, k)| k)
    }

    /// How many keys stream `index` has had in this process: it changes exactly when the
    /// stream's pseudonyms do. 0 for streams that do not pseudonymise.
    pub fn generation(&self, index: usize) -> u64 {
        self.streams
            .get(index)
            .and_then(Option::as_ref)
            .map_or(0, |s| s.generation)
    }
}

fn random_key() -> Option<Key> {
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(bytes.as_mut_slice()).ok()?;
    Some(Key::new(*bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hubgate_privacy::pseudonym::pseudonymise;

    fn policy() -> Policy {
        let src = "[[stream]]\nname = \"footfall\"\ntopics = [\"t\"]\npurpose = \"p\"\nlegal_basis = \"b\"\n\
                   principles = [\"shared_prosperity\"]\nretention = \"1d\"\nkey_epoch = \"1h\"\n\
                   [stream.fields]\nmac = \"pseudonymise\"\n\
                   [[stream]]\nname = \"air\"\ntopics = [\"u\"]\npurpose = \"p\"\nlegal_basis = \"b\"\n\
                   principles = [\"shared_prosperity\"]\nretention = \"1d\"\n[stream.fields]\npm25 = \"keep\"\n";
        hubgate_privacy::policy::from_toml(src).unwrap().0
    }

    #[test]
    fn one_key_per_epoch_and_a_fresh_one_after() {
        let mut keys = PseudonymKeys::new(&policy(), None);
        assert!(
            keys.key(1, 0).is_none(),
            "a stream that does not pseudonymise has no key"
        );
        let hour = 3_600_000;
        let p1 = pseudonymise(keys.key(0, 10).unwrap(), "3c:22:fb:12:34:56");
        let p1_again = pseudonymise(keys.key(0, hour - 1).unwrap(), "3c:22:fb:12:34:56");
        assert_eq!(
            p1, p1_again,
            "the same epoch links a device to one pseudonym"
        );
        assert_eq!(keys.generation(0), 1);
        let p2 = pseudonymise(keys.key(0, hour).unwrap(), "3c:22:fb:12:34:56");
        assert_eq!((keys.generation(0), keys.generation(1)), (2, 0));
        assert_ne!(p1, p2, "a new epoch gives an unrelated pseudonym");
        // A second manager (a restart) never reuses a key, even within the same epoch.
        let mut restarted = PseudonymKeys::new(&policy(), None);
        assert_ne!(
            pseudonymise(restarted.key(0, hour).unwrap(), "3c:22:fb:12:34:56"),
            p2
        );
    }
}
