//! The turn loop: takes messages from the queue in batches, has each turn committed on a thread
//! of its own, and acknowledges the turn's messages once it is durable.

use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::push::PushRefused;
use super::{BATCH, Pipeline};
use crate::sources::mqtt::{Acker, Inbound};
use crate::sources::push::PushJob;
use crate::store::{CommitError, Pending, Store};
use crate::telemetry::clock::now_ms;

/// Most messages in one turn. Once a turn holds this many, or a quarter of `store.max_bytes` of
/// records, it takes no more: the rest wait in the queue for the next (when the queue is full, the
/// MQTT connection stops reading).
pub(super) const TURN_MAX: usize = 8 * BATCH;
/// Most record bytes one turn stages, so that a turn (and the one being committed) stays small
/// in memory whatever the records' sizes; at the usual few hundred bytes a record, a turn of
/// [`TURN_MAX`] messages holds about a megabyte.
pub(super) const TURN_BYTES: u64 = 2 << 20;

/// What a turn owes once it is durable: the packet ids of its QoS 1 messages in the order they
/// arrived, and the replies to the forwarded records it kept.
#[derive(Debug, Default)]
pub(super) struct Owed {
    messages: usize,
    acks: Vec<u16>,
    replies: Vec<(
        tokio::sync::oneshot::Sender<Result<u64, tonic::Status>>,
        u64,
    )>,
}

impl Owed {
    fn is_empty(&self) -> bool {
        self.messages == 0 && self.replies.is_empty()
    }

    /// Takes in `batch`'s messages (QoS 0 messages need no acknowledgement).
    fn take(&mut self, batch: &mut Vec<Inbound>) {
        self.messages += batch.len();
        // The gateway subscribes at QoS 1, so the broker sends nothing at QoS 2.
        self.acks.extend(
            batch
                .drain(..)
                .filter(|i| i.publish.qos != rumqttc::QoS::AtMostOnce)
                .map(|i| i.publish.pkid),
        );
    }

    /// The turn is durable: acknowledge its messages and answer its forwarders.
    fn pay(self, acker: &mut Acker) {
        acker.ack(self.acks);
        for (reply, ack) in self.replies {
            let _ = reply.send(Ok(ack));
        }
    }
}

/// A turn handed to the committer, and where it says whether the turn was committed.
#[derive(Debug)]
pub(super) struct Job {
    pending: Pending,
    owed: Owed,
    done: tokio::sync::oneshot::Sender<Option<Owed>>,
}

/// Writes turns to the store on a thread of its own, one at a time and in order. The pipeline
/// task is free meanwhile: it serves forwarded records and window ticks, and the MQTT connection
/// fills the queue, without either waiting on the disk.
#[derive(Debug)]
pub(super) struct Committer {
    jobs: std::sync::mpsc::Sender<Job>,
    /// Closed once the thread has let go of the store.
    stopped: tokio::sync::oneshot::Receiver<()>,
}

impl Committer {
    fn start(store: Arc<Store>, failures: [Counter; 2], shutdown: CancellationToken) -> Self {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let (stopping, stopped) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("hubgate-commit".into())
            .spawn(move || {
                while let Ok(mut job) = queue.recv() {
                    let committed =
                        commit_until_done(&store, &mut job.pending, &failures, &shutdown);
                    let _ = job.done.send(committed.then_some(job.owed));
                }
                // The pipeline stopped. Its store, and with it the outbox, must be closed before
                // another start opens them (a policy reload).
                drop(store);
                drop(stopping);
            })
            .expect("the commit thread starts");
        Self { jobs, stopped }
    }

    /// Stops the thread once it has written what it was given, and waits until it has let go
    /// of the store.
    async fn stop(self) {
        drop(self.jobs);
        let _ = self.stopped.await;
    }

    /// Hands a turn over; the receiver answers with what it owes once it is committed, or
    /// `None` when the gateway stopped first.
    fn commit(&self, pending: Pending, owed: Owed) -> tokio::sync::oneshot::Receiver<Option<Owed>> {
        let (done, answer) = tokio::sync::oneshot::channel();
        // The thread only stops when this sender is dropped; if it ever died, `answer` is
        // closed and the pipeline stops without acknowledging.
        let _ = self.jobs.send(Job {
            pending,
            owed,
            done,
        });
        answer
    }
}

/// How far apart commits start (`store.commit_interval` and `store.commit_interval_max`).
#[derive(Debug, Clone, Copy)]
pub struct Spacing {
    pub interval: Duration,
    pub max: Duration,
}

/// Messages a second taken in for each millisecond between commits, under load.
pub(super) const MESSAGES_PER_SECOND_PER_MS: f64 = 20_000.0;

/// Messages a commit waits for at moderate and low rates, for at most `max`: a commit costs a
/// fixed amount of CPU, fsync and wake-ups whatever it holds, so one per message at 1,000
/// messages a second costs several times what one per 8 messages does. Fewer than the broker
/// sends unacknowledged (mosquitto 20, EMQX 32): QoS 1 messages of a turn are acknowledged only
/// once it is committed, so a broker that sends at most 8 before it waits for acknowledgements
/// would hold each turn to a full `max`.
pub(super) const LOW_RATE_BATCH: f64 = 8.0;

impl Spacing {
    /// The time between the starts of two commits when messages come at `rate` a second, never
    /// less than `interval`: under load 1 ms per 20,000 a second, and at lower rates the time 8
    /// messages take to come; both within `max`. A commit costs a fixed amount of CPU and disk
    /// writes besides its records' share: under heavy load fewer, larger commits leave more of the
    /// machine to the readings themselves, and at moderate rates a commit per few messages instead
    /// of one per message. Below two messages per `max` it does not wait for more. A message that
    /// comes after a quiet spell is committed at once (the spacing counts from the last commit),
    /// so a reading waits at most `max` for others.
    pub fn at(&self, rate: f64) -> Duration {
        let load = Duration::from_secs_f64((rate / MESSAGES_PER_SECOND_PER_MS).max(0.0) / 1e3);
        // Waiting pays only where at least two messages come within `max`: below that (100 a
        // second and a 10 ms `max`) a commit would hold one message all the same, later.
        let batch = if rate * self.max.as_secs_f64() >= 2.0 {
            Duration::from_secs_f64((LOW_RATE_BATCH / rate).min(1.0))
        } else {
            Duration::ZERO
        };
        load.max(batch).min(self.max).max(self.interval)
    }
}

/// A rate of messages that forgets what came more than about [`RecentRate::MEMORY`] ago: the
/// messages and the time of each span between commits, decayed by their age.
#[derive(Debug, Default, Clone, Copy)]
struct RecentRate {
    messages: f64,
    seconds: f64,
}

impl RecentRate {
    /// How long a span counts, about (the decay's time constant).
    const MEMORY: f64 = 0.1;

    /// Adds `messages` that came over `seconds`, and returns the rate a second.
    fn add(&mut self, messages: usize, seconds: f64) -> f64 {
        let seconds = seconds.max(1e-6);
        let keep = (-seconds / Self::MEMORY).exp();
        self.messages = self.messages * keep + messages as f64;
        self.seconds = self.seconds * keep + seconds;
        self.messages / self.seconds
    }
}

/// Runs the pipeline until the queue closes or `shutdown`. `pushed` brings records other gateways
/// forward (see [`crate::sources::push`]). Fails only if the commit thread dies.
///
/// Turns are committed on a thread of their own ([`Committer`]); the messages that come while a
/// commit is written wait in the queue, and are the next turn. Commits start at least
/// [`Spacing::at`] the rate of messages apart: what comes sooner waits for the next.
pub async fn run(
    mut pipeline: Pipeline,
    queue: mpsc::Receiver<Inbound>,
    pushed: mpsc::Receiver<PushJob>,
    acker: Acker,
    spacing: Spacing,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let committer = Committer::start(
        Arc::clone(&pipeline.store),
        pipeline.commit_failures.clone(),
        shutdown.clone(),
    );
    let result = take_turns(
        &mut pipeline,
        &committer,
        queue,
        pushed,
        acker,
        spacing,
        &shutdown,
    )
    .await;
    committer.stop().await;
    result
}

/// What became of a commit handed to the [`Committer`].
pub(super) fn answered(
    answer: Result<Option<Owed>, tokio::sync::oneshot::error::RecvError>,
) -> anyhow::Result<Option<Owed>> {
    answer.map_err(|_| anyhow::anyhow!("the outbox commit thread stopped"))
}

/// The state of [`take_turns`] between two turns.
struct Turns<'p> {
    pipeline: &'p mut Pipeline,
    committer: &'p Committer,
    acker: Acker,
    spacing: Spacing,
    batch: Vec<Inbound>,
    /// What the turn being taken owes once it is durable.
    owed: Owed,
    /// The commit being written, if any.
    in_flight: Option<tokio::sync::oneshot::Receiver<Option<Owed>>>,
    last_commit: Option<tokio::time::Instant>,
    /// The time from the start of the last commit to the start of the next.
    commit_interval: Duration,
    /// The recent rate of messages.
    recent: RecentRate,
    /// Most record bytes a turn takes: a quarter of `store.max_bytes`, at most [`TURN_BYTES`].
    turn_bytes: u64,
}

impl Turns<'_> {
    /// How many more messages the turn takes.
    fn room(&self) -> usize {
        if self.pipeline.pending.record_bytes() < self.turn_bytes {
            TURN_MAX.saturating_sub(self.owed.messages)
        } else {
            0
        }
    }

    /// Processes the batch taken and adds its messages to what the turn owes.
    fn process_batch(&mut self) {
        self.pipeline.process(&self.batch, now_ms());
        self.acker.processed(&self.batch);
        self.owed.take(&mut self.batch);
    }

    /// The commit in flight was answered. `Ok(false)`: the gateway stopped with the turn
    /// uncommitted, so its messages are not acknowledged and the broker delivers them again
    /// after the restart (and the origin of forwarded records sends them again).
    fn answered(
        &mut self,
        answer: Result<Option<Owed>, tokio::sync::oneshot::error::RecvError>,
    ) -> anyhow::Result<bool> {
        self.in_flight = None;
        match answered(answer)? {
            Some(paid) => {
                self.pipeline.committed();
                paid.pay(&mut self.acker);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Whether a commit is being written or the interval since the last one still runs.
    fn waiting(&self) -> bool {
        self.in_flight.is_some()
            || self
                .last_commit
                .is_some_and(|t| tokio::time::Instant::now() < t + self.commit_interval)
    }

    /// Takes what came while the last commit was written or the interval ran into this turn.
    async fn take_what_waits(&mut self, queue: &mut mpsc::Receiver<Inbound>) {
        loop {
            let take = self.room().min(BATCH);
            while self.batch.len() < take
                && let Ok(inbound) = queue.try_recv()
            {
                self.batch.push(inbound);
            }
            if self.batch.is_empty() {
                return;
            }
            self.process_batch();
            // Others on this worker go on between batches.
            tokio::task::yield_now().await;
        }
    }

    /// Hands the turn to the committer, or pays what it owes at once when it has nothing to
    /// write and nothing is being written.
    fn commit_or_pay(&mut self) {
        let now = now_ms();
        if self.pipeline.wants_commit(now) {
            let start = tokio::time::Instant::now();
            // The rate messages came at over the last commits, each weighed by how recent it is:
            // one burst does not stretch the spacing, a steady rate does.
            let rate = self.last_commit.map_or(0.0, |t| {
                self.recent
                    .add(self.owed.messages, (start - t).as_secs_f64())
            });
            self.commit_interval = self.spacing.at(rate);
            let turn = self.pipeline.take_turn(now);
            self.in_flight = Some(self.committer.commit(turn, std::mem::take(&mut self.owed)));
            self.last_commit = Some(start);
        } else if !self.owed.is_empty() {
            std::mem::take(&mut self.owed).pay(&mut self.acker);
        }
    }

    /// After a stop: the commit being written, then what the last turn took and the windows
    /// that changed, so a stop or a reload loses none of them.
    async fn finish(mut self) -> anyhow::Result<()> {
        if let Some(answer) = self.in_flight.take() {
            match answered(answer.await)? {
                Some(paid) => paid.pay(&mut self.acker),
                None => return Ok(()),
            }
        }
        self.pipeline.checkpoint_all_windows();
        if self.pipeline.wants_commit(now_ms()) || !self.owed.is_empty() {
            let turn = self.pipeline.take_turn(now_ms());
            let answer = self.committer.commit(turn, self.owed);
            if let Some(paid) = answered(answer.await)? {
                paid.pay(&mut self.acker);
            }
        }
        self.acker.flush();
        Ok(())
    }
}

/// The loop of [`run`].
pub(super) async fn take_turns(
    pipeline: &mut Pipeline,
    committer: &Committer,
    mut queue: mpsc::Receiver<Inbound>,
    mut pushed: mpsc::Receiver<PushJob>,
    acker: Acker,
    spacing: Spacing,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let turn_bytes = (pipeline.store.max_bytes() / 4).min(TURN_BYTES);
    let mut t = Turns {
        pipeline,
        committer,
        acker,
        spacing,
        batch: Vec::with_capacity(BATCH),
        owed: Owed::default(),
        in_flight: None,
        last_commit: None,
        commit_interval: spacing.interval,
        recent: RecentRate::default(),
        turn_bytes,
    };
    loop {
        // Acks waiting for room in the request channel: come back soon even if idle.
        let acks_waiting = t.acker.flush();
        let now = tokio::time::Instant::now();
        // When the next commit may start, if not yet.
        let next_commit = t
            .last_commit
            .map(|l| l + t.commit_interval)
            .filter(|&l| now < l);
        // The turn has something to commit, and nothing is being written.
        let due =
            t.in_flight.is_none() && (!t.owed.is_empty() || t.pipeline.wants_commit(now_ms()));
        // While a commit is written or the interval runs, the messages that come stay in the
        // queue, to be taken all at once: one wake-up per commit, not per message.
        let collecting = t.in_flight.is_some() || (due && next_commit.is_some());
        let take = t.room().min(BATCH);
        tokio::select! {
            n = queue.recv_many(&mut t.batch, take), if !collecting && take > 0 => {
                if n == 0 {
                    break;
                }
                t.process_batch();
            }
            Some(job) = pushed.recv(), if take > 0 => match t.pipeline.accept_push(&job, now_ms()) {
                Ok(ack) => t.owed.replies.push((job.reply, ack)),
                Err(PushRefused::Invalid(status)) => {
                    let _ = job.reply.send(Err(status));
                }
                Err(PushRefused::Store(err)) => tracing::error!(%err, "cannot accept forwarded records"),
            },
            answer = async { t.in_flight.as_mut().expect("a commit in flight").await }, if t.in_flight.is_some() => {
                if !t.answered(answer)? {
                    return Ok(());
                }
            }
            _ = tick.tick() => t.pipeline.tick(now_ms()),
            // At once when the interval has run.
            () = tokio::time::sleep_until(next_commit.unwrap_or(now)), if due => {}
            () = tokio::time::sleep(Duration::from_millis(5)), if acks_waiting => continue,
            () = shutdown.cancelled() => break,
        }
        if t.waiting() {
            continue;
        }
        t.take_what_waits(&mut queue).await;
        t.commit_or_pay();
    }
    t.finish().await
}

/// Which commit-failure counter an error counts in.
pub(super) fn failure_reason(err: &CommitError) -> usize {
    usize::from(matches!(err, CommitError::Full { .. }))
}

/// Commits `pending`, retrying with backoff (10 ms doubling to 1 s) until it succeeds. Returns false
/// when `shutdown` comes first (a single attempt is made once it has).
pub(super) fn commit_until_done(
    store: &Store,
    pending: &mut Pending,
    failures: &[Counter; 2],
    shutdown: &CancellationToken,
) -> bool {
    let mut wait = Duration::from_millis(10);
    let mut attempts = 0u32;
    let since = now_ms();
    loop {
        match store.commit(pending, now_ms()) {
            Ok(()) => {
                if attempts > 0 {
                    tracing::info!(
                        failures = attempts,
                        "outbox commit succeeded after retrying"
                    );
                    store.commits_recovered(attempts, since);
                }
                return true;
            }
            Err(err) => {
                failures[failure_reason(&err)].increment(1);
                store.commits_failing(&err.to_string());
                // Logged on the first failure, then every 30th, so a long outage does not flood.
                if attempts.is_multiple_of(30) {
                    tracing::warn!(%err, failures = attempts, "outbox commit failed: retrying; messages stay unacknowledged");
                }
                attempts += 1;
            }
        }
        let until = std::time::Instant::now() + wait;
        while std::time::Instant::now() < until {
            if shutdown.is_cancelled() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10).min(wait));
        }
        wait = (wait * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod spacing_tests {
    use super::*;

    #[test]
    fn commits_wait_for_a_few_messages_at_low_rates_and_grow_under_load() {
        let spacing = Spacing {
            interval: Duration::from_millis(1),
            max: Duration::from_millis(10),
        };
        let ms = |rate: f64| spacing.at(rate).as_secs_f64() * 1e3;
        // At 1,000 a second, 8 messages take 8 ms; at 200 a second the wait stops at 10 ms; at
        // 100 a second a commit would hold one message however long it waited: no wait.
        assert!((ms(1_000.0) - 8.0).abs() < 1e-9);
        assert!((ms(200.0) - 10.0).abs() < 1e-9);
        assert!((ms(100.0) - 1.0).abs() < 1e-9);
        // At 4,000 a second 8 messages take 2 ms; at 10,000 the interval's 1 ms.
        assert!((ms(4_000.0) - 2.0).abs() < 1e-9);
        assert!((ms(10_000.0) - 1.0).abs() < 1e-9);
        // Under load: 1 ms per 20,000 a second.
        assert!((ms(50_000.0) - 2.5).abs() < 1e-9);
        assert!((ms(1e9) - 10.0).abs() < 1e-9);
        // Before any rate is known, and never below the interval.
        assert!((ms(0.0) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn the_recent_rate_follows_a_steady_rate_and_smooths_a_burst() {
        let mut recent = RecentRate::default();
        let mut rate = 0.0;
        // 100 a second, one at a time, then three at once 2 ms after the last.
        for _ in 0..50 {
            rate = recent.add(1, 0.01);
        }
        assert!((rate - 100.0).abs() < 1e-6, "{rate}");
        let burst = recent.add(3, 0.002);
        assert!(
            burst < 200.0,
            "a burst alone does not make 200 a second: {burst}"
        );
        // A steady 1,000 a second, 8 at a time, is reached within half a second.
        for _ in 0..60 {
            rate = recent.add(8, 0.008);
        }
        assert!((rate - 1_000.0).abs() < 20.0, "{rate}");
    }
}
