//! Forwarding to an upstream hub: a gRPC client of another gateway's `Push`.
//!
//! One Push call carries every forwarded stream. For each stream the client keeps two positions:
//! the last sequence sent and the last the hub acknowledged. It sends batches of records from the
//! store (`batch` records per request) while fewer than `window` are unacknowledged, and the hub
//! answers each batch once it is durably kept. Delivery is at least once: after a broken call or a
//! restart the client sends again from the last acknowledged record, and the hub, which
//! identifies records by (origin, stream, sequence), keeps none twice.
//!
//! - The acknowledged position is a checkpoint in the outbox (`upstream/<stream>`), written at most
//!   twice a second, so a restart resends at most half a second of acknowledged records.
//! - While the hub is unreachable, the client retries with backoff (100 ms doubling up to
//!   `reconnect_backoff_max`) and the records wait in the outbox: the backlog is bounded by the
//!   outbox's size cap and retention, not by memory. Records purged before they were sent are
//!   counted as lost (`hubgate_upstream_records_lost_total`).
//! - New records are picked up within 50 ms.
//!
//! Errors are logged by kind, never with record content.
//!
//! Metrics: `hubgate_upstream_connected`, `hubgate_upstream_errors_total`,
//! `hubgate_upstream_records_sent_total{stream}`, `hubgate_upstream_records_acked_total{stream}`,
//! `hubgate_upstream_records_lost_total{stream}`, `hubgate_upstream_lag_records{stream}`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hubgate_exporters::catalogue;
use hubgate_privacy::Policy;
use hubgate_proto::v1;
use hubgate_proto::v1::gateway_client::GatewayClient;
use metrics::{Counter, Gauge};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::config::UpstreamConfig;
use crate::store::Store;

/// First wait before reconnecting.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// How often the acknowledged positions are written.
const SAVE_EVERY: Duration = Duration::from_millis(500);
/// How long the client waits for acks or new records before looking again.
const POLL: Duration = Duration::from_millis(50);

/// One forwarded stream.
struct Forwarded {
    index: usize,
    name: String,
    /// Last sequence sent on the current call.
    sent: u64,
    /// Last sequence the hub acknowledged (or that was lost before it could be sent).
    acked: u64,
    /// Last acknowledged sequence written to the checkpoint.
    saved: u64,
    sent_total: Counter,
    acked_total: Counter,
    lost: Counter,
    lag: Gauge,
}

fn checkpoint_name(stream: &str) -> String {
    format!("upstream/{stream}")
}

/// Why a call ended.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("the hub refused or broke the call: {}", .0.code())]
    Status(#[from] tonic::Status),
    #[error("the hub closed the call")]
    Closed,
}

/// Forwards the configured streams until `shutdown`.
pub async fn run(
    config: UpstreamConfig,
    policy: Arc<Policy>,
    store: Arc<Store>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut streams = Vec::new();
    for (index, s) in policy.streams().iter().enumerate() {
        if config
            .streams
            .as_ref()
            .is_some_and(|names| !names.contains(&s.name))
        {
            continue;
        }
        let acked = store
            .checkpoint(&checkpoint_name(&s.name))?
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(0, u64::from_be_bytes);
        let name = s.name.clone();
        streams.push(Forwarded {
            index,
            sent: acked,
            acked,
            saved: acked,
            sent_total: metrics::counter!(catalogue::UPSTREAM_RECORDS_SENT, "stream" => name.clone()),
            acked_total: metrics::counter!(catalogue::UPSTREAM_RECORDS_ACKED, "stream" => name.clone()),
            lost: metrics::counter!(catalogue::UPSTREAM_RECORDS_LOST, "stream" => name.clone()),
            lag: metrics::gauge!(catalogue::UPSTREAM_LAG, "stream" => name.clone()),
            name,
        });
    }
    let connected = metrics::gauge!(catalogue::UPSTREAM_CONNECTED);
    let errors = metrics::counter!(catalogue::UPSTREAM_ERRORS);
    tracing::info!(endpoint = %config.endpoint, streams = streams.len(), "forwarding to the upstream hub");
    let mut backoff = BACKOFF_START;
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        let progress_before: u64 = streams.iter().map(|s| s.acked).sum();
        let outcome = call(&config, &store, &mut streams, &connected, &shutdown).await;
        connected.set(0.0);
        save(&store, &mut streams).await;
        let Err(err) = outcome else {
            break;
        };
        errors.increment(1);
        if streams.iter().map(|s| s.acked).sum::<u64>() > progress_before {
            (backoff, failures) = (BACKOFF_START, 0);
        }
        // Logged on the first failure of an outage, then every 20th.
        if failures.is_multiple_of(20) {
            tracing::warn!(%err, retry_in = ?backoff, "upstream hub unavailable; records wait in the outbox");
        }
        failures += 1;
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(config.reconnect_backoff_max);
    }
    save(&store, &mut streams).await;
    Ok(())
}

/// Writes the acknowledged positions that moved.
async fn save(store: &Arc<Store>, streams: &mut [Forwarded]) {
    for s in streams.iter_mut().filter(|s| s.acked != s.saved) {
        let (store, name, acked) = (Arc::clone(store), checkpoint_name(&s.name), s.acked);
        let saved = tokio::task::spawn_blocking(move || {
            store.save_checkpoint(&name, acked.to_be_bytes().to_vec())
        })
        .await;
        match saved {
            Ok(Ok(())) => s.saved = acked,
            Ok(Err(err)) => {
                tracing::error!(stream = %s.name, %err, "cannot save the upstream position");
            }
            Err(_) => return,
        }
    }
}

/// One Push call: sends and collects acks until the call breaks or `shutdown`.
async fn call(
    config: &UpstreamConfig,
    store: &Arc<Store>,
    streams: &mut [Forwarded],
    connected: &Gauge,
    shutdown: &CancellationToken,
) -> Result<(), CallError> {
    let mut client = GatewayClient::connect(config.endpoint.clone()).await?;
    let (tx, rx) = mpsc::channel(4);
    let mut acks = client.push(ReceiverStream::new(rx)).await?.into_inner();
    connected.set(1.0);
    for s in streams.iter_mut() {
        s.sent = s.acked;
    }
    let mut last_save = Instant::now();
    loop {
        for s in streams.iter_mut() {
            while s.sent.saturating_sub(s.acked) < config.window {
                let Some(batch) = store.read_async(s.index, s.sent + 1, config.batch).await else {
                    return Ok(());
                };
                if let Some((first, last)) = batch.gap {
                    s.lost.increment(last - first + 1);
                    tracing::warn!(stream = %s.name, first, last, "records purged before they were sent upstream");
                    if s.sent == s.acked {
                        s.acked = last;
                    }
                    s.sent = last;
                }
                let Some(newest) = batch.records.last().map(|r| r.record.sequence) else {
                    break;
                };
                let records: Vec<v1::Record> =
                    batch.records.iter().map(|r| r.record.clone()).collect();
                let count = records.len() as u64;
                let request = v1::PushRequest {
                    origin: config.origin.clone(),
                    stream: s.name.clone(),
                    records,
                };
                // Never wait to send: acks must keep being read, or both sides would wait on
                // each other. A full channel is tried again on the next turn.
                match tx.try_send(request) {
                    Ok(()) => {
                        s.sent_total.increment(count);
                        s.sent = newest;
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => break,
                    Err(mpsc::error::TrySendError::Closed(_)) => return Err(CallError::Closed),
                }
            }
            s.lag
                .set(store.next_sequence(s.index).saturating_sub(1 + s.acked) as f64);
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            message = acks.message() => {
                let ack = message?.ok_or(CallError::Closed)?;
                if let Some(s) = streams.iter_mut().find(|s| s.name == ack.stream)
                    && ack.sequence > s.acked
                {
                    s.acked_total.increment(ack.sequence - s.acked);
                    s.acked = ack.sequence;
                    // The hub may hold more than this call sent (it kept records an earlier call
                    // sent after the last saved position): those need not be sent again.
                    s.sent = s.sent.max(ack.sequence);
                }
            }
            () = tokio::time::sleep(POLL) => {}
        }
        if last_save.elapsed() >= SAVE_EVERY {
            save(store, streams).await;
            last_save = Instant::now();
        }
    }
}
