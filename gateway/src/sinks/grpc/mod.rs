//! The gRPC API (`hubgate.v1.Gateway`), with gRPC health checking and server reflection.
//!
//! Subscribe: one follower task per requested stream reads the store from its own cursor and
//! feeds a bounded channel that is the response stream. Records still in memory are read in
//! place; older ones come from the outbox on a blocking thread. A follower that catches up waits for the
//! store to grow; a client that reads slowly only fills its own channel, so it never blocks ingest
//! or other subscribers. Replay and live are the same loop over the same log, so there is no gap
//! and no duplicate where one becomes the other. Records are sent as the store holds them, encoded
//! once when they were kept ([`SubscribeCodec`]), whatever the number of subscribers.
//!
//! Push: one task per call reads the origin's requests, validates each and waits for the pipeline
//! to commit it before answering (see [`crate::sources::push`]); a slow commit slows only that origin.
//!
//! GetPolicy: the running policy (canonical JSON) and its transparency register (see
//! [`crate::governance::register`]).
//!
//! GetFootprint and WatchFootprint: the footprint meter's latest figures, and each new sample (see
//! [`crate::governance::footprint`]).
//!
//! Metrics: `hubgate_grpc_subscribers`, `hubgate_grpc_records_sent_total{stream}`,
//! `hubgate_grpc_sent_bytes_total{stream}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{BufMut, Bytes};
use hubgate_exporters::catalogue;
use hubgate_privacy::Policy;
pub mod auth;
pub mod places;

use hubgate_proto::v1::gateway_server::{Gateway, GatewayServer};
use hubgate_proto::v1::{self, start_position::Position, subscribe_response::Event};
use prost::Message as _;
use std::pin::Pin;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::NamedService;
use tonic::transport::ServerTlsConfig;
use tonic::{Request, Response, Status};

use crate::governance::register::Register;
use crate::sinks::guarded::{Bounds, Guarded, GuardedListener};
use crate::sources::push::{self, PushJob};
use crate::store::Store;
use auth::{Scope, Tokens};
use places::{Kind, Place, Places};

/// Records read from the store per turn of a follower.
const READ_BATCH: usize = 256;
/// Events buffered per subscriber before its followers wait for the client.
const SUBSCRIBER_BUFFER: usize = 1024;

/// The `Gateway` service.
#[derive(Debug, Clone)]
pub struct GatewayService {
    policy: Arc<Policy>,
    store: Arc<Store>,
    /// To the pipeline: records other gateways push.
    pushed: mpsc::Sender<PushJob>,
    /// The footprint meter's latest figures.
    footprint: watch::Receiver<v1::Footprint>,
    /// Who may call (see [`crate::sinks::grpc::auth`]).
    tokens: Arc<Tokens>,
    /// Subscribe and WatchFootprint calls open now, and the most allowed.
    subscribers: Places,
    /// Push calls (from origin gateways) open now, and the most allowed: apart from the
    /// subscribers, so that neither can crowd out the other.
    pushes: Places,
    /// Streams one Subscribe call may follow, at most.
    max_streams_per_subscription: usize,
    /// Whether Push is served when no tokens are configured.
    push_without_tokens: bool,
    published: Published,
    shutdown: CancellationToken,
}

impl GatewayService {
    pub fn new(
        policy: Arc<Policy>,
        store: Arc<Store>,
        pushed: mpsc::Sender<PushJob>,
        footprint: watch::Receiver<v1::Footprint>,
        access: Access,
        published: Published,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            policy,
            store,
            pushed,
            footprint,
            subscribers: Places::new(
                access.max_subscribers,
                catalogue::GRPC_SUBSCRIBERS,
                &access.tokens,
                Kind::Reading,
            ),
            pushes: Places::new(
                access.max_push_calls,
                catalogue::GRPC_PUSH_CALLS,
                &access.tokens,
                Kind::Pushing,
            ),
            tokens: access.tokens,
            max_streams_per_subscription: access.max_streams_per_subscription,
            push_without_tokens: access.push_without_tokens,
            published,
            shutdown,
        }
    }

    /// Opens a Subscribe call: checks it, and starts one follower per stream.
    fn open_subscription(&self, request: Request<v1::SubscribeRequest>) -> Result<Events, Status> {
        let grant = self.tokens.check(request.metadata())?;
        let req = request.into_inner();
        let indexes: Vec<usize> = if req.streams.is_empty() {
            // Every stream the caller may read.
            let all: Vec<usize> = (0..self.policy.streams().len())
                .filter(|&i| grant.stream(&self.policy.streams()[i].name))
                .collect();
            if all.is_empty() {
                return Err(auth::out_of_scope());
            }
            all
        } else {
            let mut indexes = Vec::new();
            for name in &req.streams {
                // Out of scope is refused alike whether the stream exists or not.
                if !grant.stream(name) {
                    return Err(auth::out_of_scope());
                }
                let Some(i) = self.policy.streams().iter().position(|s| &s.name == name) else {
                    return Err(Status::not_found("no such stream"));
                };
                if !indexes.contains(&i) {
                    indexes.push(i);
                }
            }
            indexes
        };
        if indexes.len() > self.max_streams_per_subscription {
            metrics::counter!(catalogue::GRPC_REFUSED, "reason" => "streams").increment(1);
            return Err(Status::resource_exhausted(format!(
                "a subscription may follow at most {} streams; name fewer, or subscribe more than once",
                self.max_streams_per_subscription
            )));
        }
        for name in req.from_sequence.keys() {
            if !indexes
                .iter()
                .any(|&i| &self.policy.streams()[i].name == name)
            {
                return Err(Status::invalid_argument(
                    "from_sequence names a stream that is not subscribed",
                ));
            }
        }
        let start = req
            .start
            .and_then(|s| s.position)
            .unwrap_or(Position::Live(v1::Live {}));
        let guard = Arc::new(self.subscribers.take(&grant)?);
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        for index in indexes {
            let name = &self.policy.streams()[index].name;
            let cursor = match (req.from_sequence.get(name), &start) {
                (Some(&seq), _) => seq.max(1),
                (None, Position::Sequence(seq)) => (*seq).max(1),
                (None, Position::Oldest(_)) => 1,
                (None, Position::Live(_)) => self.store.next_sequence(index),
            };
            let follower = Follower {
                name: name.clone(),
                shutdown: self.shutdown.clone(),
                store: Arc::clone(&self.store),
                index,
                cursor,
                tx: tx.clone(),
                sent: metrics::counter!(catalogue::GRPC_RECORDS_SENT, "stream" => name.clone()),
                sent_bytes: metrics::counter!(catalogue::GRPC_SENT_BYTES, "stream" => name.clone()),
                _guard: Arc::clone(&guard),
            };
            tokio::spawn(follower.run(self.shutdown.clone()));
        }
        Ok(ReceiverStream::new(rx))
    }
}

/// Who may call, how many long-lived calls may be open at once, and how many streams one
/// subscription may follow.
#[derive(Debug, Clone)]
pub struct Access {
    pub tokens: Arc<Tokens>,
    pub max_subscribers: usize,
    pub max_push_calls: usize,
    pub max_streams_per_subscription: usize,
    /// Whether Push is served when no tokens are configured (`grpc.push_without_tokens`).
    pub push_without_tokens: bool,
}

/// The running policy's register, when the policy was loaded, and the audit log whose head
/// `GetPolicy` shows.
#[derive(Debug, Clone)]
pub struct Published {
    pub register: Arc<Register>,
    pub loaded_at: std::time::SystemTime,
    pub audit: Arc<crate::governance::audit::AuditLog>,
}

/// The events of one Subscribe call.
type Events = ReceiverStream<Result<Outgoing, Status>>;

#[tonic::async_trait]
impl Gateway for GatewayService {
    /// Served through [`Served`]; this is the same stream decoded into messages.
    type SubscribeStream =
        Pin<Box<dyn Stream<Item = Result<v1::SubscribeResponse, Status>> + Send + 'static>>;
    type PushStream = ReceiverStream<Result<v1::PushAck, Status>>;
    type WatchFootprintStream = ReceiverStream<Result<v1::Footprint, Status>>;

    async fn get_policy(
        &self,
        request: Request<v1::GetPolicyRequest>,
    ) -> Result<Response<v1::GetPolicyResponse>, Status> {
        self.tokens
            .check(request.metadata())?
            .require(Scope::Policy)?;
        let head = self.published.audit.head();
        Ok(Response::new(v1::GetPolicyResponse {
            policy_hash: self.policy.hash_hex(),
            loaded_at: Some(self.published.loaded_at.into()),
            register_json: self.published.register.to_json(),
            policy_json: self.policy.canonical_json(),
            audit_head_seq: head.seq,
            audit_head_hash: head.hash,
        }))
    }

    async fn get_footprint(
        &self,
        request: Request<v1::GetFootprintRequest>,
    ) -> Result<Response<v1::Footprint>, Status> {
        self.tokens
            .check(request.metadata())?
            .require(Scope::Footprint)?;
        Ok(Response::new(self.footprint.borrow().clone()))
    }

    async fn watch_footprint(
        &self,
        request: Request<v1::WatchFootprintRequest>,
    ) -> Result<Response<Self::WatchFootprintStream>, Status> {
        let grant = self.tokens.check(request.metadata())?;
        grant.require(Scope::Footprint)?;
        // A watcher holds one of the `max_subscribers` places, as a subscriber does.
        let guard = self.subscribers.take(&grant)?;
        let (tx, rx) = mpsc::channel(4);
        let (mut figures, shutdown) = (self.footprint.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            let _guard = guard;
            loop {
                let latest = figures.borrow_and_update().clone();
                if !send_or_stop(&tx, Ok(latest), &shutdown).await {
                    return;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    changed = figures.changed() => if changed.is_err() { return },
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn push(
        &self,
        request: Request<tonic::Streaming<v1::PushRequest>>,
    ) -> Result<Response<Self::PushStream>, Status> {
        let grant = self.tokens.check(request.metadata())?;
        if self.tokens.is_open() && !self.push_without_tokens {
            return Err(auth::push_needs_tokens());
        }
        grant.require(Scope::Push)?;
        // An origin's push call (one per forwarded stream) holds one of the `max_push_calls`.
        let guard = self.pushes.take(&grant)?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let (policy, pushed, shutdown) = (
            Arc::clone(&self.policy),
            self.pushed.clone(),
            self.shutdown.clone(),
        );
        tokio::spawn(async move {
            let _guard = guard;
            let mut announced = std::collections::HashSet::new();
            loop {
                let request = tokio::select! {
                    () = shutdown.cancelled() => return,
                    next = inbound.message() => match next {
                        Ok(Some(request)) => request,
                        // The origin closed the call: nothing to answer.
                        Ok(None) => return,
                        // A request that cannot be read (over the size limit, malformed): the
                        // origin is told why, rather than seeing the call end without an ack.
                        Err(status) => {
                            send_or_stop(&tx, Err(status), &shutdown).await;
                            return;
                        }
                    },
                };
                if !grant.stream(&request.stream) || !grant.origin(&request.origin) {
                    send_or_stop(&tx, Err(auth::out_of_scope()), &shutdown).await;
                    return;
                }
                let checked = push::validate(&policy, &request)
                    .and_then(|stream| push::announced(&mut announced, &request).map(|()| stream));
                let stream = match checked {
                    Ok(stream) => stream,
                    Err(status) => {
                        send_or_stop(&tx, Err(status), &shutdown).await;
                        return;
                    }
                };
                let (reply, answer) = oneshot::channel();
                let job = PushJob {
                    origin: request.origin,
                    incarnation: request.incarnation,
                    stream,
                    records: request.records,
                    announced: Arc::new(announced.clone()),
                    reply,
                };
                if pushed.send(job).await.is_err() {
                    let _ = tx.send(Err(Status::unavailable("shutting down"))).await;
                    return;
                }
                let ack = match answer.await {
                    Ok(Ok(sequence)) => Ok(v1::PushAck {
                        stream: request.stream,
                        sequence,
                    }),
                    Ok(Err(refused)) => Err(refused),
                    Err(_) => Err(Status::unavailable("the records could not be kept")),
                };
                let failed = ack.is_err();
                if !send_or_stop(&tx, ack, &shutdown).await || failed {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let events = self.open_subscription(request)?;
        let responses = events.map(|event| event.and_then(Outgoing::into_response));
        Ok(Response::new(Box::pin(responses)))
    }

    async fn list_streams(
        &self,
        request: Request<v1::ListStreamsRequest>,
    ) -> Result<Response<v1::ListStreamsResponse>, Status> {
        let grant = self.tokens.check(request.metadata())?;
        let hash = self.policy.hash_hex();
        let streams = self
            .policy
            .streams()
            .iter()
            .enumerate()
            .filter(|(_, s)| grant.stream(&s.name))
            .map(|(i, s)| {
                let (oldest, last) = self.store.positions(i);
                v1::StreamInfo {
                    name: s.name.clone(),
                    purpose: s.purpose.clone(),
                    legal_basis: s.legal_basis.clone(),
                    fields: s.output_fields().into_iter().map(str::to_owned).collect(),
                    oldest_sequence: oldest,
                    last_sequence: last,
                    policy_hash: hash.clone(),
                }
            })
            .collect();
        Ok(Response::new(v1::ListStreamsResponse { streams }))
    }
}

/// Sends `item` unless `shutdown` comes first: a client that stops reading must not hold up a
/// stop or a reload. False when the item was not sent.
async fn send_or_stop<T>(tx: &mpsc::Sender<T>, item: T, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        sent = tx.send(item) => sent.is_ok(),
    }
}

/// Follows one stream for one subscriber.
struct Follower {
    name: String,
    shutdown: CancellationToken,
    store: Arc<Store>,
    index: usize,
    cursor: u64,
    tx: mpsc::Sender<Result<Outgoing, Status>>,
    sent: metrics::Counter,
    sent_bytes: metrics::Counter,
    _guard: Arc<Place>,
}

impl Follower {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut tip = self.store.watch(self.index);
        loop {
            // Mark the current tip as seen before reading, so an append after the read wakes us.
            tip.borrow_and_update();
            let Some(batch) = self
                .store
                .read_async(self.index, self.cursor, READ_BATCH)
                .await
            else {
                return;
            };
            if let Some((first, last)) = batch.gap {
                let stream = self.name.clone();
                let gap = v1::Gap {
                    stream,
                    first_sequence: first,
                    last_sequence: last,
                };
                if !self.send(Outgoing::Gap(gap)).await {
                    return;
                }
            }
            // Caught up means at the stream's tip: a short read (a damaged or expired batch
            // skipped) is not the end, and the follower reads on at once.
            let progressed = batch.next > self.cursor || batch.gap.is_some();
            let count = batch.records.len() as u64;
            let mut bytes = 0;
            for stored in batch.records {
                bytes += stored.bytes.len() as u64;
                if !self.send(Outgoing::Record(stored.bytes.clone())).await {
                    return;
                }
            }
            self.sent.increment(count);
            self.sent_bytes.increment(bytes);
            crate::telemetry::stats::TRAFFIC
                .grpc_sent
                .fetch_add(bytes, Ordering::Relaxed);
            self.cursor = batch.next;
            let at_tip = self.cursor >= self.store.next_sequence(self.index);
            if at_tip || !progressed {
                // At the tip: until the stream grows. Stuck (the outbox could not be read):
                // until it grows or a second has passed, then try again.
                let retry = async {
                    if at_tip {
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                };
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = self.tx.closed() => return,
                    changed = tip.changed() => if changed.is_err() { return },
                    () = retry => {}
                }
            }
        }
    }

    async fn send(&self, event: Outgoing) -> bool {
        send_or_stop(&self.tx, Ok(event), &self.shutdown).await
    }
}

/// One event of a Subscribe stream, ready to be written.
#[derive(Debug, Clone, PartialEq)]
enum Outgoing {
    /// An encoded `hubgate.v1.Record`, as the store holds it: encoded once when it was kept and
    /// shared by every subscriber, never encoded again.
    Record(Bytes),
    Gap(v1::Gap),
}

impl Outgoing {
    /// Writes the event as a `SubscribeResponse` message.
    fn encode(&self, buf: &mut impl BufMut) {
        // `SubscribeResponse.record` is field 1, `gap` field 2; a record's value is its encoding.
        match self {
            Outgoing::Record(record) => prost::encoding::bytes::encode(1, record, buf),
            Outgoing::Gap(gap) => prost::encoding::message::encode(2, gap, buf),
        }
    }

    /// The event as a message, for the generated service's `subscribe`.
    fn into_response(self) -> Result<v1::SubscribeResponse, Status> {
        let event = match self {
            Outgoing::Record(record) => Event::Record(
                v1::Record::decode(record)
                    .map_err(|_| Status::internal("a stored record does not decode"))?,
            ),
            Outgoing::Gap(gap) => Event::Gap(gap),
        };
        Ok(v1::SubscribeResponse { event: Some(event) })
    }
}

/// The codec of Subscribe as served: requests are decoded by prost, and events are written as
/// they are (see [`Outgoing`]).
#[derive(Debug, Default, Clone, Copy)]
struct SubscribeCodec;

impl Codec for SubscribeCodec {
    type Encode = Outgoing;
    type Decode = v1::SubscribeRequest;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        *self
    }

    fn decoder(&mut self) -> Self {
        *self
    }
}

impl Encoder for SubscribeCodec {
    type Item = Outgoing;
    type Error = Status;

    fn encode(&mut self, item: Outgoing, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst);
        Ok(())
    }
}

impl Decoder for SubscribeCodec {
    type Item = v1::SubscribeRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        v1::SubscribeRequest::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed SubscribeRequest: {e}")))
    }
}

/// A Subscribe call served with [`SubscribeCodec`].
struct SubscribeCall(GatewayService);

impl tonic::server::ServerStreamingService<v1::SubscribeRequest> for SubscribeCall {
    type Response = Outgoing;
    type ResponseStream = Events;
    type Future = BoxFuture<Response<Events>, Status>;

    fn call(&mut self, request: Request<v1::SubscribeRequest>) -> Self::Future {
        let opened = self.0.open_subscription(request).map(Response::new);
        Box::pin(std::future::ready(opened))
    }
}

/// The `hubgate.v1.Gateway` service as served: the generated server, except that Subscribe is
/// answered through [`SubscribeCodec`], so that records go out as the store holds them.
#[derive(Debug, Clone)]
struct Served {
    service: GatewayService,
    generated: GatewayServer<GatewayService>,
}

impl Served {
    const SUBSCRIBE: &'static str = "/hubgate.v1.Gateway/Subscribe";

    fn new(service: GatewayService) -> Self {
        Self {
            generated: GatewayServer::new(service.clone()),
            service,
        }
    }
}

impl NamedService for Served {
    const NAME: &'static str = <GatewayServer<GatewayService> as NamedService>::NAME;
}

impl<B> Service<http::Request<B>> for Served
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<http::Request<B>>::poll_ready(&mut self.generated, cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != Self::SUBSCRIBE {
            return self.generated.call(request);
        }
        let call = SubscribeCall(self.service.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(SubscribeCodec);
            Ok(grpc.server_streaming(call, request).await)
        })
    }
}

/// Serves the gRPC API on `listener` until `shutdown`, over TLS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    service: GatewayService,
    tls: Option<ServerTlsConfig>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<GatewayServer<GatewayService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(hubgate_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // Every connection is pinged; one that does not answer is closed, as is one that sends
    // nothing at all (see `guarded_incoming`).
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls.timeout(HANDSHAKE_TIMEOUT))
            .map_err(|e| anyhow::anyhow!("[grpc.tls] cannot be used: {e}"))?;
    }
    let incoming = guarded_incoming(listener, shutdown.clone());
    let server = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(Served::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    // Calls end on the shutdown; a connection that still lingers is cut after a grace period,
    // so that a stop or a reload never waits on a client.
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = server => served?,
        () = grace => tracing::warn!("gRPC connections still open after the grace period were cut"),
    }
    Ok(())
}

/// The gRPC listener's connections, each bounded ([`crate::sinks::guarded`]): at most
/// [`MAX_CONNECTIONS`] at once, each closed when it sends nothing for [`IDLE`] (a healthy client
/// answers the keepalive pings well within it). Records go out as soon as they are written, not
/// when Nagle's algorithm lets them (which held small writes for tens of milliseconds).
fn guarded_incoming(
    listener: TcpListener,
    shutdown: CancellationToken,
) -> ReceiverStream<std::io::Result<Guarded>> {
    let listener = GuardedListener::new(
        listener,
        Bounds {
            max_connections: MAX_CONNECTIONS,
            idle: IDLE,
        },
    );
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let (connection, _) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            if tx.send(Ok(connection)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Connections the gRPC listener holds at once; each multiplexes any number of calls.
const MAX_CONNECTIONS: usize = 1024;
/// How often an open connection is pinged, and how long its answer may take.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a connection may send nothing (not even a ping's answer) before it is closed.
const IDLE: std::time::Duration = std::time::Duration::from_secs(45);
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long open gRPC connections may take to close after a stop or reload.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Binds the gRPC listener, with a clear error when the address is taken.
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen for gRPC on {addr}: {e} (set [grpc] listen to a free address, or port 0)"
        )
    })?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replay that meets a damaged batch reports it as a Gap and goes on to the records after
    /// it, without waiting for a new record to arrive.
    #[tokio::test]
    async fn replay_goes_on_past_a_damaged_batch() {
        use crate::config::StoreConfig;
        use crate::outbox::SledOutbox;
        let dir = tempfile::tempdir().unwrap();
        let outbox = Arc::new(SledOutbox::open(dir.path()).unwrap());
        let audit = Arc::new(
            crate::governance::audit::AuditLog::open(&dir.path().join("audit.jsonl")).unwrap(),
        );
        let config = StoreConfig {
            memory_records_per_stream: 1,
            ..StoreConfig::default()
        };
        let store = Arc::new(
            Store::open(
                Arc::clone(&outbox) as Arc<dyn crate::outbox::Outbox>,
                [("s", std::time::Duration::from_secs(3600))],
                &config,
                audit,
            )
            .unwrap(),
        );
        let now = crate::telemetry::clock::now_ms();
        for batch in 0..3 {
            let mut pending = crate::store::Pending::default();
            let records = (0..3).map(|i| v1::Record {
                stream: "s".into(),
                fields: [(
                    "n".to_owned(),
                    v1::Value {
                        kind: Some(v1::value::Kind::IntValue(batch * 3 + i)),
                    },
                )]
                .into(),
                ..v1::Record::default()
            });
            store.stage(&mut pending, 0, records, now);
            store.commit(&mut pending, now).unwrap();
        }
        let mut value = outbox.raw_get("s", 4);
        let middle = value.len() / 2;
        value[middle] ^= 0x10;
        outbox.raw_insert("s", 4, &value);
        let (tx, mut rx) = mpsc::channel(16);
        let places = Places::new(1, "test_places", &Tokens::default(), Kind::Reading);
        let shutdown = CancellationToken::new();
        let follower = Follower {
            name: "s".into(),
            shutdown: shutdown.clone(),
            store,
            index: 0,
            cursor: 1,
            tx,
            sent: metrics::counter!("test_sent"),
            sent_bytes: metrics::counter!("test_sent_bytes"),
            _guard: Arc::new(places.take(&auth::Grant::Open).unwrap()),
        };
        tokio::spawn(follower.run(shutdown.clone()));
        let mut seen = Vec::new();
        while seen.len() < 7 {
            let event = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("replay stalled after {seen:?}"))
                .unwrap()
                .unwrap();
            seen.push(match event {
                Outgoing::Record(bytes) => {
                    format!("{}", v1::Record::decode(bytes).unwrap().sequence)
                }
                Outgoing::Gap(gap) => format!("gap {}-{}", gap.first_sequence, gap.last_sequence),
            });
        }
        assert_eq!(seen, ["1", "2", "3", "gap 4-6", "7", "8", "9"]);
        shutdown.cancel();
    }

    /// What Subscribe writes is a `SubscribeResponse`, and the same one the generated service's
    /// `subscribe` gives, for a record as the store holds it and for a gap.
    #[test]
    fn subscribe_events_are_subscribe_responses() {
        let record = v1::Record {
            stream: "air".into(),
            sequence: 300,
            policy_hash: "ab".repeat(32),
            fields: [(
                "pm25".to_owned(),
                v1::Value {
                    kind: Some(v1::value::Kind::DoubleValue(7.5)),
                },
            )]
            .into(),
            ..v1::Record::default()
        };
        let gap = v1::Gap {
            stream: "air".into(),
            first_sequence: 1,
            last_sequence: 299,
        };
        let events = [
            (
                Outgoing::Record(record.encode_to_vec().into()),
                Event::Record(record),
            ),
            (Outgoing::Gap(gap.clone()), Event::Gap(gap)),
        ];
        for (outgoing, want) in events {
            let mut wire = Vec::new();
            outgoing.encode(&mut wire);
            let want = v1::SubscribeResponse { event: Some(want) };
            assert_eq!(
                v1::SubscribeResponse::decode(wire.as_slice()).unwrap(),
                want
            );
            assert_eq!(outgoing.into_response().unwrap(), want);
        }
        let damaged = Outgoing::Record(Bytes::from_static(&[0x0a, 0x05, b'a']));
        assert_eq!(
            damaged.into_response().unwrap_err().code(),
            tonic::Code::Internal
        );
    }
}
