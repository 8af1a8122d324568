//! Forwarding to an upstream hub: a gRPC client of another gateway's `Push`.
//!
//! Each forwarded stream has a Push call of its own (one HTTP/2 connection carries them all), so a
//! stream the hub refuses holds up no other. For each stream the client keeps two positions: the
//! last sequence sent and the last the hub acknowledged. It sends batches of records from the store
//! (`batch` records per request) while fewer than `window` are unacknowledged, and the hub answers
//! each batch once it is durably kept. Delivery is at least once: after a broken call or a restart
//! the client sends again from the last acknowledged record, and the hub, which identifies records
//! by (origin, incarnation, stream, sequence), keeps none twice. The incarnation is a random id
//! made with this gateway's outbox (checkpoint `upstream/incarnation`): a gateway that starts over
//! with an empty data directory gets a new one, so its new sequence numbers are not taken for
//! records the hub already has.
//!
//! An acknowledgement beyond the last record this gateway ever kept is a protocol error: the call
//! is dropped and retried, and the position does not move.
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
use tonic::transport::ClientTlsConfig;

use crate::config::UpstreamConfig;
use crate::sinks::position::{Backoff, Position, SAVE_EVERY};
use crate::store::Store;

/// Settings every stream's call shares.
struct Shared {
    config: UpstreamConfig,
    incarnation: String,
    store: Arc<Store>,
    channel: tonic::transport::Channel,
    connected: Gauge,
    errors: Counter,
    /// `Bearer <token>` for the hub, if it wants one.
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

/// How long the client waits for acks or new records before looking again.
const POLL: Duration = Duration::from_millis(50);

/// One forwarded stream.
struct Forwarded {
    index: usize,
    name: String,
    /// Last sequence sent on the current call.
    sent: u64,
    /// Last sequence the hub acknowledged (or that was lost before it could be sent).
    position: Position,
    sent_total: Counter,
    sent_bytes: Counter,
    acked_total: Counter,
    lost: Counter,
    lag: Gauge,
    /// The policy hashes whose documents the current call announced.
    announced: std::collections::HashSet<String>,
}

fn checkpoint_name(stream: &str) -> String {
    format!("upstream/{stream}")
}

/// Why a call ended.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("the hub refused or broke the call: {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("the hub closed the call")]
    Closed,
    #[error("the hub acknowledged sequence {0}, beyond the last record kept here")]
    Protocol(u64),
}

/// This gateway's incarnation: made, and saved, with the first start of an exporter (upstream or
/// NATS), which all use it.
pub fn incarnation(store: &Store) -> anyhow::Result<String> {
    const NAME: &str = "upstream/incarnation";
    if let Some(id) = store.checkpoint(NAME)? {
        return Ok(String::from_utf8_lossy(&id).into_owned());
    }
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no random source: {e}"))?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    store.save_checkpoint(NAME, id.clone().into_bytes())?;
    Ok(id)
}

/// How this gateway proves itself to the hub, and checks the hub.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// `Bearer <token>`, if the hub wants a token.
    pub authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    /// TLS for an `https://` endpoint.
    pub tls: Option<ClientTlsConfig>,
}

/// Forwards the configured streams until `shutdown`, with `credentials`.
pub async fn run(
    config: UpstreamConfig,
    credentials: Credentials,
    incarnation: String,
    policy: Arc<Policy>,
    store: Arc<Store>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(config.endpoint.clone())?
        .connect_timeout(Duration::from_secs(10));
    if let Some(tls) = credentials.tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint.connect_lazy();
    let authorization = credentials.authorization;
    let shared = Arc::new(Shared {
        incarnation,
        connected: metrics::gauge!(catalogue::UPSTREAM_CONNECTED),
        errors: metrics::counter!(catalogue::UPSTREAM_ERRORS),
        store,
        channel,
        config,
        authorization,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (index, s) in policy.streams().iter().enumerate() {
        let forwarded = shared
            .config
            .streams
            .as_ref()
            .is_none_or(|names| names.contains(&s.name));
        if !forwarded {
            continue;
        }
        let position = Position::load(&shared.store, checkpoint_name(&s.name))?;
        let name = s.name.clone();
        let stream = Forwarded {
            index,
            sent: position.acked,
            position,
            sent_total: metrics::counter!(catalogue::UPSTREAM_RECORDS_SENT, "stream" => name.clone()),
            sent_bytes: metrics::counter!(catalogue::UPSTREAM_SENT_BYTES, "stream" => name.clone()),
            acked_total: metrics::counter!(catalogue::UPSTREAM_RECORDS_ACKED, "stream" => name.clone()),
            lost: metrics::counter!(catalogue::UPSTREAM_RECORDS_LOST, "stream" => name.clone()),
            lag: metrics::gauge!(catalogue::UPSTREAM_LAG, "stream" => name.clone()),
            announced: std::collections::HashSet::new(),
            name,
        };
        tasks.spawn(forward(Arc::clone(&shared), stream, shutdown.clone()));
    }
    tracing::info!(endpoint = %crate::config::redacted(&shared.config.endpoint), streams = tasks.len(), "forwarding to the upstream hub");
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Forwards one stream until `shutdown`, reconnecting with backoff.
async fn forward(shared: Arc<Shared>, mut s: Forwarded, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(shared.config.reconnect_backoff_max);
    while !shutdown.is_cancelled() {
        let acked_before = s.position.acked;
        let outcome = call(&shared, &mut s, &shutdown).await;
        s.position.save(&shared.store).await;
        let Err(err) = outcome else {
            break;
        };
        shared.errors.increment(1);
        if s.position.acked > acked_before {
            backoff.progressed();
        }
        let retry = backoff.wait(&shutdown, |retry_in| {
            tracing::warn!(stream = %s.name, %err, ?retry_in, "upstream hub unavailable; records wait in the outbox");
        });
        if !retry.await {
            break;
        }
    }
    s.position.save(&shared.store).await;
}

/// One Push call for one stream: sends and collects acks until the call breaks or `shutdown`.
async fn call(
    shared: &Shared,
    s: &mut Forwarded,
    shutdown: &CancellationToken,
) -> Result<(), CallError> {
    let store = &shared.store;
    let mut client = GatewayClient::new(shared.channel.clone());
    let (tx, rx) = mpsc::channel(4);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(value) = &shared.authorization {
        request
            .metadata_mut()
            .insert("authorization", value.clone());
    }
    let mut acks = client.push(request).await?.into_inner();
    shared.connected.increment(1.0);
    let _closed = on_close(&shared.connected);
    s.sent = s.position.acked;
    s.announced.clear();
    let mut last_save = Instant::now();
    loop {
        if !send_window(shared, s, &tx).await? {
            return Ok(());
        }
        let kept = store.next_sequence(s.index).saturating_sub(1);
        s.lag.set(kept.saturating_sub(s.position.acked) as f64);
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            message = acks.message() => {
                let ack = message?.ok_or(CallError::Closed)?;
                if ack.sequence > kept {
                    return Err(CallError::Protocol(ack.sequence));
                }
                if ack.sequence > s.position.acked {
                    s.acked_total.increment(ack.sequence - s.position.acked);
                    s.position.acked = ack.sequence;
                    // The hub may hold more than this call sent (records an earlier call sent
                    // after the last saved position): those need not be sent again.
                    s.sent = s.sent.max(ack.sequence);
                }
            }
            () = tokio::time::sleep(POLL) => {}
        }
        if last_save.elapsed() >= SAVE_EVERY {
            s.position.save(store).await;
            last_save = Instant::now();
        }
    }
}

/// Sends what the window allows from the outbox, without ever waiting for room in the call: acks
/// must keep being read, or both sides would wait on each other (a full channel is tried again
/// on the next turn). False when the store is closing.
async fn send_window(
    shared: &Shared,
    s: &mut Forwarded,
    tx: &mpsc::Sender<v1::PushRequest>,
) -> Result<bool, CallError> {
    let (config, store) = (&shared.config, &shared.store);
    while s.sent.saturating_sub(s.position.acked) < config.window {
        let Some(batch) = store.read_async(s.index, s.sent + 1, config.batch).await else {
            return Ok(false);
        };
        if let Some((first, last)) = batch.gap {
            s.lost.increment(last - first + 1);
            tracing::warn!(stream = %s.name, first, last, "records purged before they were sent upstream");
            if s.sent == s.position.acked {
                s.position.acked = last;
            }
            s.sent = last;
        }
        let Some(newest) = batch.records.last().map(|r| r.sequence) else {
            break;
        };
        let records: Vec<v1::Record> = batch
            .records
            .iter()
            .filter_map(|r| r.record().ok())
            .collect();
        // Never so: records are checked as they are read back.
        let undecodable = batch.records.len() - records.len();
        if undecodable > 0 {
            s.lost.increment(undecodable as u64);
            tracing::error!(stream = %s.name, undecodable, "stored records that do not decode are not sent upstream");
        }
        let count = records.len() as u64;
        let policies = announce(store, &mut s.announced, &records, &s.name);
        let request = v1::PushRequest {
            origin: config.origin.clone(),
            incarnation: shared.incarnation.clone(),
            stream: s.name.clone(),
            records,
            policies,
        };
        let bytes = prost::Message::encoded_len(&request) as u64;
        match tx.try_send(request) {
            Ok(()) => {
                s.sent_total.increment(count);
                s.sent_bytes.increment(bytes);
                crate::telemetry::stats::TRAFFIC
                    .upstream_sent
                    .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                s.sent = newest;
            }
            Err(mpsc::error::TrySendError::Full(_)) => break,
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(CallError::Closed),
        }
    }
    Ok(true)
}

/// The canonical documents of the policies `records` carry that the call has not announced yet
/// (the hub accepts a record only under a policy whose document it was given, or its own). Each
/// document is kept in the outbox when its policy starts ([`policy_checkpoint`]); a record
/// whose policy's document is not there is sent without it, and the hub refuses it unless the
/// policy is its own.
fn announce(
    store: &Store,
    announced: &mut std::collections::HashSet<String>,
    records: &[v1::Record],
    stream: &str,
) -> Vec<String> {
    let mut documents = Vec::new();
    for r in records {
        if announced.contains(&r.policy_hash) {
            continue;
        }
        announced.insert(r.policy_hash.clone());
        match store.checkpoint(&policy_checkpoint(&r.policy_hash)) {
            Ok(Some(document)) => documents.push(String::from_utf8_lossy(&document).into_owned()),
            _ => {
                tracing::warn!(stream, policy_hash = %r.policy_hash, "the document of a record's policy is not in the outbox: the hub may refuse the record")
            }
        }
    }
    documents
}

/// The outbox checkpoint that holds the canonical document of the policy with this hash.
pub fn policy_checkpoint(hash: &str) -> String {
    format!("policy/{hash}")
}

/// Counts a call out of the open-calls gauge when it ends, however it ends.
fn on_close(gauge: &Gauge) -> impl Drop + '_ {
    struct Closed<'a>(&'a Gauge);
    impl Drop for Closed<'_> {
        fn drop(&mut self) {
            self.0.decrement(1.0);
        }
    }
    Closed(gauge)
}
