//! Publishing to NATS JetStream: the filtered streams, for city-wide fan-out and retention.
//!
//! Each published stream `s` goes to the subject `<subject_prefix>.s`, one message per record: the
//! record in protobuf (`hubgate.v1.Record`, the same message Subscribe sends), or with
//! `payload = "ngsi_ld"` as an NGSI-LD entity in JSON ([`crate::sinks::ngsi_ld`]), with headers
//!
//! - `Nats-Msg-Id: <incarnation>-<stream>-<sequence>`, JetStream's de-duplication id;
//! - `Hubgate-Stream`, `Hubgate-Sequence`, `Hubgate-Type` (`hubgate.v1.Record` or `ngsi-ld`) and
//!   `Content-Type`.
//!
//! The privacy notice goes beside the records: the register's Smart Data Models `PrivacyObject`
//! entities ([`crate::governance::register::ngsi_ld`]), one JSON array, on
//! `<subject_prefix>.privacy-notice` (no stream can have that name), with `Hubgate-Type:
//! ngsi-ld-privacy-notice` and `Nats-Msg-Id: <incarnation>-privacy-notice-<policy hash>`, at each start and
//! reload, retried until JetStream stores it. A platform reads the latest message on that subject
//! to know what the hub's policy does to the records it publishes.
//!
//! Delivery is at least once, from the outbox. For each stream the exporter publishes records in
//! sequence order, with at most `window` awaiting their acknowledgement (JetStream acknowledges
//! a message once it is stored), and moves its position to each record acknowledged in turn. The
//! position is a checkpoint in the outbox (`nats/<stream>`), written at most twice a second, so
//! after a restart, a broken connection or a refused publish, the exporter publishes again from
//! the last acknowledged record. JetStream stores a record sent again once, as long as it comes
//! within the stream's duplicate window (`nats.duplicate_window`, 10 minutes when hubgate creates
//! the stream); consumers that need exactly once beyond that window de-duplicate on the message
//! id. The incarnation is the same random id the upstream forwarder uses (made with the outbox),
//! so ids never repeat across gateways or after a gateway starts over with an empty outbox.
//!
//! While the server is unreachable, records wait in the outbox (bounded by its size cap and
//! retention, not by memory); records purged before they were published are counted as lost.
//!
//! Metrics: `hubgate_nats_connected`, `hubgate_nats_errors_total`,
//! `hubgate_nats_records_published_total{stream}`, `hubgate_nats_records_acked_total{stream}`,
//! `hubgate_nats_records_duplicate_total{stream}`, `hubgate_nats_records_lost_total{stream}`,
//! `hubgate_nats_lag_records{stream}`, `hubgate_nats_sent_bytes_total{stream}`. Errors are logged by kind, never with record content.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishAckFuture};
use hubgate_exporters::catalogue;
use hubgate_privacy::Policy;
use metrics::{Counter, Gauge};
use tokio_util::sync::CancellationToken;

use crate::config::{NatsConfig, NatsPayload};
use crate::sinks::position::{Backoff, Position, SAVE_EVERY};
use crate::store::Store;

/// Longest wait for new records before looking again.
const POLL: Duration = Duration::from_millis(200);
/// Longest wait for JetStream's acknowledgement of a record.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Records read from the store at a time.
const READ_BATCH: usize = 256;

/// What the exporter authenticates with. The token is never shown by `Debug`.
#[derive(Clone, Default)]
pub struct Credentials {
    pub token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// One published stream.
struct Published {
    index: usize,
    name: String,
    subject: String,
    /// Last sequence JetStream acknowledged (or that was lost before it could be published).
    position: Position,
    published: Counter,
    acked_total: Counter,
    duplicates: Counter,
    lost: Counter,
    lag: Gauge,
    sent_bytes: Counter,
}

impl Published {
    fn new(index: usize, name: &str, subject_prefix: &str, position: Position) -> Self {
        let stream = name.to_owned();
        Self {
            index,
            subject: format!("{subject_prefix}.{name}"),
            position,
            published: metrics::counter!(catalogue::NATS_RECORDS_PUBLISHED, "stream" => stream.clone()),
            acked_total: metrics::counter!(catalogue::NATS_RECORDS_ACKED, "stream" => stream.clone()),
            duplicates: metrics::counter!(catalogue::NATS_RECORDS_DUPLICATE, "stream" => stream.clone()),
            lost: metrics::counter!(catalogue::NATS_RECORDS_LOST, "stream" => stream.clone()),
            lag: metrics::gauge!(catalogue::NATS_LAG, "stream" => stream.clone()),
            sent_bytes: metrics::counter!(catalogue::NATS_SENT_BYTES, "stream" => stream.clone()),
            name: stream,
        }
    }
}

/// Why publishing stopped.
#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("publish failed: {0}")]
    Publish(#[from] jetstream::context::PublishError),
    #[error("the store is closing")]
    Closing,
}

/// Publishes the configured streams until `shutdown`.
pub async fn run(
    config: NatsConfig,
    credentials: Credentials,
    incarnation: String,
    policy: Arc<Policy>,
    store: Arc<Store>,
    notice: String,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let connected = metrics::gauge!(catalogue::NATS_CONNECTED);
    let errors = metrics::counter!(catalogue::NATS_ERRORS);
    connected.set(0.0);
    let chosen: Vec<usize> = (0..policy.streams().len())
        .filter(|&i| {
            let name = &policy.streams()[i].name;
            config
                .streams
                .as_ref()
                .is_none_or(|names| names.contains(name))
        })
        .collect();
    // Every stream's window of unacknowledged publishes fits at once, so that no stream waits
    // for room held by acknowledgements another has yet to read.
    let in_flight = config.window * chosen.len().max(1) + 16;
    let Some(js) = connect(
        &config,
        &credentials,
        in_flight,
        &connected,
        &errors,
        &shutdown,
    )
    .await
    else {
        return Ok(());
    };
    let config = Arc::new(config);
    let incarnation: Arc<str> = incarnation.into();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(publish_notice(
        js.clone(),
        format!("{}.{NOTICE_SUBJECT}", config.subject_prefix),
        (
            notice,
            format!("{incarnation}-{NOTICE_SUBJECT}-{}", policy.hash_hex()),
        ),
        errors.clone(),
        shutdown.clone(),
    ));
    for index in chosen {
        let s = &policy.streams()[index];
        let position = Position::load(&store, checkpoint_name(&s.name))?;
        let stream = Published::new(index, &s.name, &config.subject_prefix, position);
        tasks.spawn(forward(
            js.clone(),
            Arc::clone(&config),
            Arc::clone(&incarnation),
            Arc::clone(&store),
            stream,
            errors.clone(),
            shutdown.clone(),
        ));
    }
    tracing::info!(url = %config.url, jetstream = %config.jetstream, streams = tasks.len() - 1, "publishing to NATS JetStream");
    while let Some(joined) = tasks.join_next().await {
        if let Err(err) = joined {
            tracing::error!(%err, "a NATS publishing task failed");
        }
    }
    connected.set(0.0);
    Ok(())
}

/// The last token of the privacy notice's subject; not a stream name, which has no '-'.
pub const NOTICE_SUBJECT: &str = "privacy-notice";

/// Publishes the privacy `notice` on `subject` under the de-duplication `id` (the gateway's
/// incarnation and the policy's hash: stored once per gateway and policy), retrying with backoff
/// until JetStream stores it or `shutdown`.
async fn publish_notice(
    js: jetstream::Context,
    subject: String,
    (notice, id): (String, String),
    errors: Counter,
    shutdown: CancellationToken,
) {
    let payload = bytes::Bytes::from(notice);
    let mut backoff = Duration::from_secs(1);
    loop {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        headers.insert("Hubgate-Type", "ngsi-ld-privacy-notice");
        headers.insert("Content-Type", "application/ld+json");
        let stored = async {
            js.publish_with_headers(subject.clone(), headers, payload.clone())
                .await?
                .await
                .map_err(anyhow::Error::from)
        };
        let err = tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = stored => match outcome {
                Ok(_) => return,
                Err(err) => err,
            },
        };
        errors.increment(1);
        tracing::warn!(%err, "the privacy notice could not be published to NATS; retrying");
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Connects, and makes sure the JetStream stream exists, before anything is published; once
/// connected, the client reconnects by itself. Retries with backoff; `None` on `shutdown`.
async fn connect(
    config: &NatsConfig,
    credentials: &Credentials,
    in_flight: usize,
    connected: &Gauge,
    errors: &Counter,
    shutdown: &CancellationToken,
) -> Option<jetstream::Context> {
    let mut backoff = Backoff::new(config.reconnect_backoff_max);
    loop {
        let attempt = async {
            let client = options(config, credentials, connected.clone())
                .connect(config.url.as_str())
                .await?;
            let js = jetstream::ContextBuilder::new()
                .timeout(ACK_TIMEOUT)
                .ack_timeout(ACK_TIMEOUT)
                .max_ack_inflight(in_flight)
                .build(client);
            tokio::time::timeout(ACK_TIMEOUT, ensure_stream(&js, config))
                .await
                .map_err(|_| anyhow::anyhow!("JetStream did not answer"))??;
            anyhow::Ok(js)
        };
        let err = tokio::select! {
            () = shutdown.cancelled() => return None,
            outcome = attempt => match outcome {
                Ok(js) => {
                    connected.set(1.0);
                    return Some(js);
                }
                Err(err) => err,
            },
        };
        errors.increment(1);
        let retry = backoff.wait(shutdown, |retry_in| {
            tracing::warn!(%err, ?retry_in, "NATS JetStream unavailable; records wait in the outbox");
        });
        if !retry.await {
            return None;
        }
    }
}

/// The connection settings: a name, the token, TLS, and the connected gauge kept by events.
fn options(
    config: &NatsConfig,
    credentials: &Credentials,
    connected: Gauge,
) -> async_nats::ConnectOptions {
    let mut options = async_nats::ConnectOptions::new()
        .name("hubgate")
        .connection_timeout(Duration::from_secs(10))
        .max_reconnects(None)
        .event_callback(move |event| {
            let gauge = connected.clone();
            async move {
                match event {
                    async_nats::Event::Connected => gauge.set(1.0),
                    async_nats::Event::Disconnected | async_nats::Event::Closed => gauge.set(0.0),
                    _ => {}
                }
            }
        });
    if let Some(token) = &credentials.token {
        options = options.token(token.clone());
    }
    if config.url.starts_with("tls://") {
        options = options.require_tls(true);
        if let Some(ca) = &config.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
    }
    options
}

/// Creates the JetStream stream when it is missing and hubgate may; otherwise checks it exists.
///
/// Several gateways may share one JetStream stream, each with its own subject prefix: a stream
/// that does not take `<subject_prefix>.>` yet gets it added when hubgate may change it, and is
/// an error otherwise.
async fn ensure_stream(js: &jetstream::Context, config: &NatsConfig) -> anyhow::Result<()> {
    let subjects = format!("{}.>", config.subject_prefix);
    let mut stream = if config.create_jetstream {
        js.get_or_create_stream(jetstream::stream::Config {
            name: config.jetstream.clone(),
            subjects: vec![subjects.clone()],
            duplicate_window: config.duplicate_window,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?
    } else {
        js.get_stream(&config.jetstream).await?
    };
    let info = stream.info().await?;
    if info
        .config
        .subjects
        .iter()
        .any(|filter| covers(filter, &config.subject_prefix))
    {
        return Ok(());
    }
    if !config.create_jetstream {
        anyhow::bail!(
            "the JetStream stream {} does not take the subjects {subjects}",
            config.jetstream
        );
    }
    let mut updated = info.config.clone();
    updated.subjects.push(subjects);
    js.update_stream(updated).await?;
    Ok(())
}

/// Whether the subject filter `filter` takes every subject under `prefix` (`<prefix>.>`).
fn covers(filter: &str, prefix: &str) -> bool {
    let mut tokens = filter.split('.');
    for part in prefix.split('.') {
        match tokens.next() {
            Some(">") => return true,
            Some("*") => {}
            Some(token) if token == part => {}
            _ => return false,
        }
    }
    tokens.next() == Some(">") && tokens.next().is_none()
}

fn checkpoint_name(stream: &str) -> String {
    format!("nats/{stream}")
}

/// Publishes one stream until `shutdown`, starting again from the last acknowledged record after
/// each failure, with backoff.
async fn forward(
    js: jetstream::Context,
    config: Arc<NatsConfig>,
    incarnation: Arc<str>,
    store: Arc<Store>,
    mut s: Published,
    errors: Counter,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(config.reconnect_backoff_max);
    while !shutdown.is_cancelled() {
        let acked_before = s.position.acked;
        let outcome = publish(&js, &config, &incarnation, &store, &mut s, &shutdown).await;
        s.position.save(&store).await;
        let Err(err) = outcome else {
            break;
        };
        errors.increment(1);
        if s.position.acked > acked_before {
            backoff.progressed();
        }
        let retry = backoff.wait(&shutdown, |retry_in| {
            tracing::warn!(stream = %s.name, %err, ?retry_in, "NATS JetStream unavailable; records wait in the outbox");
        });
        if !retry.await {
            break;
        }
        // The stream may have lost this gateway's subjects meanwhile (gateways sharing it that
        // changed it at once, or an operator): put them back before publishing again.
        if let Ok(Err(err)) = tokio::time::timeout(ACK_TIMEOUT, ensure_stream(&js, &config)).await {
            tracing::warn!(stream = %s.name, %err, "the JetStream stream cannot take this gateway's subjects");
        }
    }
    s.position.save(&store).await;
}

/// Waits for the oldest publish's acknowledgement, or, with none pending, for the stream to
/// grow (or a short while). False on `shutdown`.
async fn settle_one(
    pending: &mut VecDeque<(u64, PublishAckFuture)>,
    s: &mut Published,
    grown: &mut tokio::sync::watch::Receiver<u64>,
    shutdown: &CancellationToken,
) -> Result<bool, PublishError> {
    if let Some((sequence, ack)) = pending.pop_front() {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(false),
            ack = ack => {
                if ack?.duplicate {
                    s.duplicates.increment(1);
                }
                s.acked_total.increment(1);
                s.position.acked = sequence;
            }
        }
    } else {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(false),
            _ = grown.changed() => {}
            () = tokio::time::sleep(POLL) => {}
        }
    }
    Ok(true)
}

/// The NATS message of a stored record: its headers and payload (the record itself, or its
/// NGSI-LD entity). `None` when the record does not decode.
fn message(
    stored: &crate::store::Stored,
    config: &NatsConfig,
    incarnation: &str,
    stream: &str,
) -> Option<(async_nats::HeaderMap, bytes::Bytes)> {
    let sequence = stored.sequence;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("{incarnation}-{stream}-{sequence}").as_str(),
    );
    headers.insert("Hubgate-Stream", stream);
    headers.insert("Hubgate-Sequence", sequence.to_string().as_str());
    let payload = match config.payload {
        NatsPayload::Protobuf => {
            headers.insert("Hubgate-Type", "hubgate.v1.Record");
            headers.insert("Content-Type", "application/x-protobuf");
            stored.bytes.clone()
        }
        NatsPayload::NgsiLd => {
            headers.insert("Hubgate-Type", "ngsi-ld");
            headers.insert("Content-Type", "application/ld+json");
            let record = stored.record().ok()?;
            serde_json::to_vec(&crate::sinks::ngsi_ld::entity(&record, incarnation))
                .unwrap_or_default()
                .into()
        }
    };
    Some((headers, payload))
}

/// Publishes from the last acknowledged record on, until an error or `shutdown`.
async fn publish(
    js: &jetstream::Context,
    config: &NatsConfig,
    incarnation: &str,
    store: &Arc<Store>,
    s: &mut Published,
    shutdown: &CancellationToken,
) -> Result<(), PublishError> {
    let mut pending: VecDeque<(u64, PublishAckFuture)> = VecDeque::new();
    let mut sent = s.position.acked;
    let mut last_save = Instant::now();
    let mut grown = store.watch(s.index);
    loop {
        while pending.len() < config.window {
            let max = READ_BATCH.min(config.window - pending.len());
            let batch = store
                .read_async(s.index, sent + 1, max)
                .await
                .ok_or(PublishError::Closing)?;
            if let Some((first, last)) = batch.gap {
                s.lost.increment(last - first + 1);
                tracing::warn!(stream = %s.name, first, last, "records purged before they were published to NATS");
                if pending.is_empty() {
                    s.position.acked = s.position.acked.max(last);
                }
                sent = last;
            }
            if batch.records.is_empty() {
                break;
            }
            for stored in &batch.records {
                let sequence = stored.sequence;
                let Some((headers, payload)) = message(stored, config, incarnation, &s.name) else {
                    // Never written so: records are checked as they are read back.
                    s.lost.increment(1);
                    tracing::error!(stream = %s.name, sequence, "a stored record does not decode: not published to NATS");
                    if pending.is_empty() {
                        s.position.acked = sequence;
                    }
                    sent = sequence;
                    continue;
                };
                let bytes = payload.len() as u64;
                let publish = js.publish_with_headers(s.subject.clone(), headers, payload);
                let ack = tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    ack = publish => ack?,
                };
                s.published.increment(1);
                s.sent_bytes.increment(bytes);
                crate::telemetry::stats::TRAFFIC
                    .nats_sent
                    .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                pending.push_back((sequence, ack));
                sent = sequence;
            }
        }
        let kept = store.next_sequence(s.index).saturating_sub(1);
        s.lag.set(kept.saturating_sub(s.position.acked) as f64);
        if !settle_one(&mut pending, s, &mut grown, shutdown).await? {
            return Ok(());
        }
        if last_save.elapsed() >= SAVE_EVERY {
            s.position.save(store).await;
            last_save = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::covers;

    #[test]
    fn a_stream_takes_a_prefix_when_its_filter_covers_everything_under_it() {
        for (filter, prefix) in [
            ("hubgate.>", "hubgate"),
            ("city.>", "city.district1"),
            ("city.*.>", "city.district1"),
            (">", "city.district1"),
        ] {
            assert!(covers(filter, prefix), "{filter} {prefix}");
        }
        for (filter, prefix) in [
            ("city.district2.>", "city.district1"),
            ("city.district1.*", "city.district1"),
            ("city.district1", "city.district1"),
            ("city.district1.air.>", "city.district1"),
        ] {
            assert!(!covers(filter, prefix), "{filter} {prefix}");
        }
    }
}
