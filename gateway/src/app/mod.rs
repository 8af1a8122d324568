//! Starting and stopping a gateway: the listeners a process keeps across reloads, the files a
//! configuration names (secrets, TLS, grid intensities), and the tasks of one running gateway.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hubgate_exporters::catalogue;
use hubgate_privacy::Policy;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
pub use tokio_util::sync::CancellationToken;

pub mod environment;
pub mod files;
pub mod lifecycle;

pub use files::{Files, check_files};

use crate::config::Config;
use crate::governance::{audit, footprint, register};
use crate::outbox;
use crate::pipeline;
use crate::pipeline::Pipeline;
use crate::pipeline::budget;
use crate::sinks::grpc::auth;
use crate::sinks::{admin, grpc, nats, upstream};
use crate::sources::mqtt as ingest;
use crate::sources::mqtt::{AckQueue, Acker};
use crate::store::{PURGE_TICK_MS, Store};
use crate::telemetry::stats::Stats;

/// A gateway that is running.
#[derive(Debug)]
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The transparency notice's own address, when it has one (`admin.public_listen`).
    pub public_addr: Option<SocketAddr>,
    pub policy: Arc<Policy>,
    pub stats: Arc<Stats>,
    pub mqtt_connected: watch::Receiver<bool>,
    pub audit: Arc<audit::AuditLog>,
    tasks: JoinSet<anyhow::Result<()>>,
    shutdown: CancellationToken,
    /// Gone once every task that used the store has let it go.
    store: std::sync::Weak<Store>,
    /// Held while the gateway runs (see [`start`]).
    _data_lock: std::fs::File,
}

impl Running {
    /// Waits until `shutdown` is cancelled and every task has stopped, or until a task fails (then
    /// stops the others and returns its error). When it returns, the data directory is free for
    /// another start (see [`Process`]).
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut result = Ok(());
        while let Some(joined) = self.tasks.join_next().await {
            let outcome = joined.map_err(anyhow::Error::from).and_then(|r| r);
            if let Err(err) = outcome {
                if result.is_ok() {
                    result = Err(err);
                }
                self.shutdown.cancel();
            }
        }
        // Subscribers' and pushers' tasks end on the same cancellation, shortly after: the outbox
        // is closed only when the last of them lets go of the store.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.store.strong_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if self.store.strong_count() > 0 && result.is_ok() {
            result = Err(anyhow::anyhow!(
                "the store is still in use 10 s after the gateway stopped"
            ));
        }
        result
    }
}

/// What a gateway process keeps across policy reloads: its listening sockets (so that the
/// addresses, including ports the system picked, stay the same) and its footprint counts.
#[derive(Debug)]
pub struct Process {
    grpc: std::net::TcpListener,
    admin: std::net::TcpListener,
    /// The transparency notice's own listener, when it has one.
    public: Option<std::net::TcpListener>,
    footprint: Arc<footprint::Ledger>,
}

impl Process {
    /// Binds the configuration's gRPC and admin addresses.
    pub fn bind(config: &Config) -> anyhow::Result<Self> {
        Ok(Self {
            grpc: grpc::bind(config.grpc.listen)?,
            admin: admin::bind(config.admin.listen)?,
            public: config.admin.public_listen.map(admin::bind).transpose()?,
            footprint: Arc::new(footprint::Ledger::new()),
        })
    }

    /// The transparency notice's own address, when it has one.
    pub fn public_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        self.public
            .as_ref()
            .map(|l| l.local_addr().context("public listener address"))
            .transpose()
    }

    pub fn grpc_addr(&self) -> anyhow::Result<SocketAddr> {
        self.grpc.local_addr().context("gRPC listener address")
    }

    pub fn admin_addr(&self) -> anyhow::Result<SocketAddr> {
        self.admin.local_addr().context("admin listener address")
    }
}

/// Makes ring the process's TLS provider (for the MQTT client; tonic names its provider itself).
pub fn install_crypto_provider() {
    // Already installed is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Why a gateway starts, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// The process started.
    Fresh,
    /// The configuration was reloaded (SIGHUP); the policy it replaced, and the gRPC tokens the
    /// replaced configuration granted.
    Reload {
        previous_policy_hash: String,
        previous_tokens: Vec<crate::config::TokenConfig>,
    },
    /// A reloaded configuration could not start, and the previous one runs again.
    Revert {
        failed_policy_hash: String,
        error: String,
    },
}

/// Starts a gateway: binds its listeners, connects to the broker and starts the pipeline.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let process = Process::bind(&config)?;
    start_in(&process, config, Start::Fresh, shutdown).await
}

/// Starts a gateway on `process`'s listeners: connects to the broker and starts the pipeline.
/// After the previous gateway of the process has stopped ([`Running::wait`]), this is how a new
/// configuration takes over.
pub async fn start_in(
    process: &Process,
    config: Config,
    why: Start,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    hubgate_exporters::prometheus::install();
    let files = Files::load(&config)?;
    let loaded_at = std::time::SystemTime::now();
    let register = Arc::new(register::Register::new(
        &config,
        &humantime::format_rfc3339_seconds(loaded_at).to_string(),
    ));
    let opened = Opened::open(&config, &why)?;
    let mut tasks = JoinSet::new();
    let (push_tx, push_rx) = mpsc::channel(16);
    let connected = spawn_ingest(
        &mut tasks,
        (&config.mqtt, &config.store),
        files.mqtt_login,
        &opened,
        push_rx,
        &shutdown,
    )?;
    let Opened {
        policy,
        data_lock,
        audit,
        store,
        stats,
    } = opened;
    spawn_exporters(
        &mut tasks,
        (config.upstream, files.upstream),
        (config.nats, files.nats, register.to_ngsi_ld()),
        &policy,
        &store,
        &shutdown,
    )?;
    let service = gateway_service(
        &config.grpc,
        (&policy, &store, &register),
        push_tx,
        process.footprint.watch(),
        (loaded_at, Arc::clone(&audit)),
        &shutdown,
    );
    serve_listeners(
        &mut tasks,
        process,
        (service, files.grpc_tls),
        (connected.clone(), store.failing(), Arc::clone(&register)),
        &shutdown,
    )?;
    tasks.spawn(footprint::run(
        config.footprint,
        files.grid_intensity,
        Arc::clone(&stats),
        Arc::clone(&process.footprint),
        shutdown.clone(),
    ));
    spawn_housekeeping(&mut tasks, &store, &audit, &shutdown);
    let (grpc_addr, admin_addr) = (process.grpc_addr()?, process.admin_addr()?);
    tracing::info!(%grpc_addr, %admin_addr, policy_hash = %policy.hash_hex(), streams = policy.streams().len(), "hubgate started");
    Ok(Running {
        grpc_addr,
        admin_addr,
        public_addr: process.public_addr()?,
        policy,
        stats,
        mqtt_connected: connected,
        audit,
        tasks,
        shutdown,
        store: Arc::downgrade(&store),
        _data_lock: data_lock,
    })
}

/// Spawns what keeps the store in order: purges on every tick, and the audit log's anchor.
fn spawn_housekeeping(
    tasks: &mut JoinSet<anyhow::Result<()>>,
    store: &Arc<Store>,
    audit: &Arc<audit::AuditLog>,
    shutdown: &CancellationToken,
) {
    tasks.spawn(purge_every_tick(Arc::clone(store), shutdown.clone()));
    tasks.spawn(anchor_audit(
        Arc::clone(audit),
        Arc::clone(store),
        shutdown.clone(),
    ));
}

/// Serves the gRPC API and the admin HTTP endpoints on the process's listeners.
fn serve_listeners(
    tasks: &mut JoinSet<anyhow::Result<()>>,
    process: &Process,
    (service, tls): (
        grpc::GatewayService,
        Option<tonic::transport::ServerTlsConfig>,
    ),
    (connected, failing, register): (
        watch::Receiver<bool>,
        watch::Receiver<Option<String>>,
        Arc<register::Register>,
    ),
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let grpc_listener = tokio::net::TcpListener::from_std(process.grpc.try_clone()?)?;
    let admin_listener = tokio::net::TcpListener::from_std(process.admin.try_clone()?)?;
    let public_listener = match &process.public {
        Some(l) => Some(tokio::net::TcpListener::from_std(l.try_clone()?)?),
        None => None,
    };
    tasks.spawn(grpc::serve(grpc_listener, service, tls, shutdown.clone()));
    tasks.spawn(admin::serve(
        admin_listener,
        public_listener,
        (connected, failing),
        register,
        shutdown.clone(),
    ));
    Ok(())
}

/// The gRPC service of a gateway: its streams from `store`, the register and footprint it
/// publishes, Push into `push`, and who may call it.
fn gateway_service(
    config: &crate::config::GrpcConfig,
    (policy, store, register): (&Arc<Policy>, &Arc<Store>, &Arc<register::Register>),
    push: mpsc::Sender<crate::sources::push::PushJob>,
    footprint: watch::Receiver<hubgate_proto::v1::Footprint>,
    (loaded_at, audit): (std::time::SystemTime, Arc<audit::AuditLog>),
    shutdown: &CancellationToken,
) -> grpc::GatewayService {
    grpc::GatewayService::new(
        Arc::clone(policy),
        Arc::clone(store),
        push,
        footprint,
        grpc::Access {
            tokens: Arc::new(auth::Tokens::new(&config.tokens)),
            max_subscribers: config.max_subscribers,
            max_push_calls: config.max_push_calls,
            max_streams_per_subscription: config.max_streams_per_subscription,
            push_without_tokens: config.push_without_tokens,
        },
        grpc::Published {
            register: Arc::clone(register),
            loaded_at,
            audit,
        },
        shutdown.clone(),
    )
}

/// What a start opens before any task runs: the data directory (locked), the audit log with the
/// start's entry, the outbox and the store over it.
struct Opened {
    policy: Arc<Policy>,
    data_lock: std::fs::File,
    audit: Arc<audit::AuditLog>,
    store: Arc<Store>,
    stats: Arc<Stats>,
}

impl Opened {
    fn open(config: &Config, why: &Start) -> anyhow::Result<Self> {
        let policy = Arc::new(config.policy.clone());
        publish_policy_info(&policy, why);
        let data_dir = &config.store.data_dir;
        let data_lock = lock_data_dir(data_dir)?;
        let audit_path = data_dir.join("audit.jsonl");
        let audit = Arc::new(
            audit::AuditLog::open_with(&audit_path, config.audit.retention)
                .with_context(|| format!("cannot open the audit log {}", audit_path.display()))?,
        );
        record_start(&audit, &policy, &config.grpc.tokens, why);
        let outbox = outbox::open(config.store.engine, data_dir, config.store.log_bytes)
            .with_context(|| format!("cannot open the outbox in {}", data_dir.display()))?;
        let held = pipeline::held_streams(&policy);
        let store = Arc::new(Store::open_holding(
            outbox,
            policy
                .streams()
                .iter()
                .map(|s| (s.name.as_str(), s.retention)),
            &held,
            &config.store,
            Arc::clone(&audit),
        )?);
        // The policy's document, for the upstream hub (`hubgate.v1.PushRequest.policies`): kept
        // as long as the outbox, so records kept under it can be forwarded after a reload.
        let document = upstream::policy_checkpoint(&policy.hash_hex());
        if store.checkpoint(&document)?.is_none() {
            store.save_checkpoint(&document, policy.canonical_json().into_bytes())?;
        }
        anchor_check(&audit, &store)?;
        let stats = Arc::new(Stats::new(policy.streams().len()));
        Ok(Self {
            policy,
            data_lock,
            audit,
            store,
            stats,
        })
    }
}

/// The outbox checkpoint that anchors the audit log's head (see [`audit`]). A control character
/// keeps it apart from every stream and window name.
const AUDIT_ANCHOR: &str = "\u{3}audit-head";

/// Checks the audit log against the head anchored in the outbox (a cut or rewritten log is
/// recorded, logged and counted), then anchors the head it has now.
fn anchor_check(audit: &audit::AuditLog, store: &Store) -> anyhow::Result<()> {
    if let Some(anchored) = store
        .checkpoint(AUDIT_ANCHOR)?
        .and_then(|b| audit::Head::decode(&b))
    {
        audit.check_anchor(&anchored, crate::telemetry::clock::now_ms());
    }
    let head = audit.head();
    metrics::gauge!(catalogue::AUDIT_HEAD_SEQ).set(head.seq as f64);
    store.save_checkpoint(AUDIT_ANCHOR, head.encode())?;
    Ok(())
}

/// Keeps the anchor of the audit log's head up to date: within a second of each entry, and once
/// more when the gateway stops.
async fn anchor_audit(
    audit: Arc<audit::AuditLog>,
    store: Arc<Store>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut anchored = audit.head();
    loop {
        let stopping = tokio::select! {
            () = shutdown.cancelled() => true,
            () = tokio::time::sleep(Duration::from_secs(1)) => false,
        };
        let head = audit.head();
        if head != anchored {
            metrics::gauge!(catalogue::AUDIT_HEAD_SEQ).set(head.seq as f64);
            let (store, bytes) = (Arc::clone(&store), head.encode());
            match tokio::task::spawn_blocking(move || store.save_checkpoint(AUDIT_ANCHOR, bytes))
                .await
            {
                Ok(Ok(())) => anchored = head,
                _ => tracing::warn!("cannot anchor the audit log's head in the outbox; will retry"),
            }
        }
        if stopping {
            return Ok(());
        }
    }
}

/// `hubgate_policy_info` names the running policy (and no longer the one it replaced), and
/// `hubgate_build_info` the version.
fn publish_policy_info(policy: &Policy, why: &Start) {
    let replaced = match why {
        Start::Fresh => None,
        Start::Reload {
            previous_policy_hash,
            ..
        } => Some(previous_policy_hash),
        Start::Revert {
            failed_policy_hash, ..
        } => Some(failed_policy_hash),
    };
    if let Some(replaced) = replaced {
        metrics::gauge!(catalogue::POLICY_INFO, "policy_hash" => replaced.clone()).set(0.0);
    }
    metrics::gauge!(catalogue::POLICY_INFO, "policy_hash" => policy.hash_hex()).set(1.0);
    metrics::gauge!(catalogue::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Creates the data directory and locks it: one gateway per data directory, since a second one
/// would corrupt the keys and the audit chain. The lock is held while the returned file is.
///
/// Everything in the data directory is private to the gateway's user: the process's file mode
/// mask becomes 077 (whatever the shell's umask), so the outbox engines' files are 0600 too; a
/// data directory that others can enter is refused, and one its group can enter is a warning.
pub(crate) fn lock_data_dir(data_dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o077));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let mode = std::fs::metadata(data_dir)
        .with_context(|| format!("cannot read the data directory {}", data_dir.display()))?
        .permissions()
        .mode();
    if let Some(warning) = environment::openness(data_dir, mode)? {
        tracing::warn!("{warning}");
    }
    let lock_path = data_dir.join("lock");
    let data_lock = std::fs::OpenOptions::new()
        .create(true)
        .mode(0o600)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    data_lock.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "another hubgate is running with the data directory {} (it holds {})",
            data_dir.display(),
            lock_path.display()
        )
    })?;
    Ok(data_lock)
}

/// The audit entry of a start: `start`, `policy_reloaded` or `policy_reload_failed`; and on a
/// reload, one entry per gRPC token granted, revoked or changed (`token_granted`,
/// `token_revoked`, `token_changed`). A start lists every grant.
fn record_start(
    audit: &audit::AuditLog,
    policy: &Policy,
    tokens: &[crate::config::TokenConfig],
    why: &Start,
) {
    let now = crate::telemetry::clock::now_ms();
    let mut entry = serde_json::json!({
        "policy_hash": policy.hash_hex(),
        "version": env!("CARGO_PKG_VERSION"),
        "streams": policy.streams().iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
    });
    let event = match why {
        Start::Fresh => {
            entry["tokens"] = tokens.iter().map(grant).collect();
            "start"
        }
        Start::Reload {
            previous_policy_hash,
            previous_tokens,
        } => {
            entry["previous_policy_hash"] = previous_policy_hash.as_str().into();
            for (event, data) in token_changes(previous_tokens, tokens) {
                audit.record(now, event, data);
            }
            "policy_reloaded"
        }
        Start::Revert {
            failed_policy_hash,
            error,
        } => {
            entry["failed_policy_hash"] = failed_policy_hash.as_str().into();
            entry["error"] = error.as_str().into();
            "policy_reload_failed"
        }
    };
    audit.record(now, event, entry);
}

/// What a token grants, for the audit log: its holder's name, the first 16 hex digits of its
/// digest (which tell tokens apart without helping anyone forge one) and its scopes.
fn grant(token: &crate::config::TokenConfig) -> serde_json::Value {
    serde_json::json!({
        "name": token.name,
        "sha256_prefix": token.sha256.get(..16).unwrap_or_default(),
        "streams": token.streams,
        "policy": token.policy,
        "footprint": token.footprint,
        "push": token.push,
        "origins": token.origins,
    })
}

/// The audit entries for the tokens a reload granted, revoked or changed (by digest).
fn token_changes(
    before: &[crate::config::TokenConfig],
    after: &[crate::config::TokenConfig],
) -> Vec<(&'static str, serde_json::Value)> {
    let find = |list: &[crate::config::TokenConfig], digest: &str| {
        list.iter().find(|t| t.sha256 == digest).map(grant)
    };
    let mut changes = Vec::new();
    for token in after {
        match find(before, &token.sha256) {
            None => changes.push(("token_granted", grant(token))),
            Some(old) if old != grant(token) => changes.push((
                "token_changed",
                serde_json::json!({ "before": old, "after": grant(token) }),
            )),
            Some(_) => {}
        }
    }
    for token in before {
        if find(after, &token.sha256).is_none() {
            changes.push(("token_revoked", grant(token)));
        }
    }
    changes
}

/// The privacy-budget ledger, when a stream adds noise.
fn budget_for(
    policy: &Policy,
    data_dir: &std::path::Path,
) -> anyhow::Result<Option<budget::BudgetFile>> {
    let noisy = policy
        .streams()
        .iter()
        .any(|s| s.aggregate.as_ref().is_some_and(|a| a.noise.is_some()));
    Ok(if noisy {
        Some(budget::BudgetFile::open(data_dir)?)
    } else {
        None
    })
}

/// Spawns the MQTT connection and the pipeline it feeds; returns whether the broker connection
/// is up (for `/readyz`).
fn spawn_ingest(
    tasks: &mut JoinSet<anyhow::Result<()>>,
    (mqtt, store): (&crate::config::MqttConfig, &crate::config::StoreConfig),
    login: ingest::Login,
    opened: &Opened,
    push_rx: mpsc::Receiver<crate::sources::push::PushJob>,
    shutdown: &CancellationToken,
) -> anyhow::Result<watch::Receiver<bool>> {
    let policy = &opened.policy;
    let mut pipeline = Pipeline::new(
        Arc::clone(policy),
        Arc::clone(&opened.store),
        Arc::clone(&opened.stats),
        budget_for(policy, &store.data_dir)?,
        Arc::clone(&opened.audit),
    )?;
    let (connected_tx, connected_rx) = watch::channel(false);
    let (queue_tx, queue_rx) = mpsc::channel(mqtt.queue_capacity);
    let session = login.session(mqtt);
    let (client, eventloop) = ingest::connect(mqtt, login);
    let subscriptions = policy
        .subscriptions()
        .into_iter()
        .map(|filter| match &mqtt.shared_group {
            Some(group) => format!("$share/{group}/{filter}"),
            None => filter.to_owned(),
        })
        .collect();
    if let Some(limit) = mqtt.rate_limit {
        pipeline.limit_topics(limit);
    }
    if let Some(device) = &mqtt.device_rate_limit {
        pipeline.limit_devices(device);
    }
    let acks = AckQueue::default();
    let budget = ingest::ByteBudget::new(usize::try_from(mqtt.queue_bytes).unwrap_or(usize::MAX));
    let acker = Acker::new(client.clone(), acks.clone(), budget.clone());
    let spacing = pipeline::Spacing {
        interval: store.commit_interval,
        max: store.commit_interval_max,
    };
    let stop = shutdown.clone();
    tasks.spawn(
        async move { pipeline::run(pipeline, queue_rx, push_rx, acker, spacing, stop).await },
    );
    let link = ingest::Link {
        subscriptions,
        max_payload: mqtt.max_packet_bytes,
        read_limit: mqtt.read_limit(),
        backoff_max: mqtt.reconnect_backoff_max,
        session,
        budget,
    };
    let stop = shutdown.clone();
    tasks.spawn(async move {
        ingest::run(eventloop, client, acks, link, queue_tx, connected_tx, stop).await;
        Ok(())
    });
    Ok(connected_rx)
}

/// Spawns the exporters that are configured (NATS, with the privacy notice to publish beside the
/// records; upstream), with one incarnation for all of them, made with the outbox.
fn spawn_exporters(
    tasks: &mut JoinSet<anyhow::Result<()>>,
    upstream: (Option<crate::config::UpstreamConfig>, upstream::Credentials),
    nats: (Option<crate::config::NatsConfig>, nats::Credentials, String),
    policy: &Arc<Policy>,
    store: &Arc<Store>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    if upstream.0.is_none() && nats.0.is_none() {
        return Ok(());
    }
    let incarnation = upstream::incarnation(store)?;
    if let (Some(config), credentials, notice) = nats {
        tasks.spawn(nats::run(
            config,
            credentials,
            incarnation.clone(),
            Arc::clone(policy),
            Arc::clone(store),
            notice,
            shutdown.clone(),
        ));
    }
    if let (Some(config), credentials) = upstream {
        tasks.spawn(upstream::run(
            config,
            credentials,
            incarnation,
            Arc::clone(policy),
            Arc::clone(store),
            shutdown.clone(),
        ));
    }
    Ok(())
}

/// Purges what retention no longer allows, every [`PURGE_TICK_MS`], off the async threads (the
/// disk work of deletes and fsync).
async fn purge_every_tick(store: Arc<Store>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(PURGE_TICK_MS.unsigned_abs()));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {
                let store = Arc::clone(&store);
                let purge = move || store.purge_expired_all(crate::telemetry::clock::now_ms());
                let _ = tokio::task::spawn_blocking(purge).await;
            }
        }
    }
}
