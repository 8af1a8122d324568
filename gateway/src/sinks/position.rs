//! What the exporters (the upstream Push client and the NATS publisher) share: a stream's
//! acknowledged position, kept as an outbox checkpoint, and the wait between attempts.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// How often a moving position is written, at most.
pub const SAVE_EVERY: Duration = Duration::from_millis(500);

/// The last sequence of a stream the receiver acknowledged, and the last one written to the
/// checkpoint `name`: a restart resumes after the written one.
#[derive(Debug)]
pub struct Position {
    name: String,
    /// Last sequence acknowledged (or lost before it could be sent).
    pub acked: u64,
    saved: u64,
}

impl Position {
    /// The position saved under the checkpoint `name`, or 0.
    pub fn load(store: &Store, name: String) -> anyhow::Result<Self> {
        let acked = store
            .checkpoint(&name)?
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(0, u64::from_be_bytes);
        Ok(Self {
            name,
            acked,
            saved: acked,
        })
    }

    /// Writes the acknowledged position if it moved since the last write.
    pub async fn save(&mut self, store: &Arc<Store>) {
        if self.acked == self.saved {
            return;
        }
        let (store, name, acked) = (Arc::clone(store), self.name.clone(), self.acked);
        let saved = tokio::task::spawn_blocking(move || {
            store.save_checkpoint(&name, acked.to_be_bytes().to_vec())
        })
        .await;
        match saved {
            Ok(Ok(())) => self.saved = acked,
            Ok(Err(err)) => {
                tracing::error!(checkpoint = %self.name, %err, "cannot save the delivery position")
            }
            Err(_) => {}
        }
    }
}

/// The wait between attempts: 100 ms, doubling up to a maximum, and back to 100 ms after
/// progress. An outage is logged at its first failure, then every 20th.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    const START: Duration = Duration::from_millis(100);

    pub fn new(max: Duration) -> Self {
        Self {
            next: Self::START,
            max,
            failures: 0,
        }
    }

    /// Something got through: the next failure waits from the start again.
    pub fn progressed(&mut self) {
        (self.next, self.failures) = (Self::START, 0);
    }

    /// After a failure: calls `log` with the wait when this failure is to be logged, then waits.
    /// False when `shutdown` came first.
    pub async fn wait(&mut self, shutdown: &CancellationToken, log: impl FnOnce(Duration)) -> bool {
        if self.failures.is_multiple_of(20) {
            log(self.next);
        }
        self.failures += 1;
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(wait) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_wait_doubles_up_to_the_maximum_and_starts_over_after_progress() {
        let shutdown = CancellationToken::new();
        let mut backoff = Backoff::new(Duration::from_millis(500));
        let mut logged = Vec::new();
        let mut waits = Vec::new();
        for _ in 0..25 {
            let before = tokio::time::Instant::now();
            assert!(backoff.wait(&shutdown, |w| logged.push(w)).await);
            waits.push(before.elapsed().as_millis());
        }
        assert_eq!(waits[..5], [100, 200, 400, 500, 500]);
        assert_eq!(logged.len(), 2, "the first failure and the 21st");
        backoff.progressed();
        assert!(backoff.wait(&shutdown, |_| {}).await);
        assert_eq!(backoff.next, Duration::from_millis(200));
        shutdown.cancel();
        assert!(!backoff.wait(&shutdown, |_| {}).await);
    }
}
