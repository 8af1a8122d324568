//! MQTT ingest: one connection to the broker, subscribed at QoS 1 with a persistent session.
//!
//! - `clean_session = false`: while the gateway is away the broker keeps its subscriptions and
//!   queues QoS 1 messages for it; unacknowledged messages are delivered again after a reconnect.
//! - Manual acks: a message is acknowledged by the pipeline only after its record is kept (see
//!   [`crate::pipeline`]). This task writes the acks the pipeline hands it ([`Acker`]), and never
//!   waits on anything but the broker and the pipeline's bounded queue.
//! - The acks of one commit are written together, with one flush: rumqttc would write and flush
//!   each ack sent through its request channel with a system call of its own, and the broker
//!   would wake for each.
//! - Explicit settings instead of rumqttc's defaults: TCP_NODELAY on (Nagle's algorithm adds
//!   milliseconds of latency at every load), a maximum packet size from the config (rumqttc's
//!   default is 10 KiB), and a request channel large enough that acks rarely wait.
//! - After a connection loss the loop reconnects with exponential backoff (100 ms doubling up to
//!   `reconnect_backoff_max`) and subscribes again on every CONNACK. The backoff starts again only
//!   after a connection held for 10 s, so a link that drops right after CONNACK is not hammered.
//! - A packet over the read limit breaks the connection; [`super::oversized`] then acknowledges it
//!   unread, so one message cannot wedge the session.
//! - Bounded: when the pipeline's queue is full this task stops reading from the socket, so the
//!   broker holds messages (backpressure) and the gateway's memory does not grow.
//!
//! Connection errors are logged by kind only: rumqttc's error text can quote a whole packet.
//!
//! Metrics: `hubgate_mqtt_connected`, `hubgate_mqtt_connection_errors_total`,
//! `hubgate_mqtt_messages_acknowledged_total`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hubgate_exporters::catalogue;
use metrics::{Counter, Gauge};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet,
    PubAck, Publish, QoS, SubscribeFilter, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;
use crate::sources::oversized::{self, Session};
use rumqttc::tokio_rustls::rustls::ClientConfig;

/// The longest a write of acknowledgements may take before the connection counts as lost (as
/// rumqttc's own flushes, with the connection timeout of [`connect`]).
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// First wait before reconnecting.
const BACKOFF_START: Duration = Duration::from_millis(100);

/// A message from the broker, for the pipeline.
#[derive(Debug)]
pub struct Inbound {
    /// The message; its payload is emptied when it was oversized.
    pub publish: Publish,
    /// The payload's size as received.
    pub bytes: usize,
    /// The payload was larger than `mqtt.max_packet_bytes`: dropped on arrival and counted; the
    /// message is only acknowledged, in its turn.
    pub oversized: bool,
}

/// Hands acknowledgements from the pipeline to the MQTT connection without ever blocking.
///
/// The acks of a commit are queued here, in the order their messages arrived. The first is sent
/// through rumqttc's request channel, which wakes the event loop; once rumqttc has written it
/// ([`Event::Outgoing`]), the connection task writes the rest of the queue straight to the
/// connection, with one flush ([`run`]). The queue holds packet ids only, and never more than the
/// messages the gateway has taken in and not yet acknowledged.
#[derive(Debug)]
pub struct Acker {
    wake: Wake,
    queue: AckQueue,
    /// The payload bytes in flight, given back as the pipeline is done with each message.
    budget: Option<ByteBudget>,
}

/// The payload bytes in flight between the broker and the end of the privacy chain: what the
/// queue holds and what the turn is processing. The connection takes a message's bytes before
/// it queues it, and waits (stops reading from the broker) while the budget is spent; the
/// pipeline gives them back once it has processed the message. So memory is bounded in bytes
/// whatever the payload sizes, as the queue bounds it in messages.
#[derive(Debug, Clone)]
pub struct ByteBudget {
    bytes: Arc<tokio::sync::Semaphore>,
    max: usize,
}

impl ByteBudget {
    pub fn new(max: usize) -> Self {
        let max = max.clamp(1, u32::MAX as usize);
        Self {
            bytes: Arc::new(tokio::sync::Semaphore::new(max)),
            max,
        }
    }

    /// What `inbound` holds of the budget: its topic and payload, at most the whole budget.
    fn charge(&self, inbound: &Inbound) -> usize {
        (inbound.publish.topic.len() + inbound.publish.payload.len()).min(self.max)
    }

    /// Takes `inbound`'s bytes if they are free now.
    fn try_take(&self, inbound: &Inbound) -> bool {
        let n = u32::try_from(self.charge(inbound)).unwrap_or(u32::MAX);
        self.bytes
            .try_acquire_many(n)
            .map(tokio::sync::SemaphorePermit::forget)
            .is_ok()
    }

    /// Takes `inbound`'s bytes, waiting until they are free.
    async fn take(&self, inbound: &Inbound) {
        let n = u32::try_from(self.charge(inbound)).unwrap_or(u32::MAX);
        if let Ok(permit) = self.bytes.acquire_many(n).await {
            permit.forget();
        }
    }

    /// Gives back the bytes of messages the pipeline is done with.
    fn give_back(&self, done: &[Inbound]) {
        let n: usize = done.iter().map(|i| self.charge(i)).sum();
        self.bytes.add_permits(n);
    }
}

/// How the [`Acker`] wakes the connection with the first ack of a commit.
#[derive(Debug)]
enum Wake {
    /// Through rumqttc's request channel.
    Client(AsyncClient),
    /// Tests: noted here instead, for [`AckQueue::written`].
    #[cfg(test)]
    Noted(Arc<Mutex<Vec<u16>>>),
}

/// The acks waiting to be written, shared by the [`Acker`] and the connection task.
#[derive(Debug, Clone, Default)]
pub struct AckQueue(Arc<Mutex<Acks>>);

#[derive(Debug, Default)]
struct Acks {
    /// Packet ids to acknowledge, oldest first.
    pkids: VecDeque<u16>,
    /// An ack is in rumqttc's request channel: the rest wait until it is written, to keep order.
    waking: bool,
}

impl AckQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Acks> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves the acks ready to be written into `out`; `woken` says rumqttc has just written the
    /// ack that was in its channel.
    fn take(&self, woken: bool, out: &mut Vec<u16>) {
        let mut acks = self.lock();
        if woken {
            acks.waking = false;
        }
        if !acks.waking {
            out.extend(acks.pkids.drain(..));
        }
    }

    /// Tests: what a connection would write now, in order, after the ack that woke it (see
    /// [`Acker::noting`]).
    #[cfg(test)]
    pub(crate) fn written(&self, woke: &Mutex<Vec<u16>>) -> Vec<u16> {
        let mut out = std::mem::take(&mut *woke.lock().unwrap_or_else(PoisonError::into_inner));
        self.take(true, &mut out);
        out
    }

    /// The connection was lost: the broker delivers its unacknowledged messages again, and an
    /// ack meant for the old connection could acknowledge another message on the new one.
    fn clear(&self) {
        let mut acks = self.lock();
        acks.pkids.clear();
        acks.waking = false;
    }
}

impl Acker {
    pub fn new(client: AsyncClient, queue: AckQueue, budget: ByteBudget) -> Self {
        Self {
            wake: Wake::Client(client),
            queue,
            budget: Some(budget),
        }
    }

    /// The pipeline is done with these messages: their bytes return to the budget.
    pub fn processed(&self, done: &[Inbound]) {
        if let Some(budget) = &self.budget {
            budget.give_back(done);
        }
    }

    /// Tests: an acker without a connection, and where it notes the acks that would wake one
    /// (see [`AckQueue::written`]).
    #[cfg(test)]
    pub(crate) fn noting(queue: AckQueue) -> (Self, Arc<Mutex<Vec<u16>>>) {
        let woke = Arc::new(Mutex::new(Vec::new()));
        let acker = Self {
            wake: Wake::Noted(Arc::clone(&woke)),
            queue,
            budget: None,
        };
        (acker, woke)
    }

    /// Queues acks for the messages with these packet ids, in order, and wakes the connection.
    pub fn ack(&mut self, pkids: impl IntoIterator<Item = u16>) {
        self.queue.lock().pkids.extend(pkids);
        self.flush();
    }

    /// Wakes the connection if acks wait and nothing woke it yet. Returns true when acks wait
    /// and it could not be woken (rumqttc's request channel is full): call again soon.
    pub fn flush(&mut self) -> bool {
        let mut acks = self.queue.lock();
        let Some(&pkid) = acks.pkids.front() else {
            return false;
        };
        if acks.waking {
            return false;
        }
        let woken = match &self.wake {
            Wake::Client(client) => client
                .try_ack(&Publish {
                    dup: false,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    topic: String::new(),
                    pkid,
                    payload: bytes::Bytes::new(),
                })
                .is_ok(),
            #[cfg(test)]
            Wake::Noted(woke) => {
                woke.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(pkid);
                true
            }
        };
        if !woken {
            return true;
        }
        acks.pkids.pop_front();
        acks.waking = true;
        false
    }
}

/// Writes PUBACKs for `pkids` and flushes them, once; returns how many were written. Without a
/// connection (it was just lost) they are dropped: the broker delivers those messages again.
async fn write_acks(
    eventloop: &mut EventLoop,
    pkids: &[u16],
) -> Result<usize, rumqttc::StateError> {
    let Some(network) = eventloop.network.as_mut() else {
        return Ok(0);
    };
    for &pkid in pkids {
        network.write(Packet::PubAck(PubAck::new(pkid))).await?;
    }
    network.flush().await?;
    Ok(pkids.len())
}

/// How the gateway logs in to the broker: the password and the TLS settings, read from their files.
#[derive(Default, Clone)]
pub struct Login {
    pub password: Option<String>,
    pub tls: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Login {
    /// The gateway's session at the broker `config` names, for [`super::oversized::skip`].
    pub fn session(&self, config: &MqttConfig) -> Session {
        Session {
            host: config.host.clone(),
            port: config.port,
            client_id: config.client_id.clone(),
            username: config.username.clone(),
            password: self.password.clone(),
            tls: self.tls.clone(),
            keep_alive: config.keep_alive,
        }
    }
}

/// Creates the client and its event loop, with hubgate's settings and `login`.
pub fn connect(config: &MqttConfig, login: Login) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
    if let Some(user) = &config.username {
        options.set_credentials(user.clone(), login.password.unwrap_or_default());
    }
    if let Some(tls) = login.tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    }
    options
        .set_keep_alive(config.keep_alive)
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(config.read_limit(), config.max_packet_bytes);
    // Room for one ack per queued message and per message in flight, plus control requests.
    let capacity = config.queue_capacity + 1024;
    let (client, mut eventloop) = AsyncClient::new(options, capacity);
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(10);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// Describes a connection error without quoting any packet content.
fn describe(err: &ConnectionError) -> String {
    match err {
        ConnectionError::NotConnAck(_) => "broker sent another packet before CONNACK".into(),
        ConnectionError::MqttState(rumqttc::StateError::Deserialization(e)) => {
            format!("malformed packet from broker: {e}")
        }
        other => other.to_string(),
    }
}

/// What the connection task needs besides the client: what to subscribe to, the largest payload
/// taken in, and the longest wait between reconnects.
#[derive(Debug, Clone)]
pub struct Link {
    /// Topic filters, subscribed at QoS 1 on every CONNACK.
    pub subscriptions: Vec<String>,
    /// Payloads larger than this are emptied on arrival and counted.
    pub max_payload: usize,
    /// Packets larger than this cannot be read ([`MqttConfig::read_limit`]): they are skipped unread.
    pub read_limit: usize,
    pub backoff_max: Duration,
    /// The session, for skipping a packet over the read limit.
    pub session: Session,
    /// The payload bytes in flight (shared with the pipeline's [`Acker`]).
    pub budget: ByteBudget,
}

/// The connection's state and metrics, for the event loop of [`run`].
struct Connection {
    up: Gauge,
    errors: Counter,
    oversized: Counter,
    acknowledged: Counter,
    /// QoS 1 messages of this connection not yet acknowledged, and their gauge.
    unacked: u64,
    awaiting: Gauge,
    connected: watch::Sender<bool>,
    backoff: Duration,
    /// When the broker last accepted the connection.
    since: Option<Instant>,
    /// Whether the broker has accepted a connection of this process before: from then on it
    /// holds the gateway's session, and a CONNACK without it means the session was lost.
    had_session: bool,
    sessions_lost: Counter,
}

impl Connection {
    fn new(connected: watch::Sender<bool>) -> Self {
        let awaiting = metrics::gauge!(catalogue::MQTT_AWAITING_ACK);
        awaiting.set(0.0);
        Self {
            up: metrics::gauge!(catalogue::MQTT_CONNECTED),
            errors: metrics::counter!(catalogue::MQTT_CONNECTION_ERRORS),
            oversized: metrics::counter!(catalogue::MQTT_OVERSIZED),
            acknowledged: metrics::counter!(catalogue::MQTT_ACKNOWLEDGED),
            unacked: 0,
            awaiting,
            connected,
            backoff: BACKOFF_START,
            since: None,
            had_session: false,
            sessions_lost: metrics::counter!(catalogue::MQTT_SESSIONS_LOST),
        }
    }

    /// `n` acknowledgements were written.
    fn acked(&mut self, n: u64) {
        self.acknowledged.increment(n);
        self.unacked = self.unacked.saturating_sub(n);
        self.awaiting.set(self.unacked as f64);
    }

    /// The connection is lost: the broker delivers its unacknowledged messages again.
    fn lost(&mut self, acks: &AckQueue) {
        self.errors.increment(1);
        acks.clear();
        self.unacked = 0;
        self.awaiting.set(0.0);
        self.down();
    }

    fn down(&self) {
        self.up.set(0.0);
        self.connected.send_replace(false);
    }

    /// A message arrived: emptied when it is larger than `max_payload`, and counted.
    fn inbound(&mut self, mut publish: Publish, max_payload: usize) -> Inbound {
        if publish.qos != QoS::AtMostOnce {
            self.unacked += 1;
            self.awaiting.set(self.unacked as f64);
        }
        let bytes = publish.payload.len();
        let oversized = bytes > max_payload;
        if oversized {
            self.oversized.increment(1);
            drop(std::mem::take(&mut publish.payload));
        } else if bytes >= COPY_OUT_BYTES {
            // The payload is a slice of the client's read buffer and would keep all of it (room
            // for several packets) alive while it waits in the queue: a copy lets it go, so the
            // byte budget counts what is really held.
            publish.payload = bytes::Bytes::copy_from_slice(&publish.payload);
        }
        Inbound {
            publish,
            bytes,
            oversized,
        }
    }

    /// The broker accepted the connection: subscribe (again: harmless when the session survived
    /// and necessary when not).
    fn connack(
        &mut self,
        ack: &rumqttc::ConnAck,
        client: &AsyncClient,
        filters: &[SubscribeFilter],
    ) {
        tracing::info!(
            session_present = ack.session_present,
            "connected to MQTT broker"
        );
        if self.had_session && !ack.session_present {
            self.sessions_lost.increment(1);
            tracing::warn!(
                "the broker had lost the gateway's session: QoS 1 messages it held for the gateway \
                 may be lost (check the broker's persistence); subscribing again"
            );
        }
        self.had_session = true;
        // The backoff starts again only once a connection has held (see `wait`): a link that
        // drops right after CONNACK, every time, must not be retried at full speed.
        self.since = Some(Instant::now());
        self.up.set(1.0);
        self.connected.send_replace(true);
        if client.try_subscribe_many(filters.to_vec()).is_err() {
            tracing::error!("could not queue the MQTT subscription request");
        }
    }
}

impl Connection {
    /// The wait before the next connection attempt, and the one after it.
    fn wait(&mut self, max: Duration) -> Duration {
        if self.since.take().is_some_and(|t| t.elapsed() >= STABLE) {
            self.backoff = BACKOFF_START;
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(max.max(BACKOFF_START));
        wait
    }

    /// The connection failed on a packet larger than the read limit: acknowledge it unread.
    async fn skip_oversized(&mut self, link: &Link) {
        match oversized::skip(&link.session, link.read_limit, &link.subscriptions).await {
            Ok(skipped) => {
                for (bytes, filter) in skipped.messages {
                    self.oversized.increment(1);
                    tracing::warn!(
                        bytes,
                        subscription = filter.as_deref().unwrap_or("(none)"),
                        limit = link.read_limit,
                        "a message larger than the client can read was acknowledged unread and dropped; \
                         limit the broker's packet size (mosquitto: max_packet_size)"
                    );
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not skip a message larger than the client can read");
            }
        }
    }
}

/// Payloads at least this large are copied out of the client's read buffer on arrival.
const COPY_OUT_BYTES: usize = 4096;

/// A connection that lasted this long was not broken by what the broker sent first.
const STABLE: Duration = Duration::from_secs(10);

/// Whether the connection failed on a packet larger than the client reads.
fn too_large(err: &ConnectionError) -> bool {
    matches!(
        err,
        ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::Error::PayloadSizeLimitExceeded(_)
        ))
    )
}

/// Logs the subscriptions the broker refused.
fn suback(ack: &rumqttc::SubAck) {
    let refused = ack
        .return_codes
        .iter()
        .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
        .count();
    if refused > 0 {
        tracing::error!(
            refused,
            "the broker refused some topic subscriptions (check its ACL)"
        );
    }
}

/// Drives the connection until `shutdown`, sending every received PUBLISH to `queue`; payloads
/// larger than `link.max_payload` are emptied there and then, and counted.
///
/// `connected` tracks whether the broker connection is up (for `/readyz`). `acks` brings the
/// pipeline's acknowledgements ([`Acker`]).
pub async fn run(
    mut eventloop: EventLoop,
    client: AsyncClient,
    acks: AckQueue,
    link: Link,
    queue: mpsc::Sender<Inbound>,
    connected: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut conn = Connection::new(connected);
    let filters: Vec<SubscribeFilter> = link
        .subscriptions
        .iter()
        .map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce))
        .collect();
    let mut ready = Vec::new();
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => break,
            event = eventloop.poll() => event,
        };
        let woken = matches!(event, Ok(Event::Outgoing(Outgoing::PubAck(_))));
        if woken {
            conn.acked(1);
        }
        acks.take(woken, &mut ready);
        if !ready.is_empty() {
            let written = tokio::select! {
                () = shutdown.cancelled() => break,
                written = tokio::time::timeout(ACK_TIMEOUT, write_acks(&mut eventloop, &ready)) => written,
            };
            ready.clear();
            if let Ok(Ok(n)) = written {
                conn.acked(n as u64);
            } else {
                // As if the connection had failed in `poll`: the next poll connects again.
                tracing::warn!("MQTT connection lost while writing acknowledgements");
                eventloop.clean();
                conn.lost(&acks);
                continue;
            }
        }
        match event {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let inbound = conn.inbound(publish, link.max_payload);
                // Waits while the pipeline is busy, in bytes or in messages: that is the
                // backpressure.
                if !link.budget.try_take(&inbound) {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = link.budget.take(&inbound) => {}
                    }
                }
                if queue.send(inbound).await.is_err() {
                    break;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => conn.connack(&ack, &client, &filters),
            Ok(Event::Incoming(Packet::SubAck(ack))) => suback(&ack),
            Ok(_) => {}
            Err(err) => {
                conn.lost(&acks);
                let wait = conn.wait(link.backoff_max);
                tracing::warn!(error = %describe(&err), retry_in = ?wait, "MQTT connection lost");
                if too_large(&err) {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = conn.skip_oversized(&link) => {}
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    conn.down();
    disconnect(&mut eventloop, &client, &acks, &mut conn).await;
}

/// Writes the acks the pipeline handed over before it stopped, then disconnects. The session
/// stays on the broker; unacknowledged messages come back on the next start.
async fn disconnect(
    eventloop: &mut EventLoop,
    client: &AsyncClient,
    acks: &AckQueue,
    conn: &mut Connection,
) {
    let mut ready = Vec::new();
    acks.take(true, &mut ready);
    if let Ok(Ok(n)) = tokio::time::timeout(ACK_TIMEOUT, write_acks(eventloop, &ready)).await {
        conn.acknowledged.increment(n as u64);
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(event) = eventloop.poll().await {
            if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
}
