//! The gateway's configuration: one TOML file holding the connection settings and the policy.
//!
//! ```toml
//! [mqtt]
//! host = "127.0.0.1"
//! port = 1883
//! client_id = "hubgate-district-1"
//!
//! [grpc]
//! listen = "127.0.0.1:50051"
//!
//! [admin]
//! listen = "127.0.0.1:9464"
//!
//! [[stream]]   # the policy: see hubgate_privacy::policy
//! ...
//! ```
//!
//! [`parse`] reports every problem it finds with its line and column (see
//! [`hubgate_privacy::diagnostics`]); nothing is applied from a file with errors.

use std::net::SocketAddr;
use std::time::Duration;

use hubgate_privacy::diagnostics::{self, Diagnostic, Diagnostics};
use hubgate_privacy::policy::{self, Policy};
use serde::{Deserialize, Deserializer};

/// The embedded default configuration: a small district's policy, used by `hubgate run` without a
/// config file and by `hubgate demo`.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub mqtt: MqttConfig,
    pub grpc: GrpcConfig,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    /// Where to forward records, if anywhere.
    pub upstream: Option<UpstreamConfig>,
    /// Where to publish records in NATS JetStream, if anywhere.
    pub nats: Option<NatsConfig>,
    pub footprint: FootprintConfig,
    pub register: RegisterConfig,
    pub audit: AuditConfig,
    pub policy: Policy,
}

/// The audit log's own settings (see [`crate::governance::audit`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// How long audit entries are kept ("730d" by default).
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention: DEFAULT_AUDIT_RETENTION,
        }
    }
}

/// How long the audit log keeps entries when the configuration does not say: two years.
pub const DEFAULT_AUDIT_RETENTION: Duration = Duration::from_secs(730 * 86_400);

/// Who runs the hub and where, for the transparency register (see [`crate::governance::register`]).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RegisterConfig {
    /// The organisation accountable for the hub (the controller, in GDPR terms).
    pub controller: Option<String>,
    /// How residents reach the controller: an address, e-mail or web page.
    pub contact: Option<String>,
    /// The data protection officer's contact, if there is one.
    pub dpo_contact: Option<String>,
    /// Where the hub and its sensors are, in words a resident recognises.
    pub location: Option<String>,
    /// The public address of the transparency page, for the QR code on printed signs.
    pub public_url: Option<String>,
    /// When the deployment is planned to end (YYYY-MM-DD), if it is.
    pub end_date: Option<String>,
}

/// How the gateway's own footprint is figured (see `hubgate_exporters::energy` and
/// `hubgate_exporters::carbon`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FootprintConfig {
    /// Location-based carbon intensity of the grid the hub draws from, in gCO2e per kWh: for every
    /// hour when there is no hourly file, else for the hours the file lacks. No operational carbon
    /// (nor SCI) is reported without an intensity.
    pub grid_intensity_g_per_kwh: Option<f64>,
    /// A file of hourly intensities per zone (`zone,hour,g_per_kwh`; see
    /// `hubgate_exporters::carbon::HourlyIntensity`), read again when it changes.
    pub grid_intensity_file: Option<std::path::PathBuf>,
    /// The hub's zone in that file; may be left out when the file holds one zone.
    pub grid_zone: Option<String>,
    /// How often the meter is read.
    #[serde(deserialize_with = "duration")]
    pub sample_every: Duration,
    /// Emissions of making the hardware, in kgCO2e (the vendor's LCA when known).
    pub embodied_kg: f64,
    /// Expected life of the hardware, in years.
    pub lifetime_years: f64,
    /// Share of the hardware reserved for the gateway (1 on a dedicated device).
    pub hardware_share: f64,
    /// Attributional network energy of a gigabyte, for the bytes avoided (kWh per GB).
    pub network_kwh_per_gb: f64,
    /// The energy model's coefficients, used when no sensor can be read.
    pub idle_watts_per_vcpu: f64,
    pub max_watts_per_vcpu: f64,
    pub memory_watts_per_gb: f64,
}

impl Default for FootprintConfig {
    fn default() -> Self {
        let model = hubgate_exporters::energy::Coefficients::default();
        let embodied = hubgate_exporters::carbon::Embodied::default();
        Self {
            grid_intensity_g_per_kwh: None,
            grid_intensity_file: None,
            grid_zone: None,
            sample_every: Duration::from_secs(5),
            embodied_kg: embodied.kg,
            lifetime_years: embodied.lifetime_years,
            hardware_share: embodied.share,
            network_kwh_per_gb: hubgate_exporters::carbon::NETWORK_KWH_PER_GB,
            idle_watts_per_vcpu: model.idle_watts_per_vcpu,
            max_watts_per_vcpu: model.max_watts_per_vcpu,
            memory_watts_per_gb: model.memory_watts_per_gb,
        }
    }
}

impl FootprintConfig {
    fn problems(&self) -> Vec<&'static str> {
        let mut problems = Vec::new();
        let figures = [
            self.grid_intensity_g_per_kwh.unwrap_or(0.0),
            self.embodied_kg,
            self.network_kwh_per_gb,
            self.idle_watts_per_vcpu,
            self.max_watts_per_vcpu,
            self.memory_watts_per_gb,
        ];
        if figures.iter().any(|f| !f.is_finite() || *f < 0.0) {
            problems.push("footprint figures must be finite and not negative");
        }
        if !(self.lifetime_years.is_finite() && self.lifetime_years > 0.0) {
            problems.push("footprint.lifetime_years must be more than 0");
        }
        if !(self.hardware_share > 0.0 && self.hardware_share <= 1.0) {
            problems.push("footprint.hardware_share must be more than 0 and at most 1");
        }
        if self.sample_every < Duration::from_secs(1) {
            problems.push("footprint.sample_every must be at least 1s");
        }
        if self.grid_zone.is_some() && self.grid_intensity_file.is_none() {
            problems.push("footprint.grid_zone names a zone of footprint.grid_intensity_file, which is not set");
        }
        if self.max_watts_per_vcpu < self.idle_watts_per_vcpu {
            problems.push("footprint.max_watts_per_vcpu must be at least idle_watts_per_vcpu");
        }
        problems
    }
}

/// An upstream hub that receives this gateway's records (gRPC `Push`); see [`crate::sinks::upstream`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The hub's gRPC address, `http://host:port`.
    pub endpoint: String,
    /// This gateway's name at the hub: stable, and unique among the gateways that push to it.
    pub origin: String,
    /// Streams to forward; all when absent.
    #[serde(default)]
    pub streams: Option<Vec<String>>,
    /// Records per request.
    #[serde(default = "UpstreamConfig::default_batch")]
    pub batch: usize,
    /// Records sent and not yet acknowledged, per stream, at most.
    #[serde(default = "UpstreamConfig::default_window")]
    pub window: u64,
    /// A file holding the bearer token the hub gave this gateway (one line); it must not be
    /// readable by group or others. The environment variable `HUBGATE_UPSTREAM_TOKEN` may hold it
    /// instead.
    #[serde(default)]
    pub token_file: Option<std::path::PathBuf>,
    /// For an `https://` endpoint: the CA that signed the hub's certificate (PEM); the public web
    /// roots when absent.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// This gateway's client certificate and key (PEM), for a hub that wants one (mTLS); the key
    /// must not be readable by group or others.
    #[serde(default)]
    pub cert_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub key_file: Option<std::path::PathBuf>,
    /// Longest wait between reconnection attempts (the wait doubles from 100 ms up to this).
    #[serde(
        default = "UpstreamConfig::default_backoff",
        deserialize_with = "duration"
    )]
    pub reconnect_backoff_max: Duration,
}

impl UpstreamConfig {
    fn default_batch() -> usize {
        256
    }
    fn default_window() -> u64 {
        4096
    }
    fn default_backoff() -> Duration {
        Duration::from_secs(30)
    }
}

/// A NATS JetStream server the filtered streams are published to; see [`crate::sinks::nats`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// The server, `nats://host:4222`, or `tls://host:4222` for TLS.
    pub url: String,
    /// Records of stream `s` are published on `<subject_prefix>.s`.
    #[serde(default = "NatsConfig::default_subject_prefix")]
    pub subject_prefix: String,
    /// The JetStream stream that stores them.
    #[serde(default = "NatsConfig::default_jetstream")]
    pub jetstream: String,
    /// Create the JetStream stream (file storage, subjects `<subject_prefix>.>`) when it does not
    /// exist, or add those subjects to it when it does not take them (gateways sharing a stream).
    /// When false, an operator makes the stream, and one missing or not taking the subjects is an
    /// error.
    #[serde(default = "NatsConfig::default_create")]
    pub create_jetstream: bool,
    /// The created stream's de-duplication window: a record sent again within it is stored once.
    #[serde(
        default = "NatsConfig::default_duplicate_window",
        deserialize_with = "duration"
    )]
    pub duplicate_window: Duration,
    /// Streams to publish; all when absent.
    #[serde(default)]
    pub streams: Option<Vec<String>>,
    /// Records published and not yet acknowledged, per stream, at most.
    #[serde(default = "NatsConfig::default_window")]
    pub window: usize,
    /// How each record is written: the `hubgate.v1.Record` protobuf, or an NGSI-LD entity.
    #[serde(default)]
    pub payload: NatsPayload,
    /// A file holding the server's authentication token (one line); it must not be readable by
    /// group or others.
    #[serde(default)]
    pub token_file: Option<std::path::PathBuf>,
    /// For a `tls://` server: the CA that signed its certificate (PEM); the system's roots when
    /// absent.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Longest wait between attempts after a failure (the wait doubles from 100 ms up to this).
    #[serde(
        default = "UpstreamConfig::default_backoff",
        deserialize_with = "duration"
    )]
    pub reconnect_backoff_max: Duration,
}

/// The message a record becomes on NATS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NatsPayload {
    /// `hubgate.v1.Record` in protobuf, as Subscribe sends it.
    #[default]
    Protobuf,
    /// An NGSI-LD entity in JSON, normalised form (see [`crate::sinks::ngsi_ld`]).
    NgsiLd,
}

impl NatsConfig {
    fn default_subject_prefix() -> String {
        "hubgate".into()
    }
    fn default_jetstream() -> String {
        "HUBGATE".into()
    }
    fn default_create() -> bool {
        true
    }
    fn default_duplicate_window() -> Duration {
        Duration::from_secs(600)
    }
    fn default_window() -> usize {
        1024
    }
}

/// Whether `origin` is a usable origin name: 1 to 64 of letters, digits, '.', '_' and '-'.
pub fn valid_origin(origin: &str) -> bool {
    (1..=64).contains(&origin.len())
        && origin
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Connection to the MQTT broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// Client identifier. The session is persistent (`clean_session = false`), so the broker
    /// keeps QoS 1 messages for this id while the gateway is away: give each gateway its own.
    pub client_id: String,
    #[serde(deserialize_with = "duration")]
    pub keep_alive: Duration,
    /// Largest message payload accepted; larger messages are dropped on arrival and counted
    /// (`hubgate_mqtt_messages_oversized_total`). Packets beyond the read limit
    /// ([`crate::sources::mqtt::read_limit`]) cannot be read at all: cap the broker's packet size below it.
    pub max_packet_bytes: usize,
    /// Messages waiting between the MQTT connection and the privacy chain. When full, the gateway
    /// stops reading from the broker (backpressure) instead of buffering more.
    pub queue_capacity: usize,
    /// Messages per second each topic may send (and its burst); more are dropped and counted.
    /// Off when absent.
    pub rate_limit: Option<Limit>,
    /// Messages per second each device may send, the device named by a payload field; more are
    /// dropped and counted. Off when absent.
    pub device_rate_limit: Option<DeviceLimit>,
    /// TLS to the broker (`mqtts`, usually port 8883).
    pub tls: Option<MqttTlsConfig>,
    /// User name at the broker, if it wants one.
    pub username: Option<String>,
    /// A file holding the broker password (one line); it must not be readable by group or
    /// others. The environment variable `HUBGATE_MQTT_PASSWORD` may hold it instead.
    pub password_file: Option<std::path::PathBuf>,
    /// Longest wait between reconnection attempts (the wait doubles from 100 ms up to this).
    #[serde(deserialize_with = "duration")]
    pub reconnect_backoff_max: Duration,
    /// Subscribe as a member of this shared-subscription group (`$share/<group>/<filter>`), so
    /// that the broker deals each message to one gateway of the group. Off when absent.
    pub shared_group: Option<String>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: "hubgate".into(),
            keep_alive: Duration::from_secs(30),
            max_packet_bytes: 256 * 1024,
            queue_capacity: 4096,
            rate_limit: None,
            device_rate_limit: None,
            tls: None,
            username: None,
            password_file: None,
            reconnect_backoff_max: Duration::from_secs(30),
            shared_group: None,
        }
    }
}

/// The gRPC API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// Address to listen on; port 0 picks a free port (printed at start).
    pub listen: SocketAddr,
    /// TLS for the API, and client certificates (mTLS) when `client_ca_file` is set.
    pub tls: Option<TlsConfig>,
    /// Serve on a non-loopback address without TLS (only behind a proxy that terminates TLS).
    pub allow_insecure_remote: bool,
    /// Subscribe and WatchFootprint calls open at once, at most; more are refused
    /// (`RESOURCE_EXHAUSTED`).
    pub max_subscribers: usize,
    /// Push calls open at once, at most (an origin gateway holds one per forwarded stream); more
    /// are refused (`RESOURCE_EXHAUSTED`).
    pub max_push_calls: usize,
    /// Streams one Subscribe call may follow, at most (each is followed by a task of its own);
    /// more are refused (`RESOURCE_EXHAUSTED`).
    pub max_streams_per_subscription: usize,
    /// Clients' bearer tokens, by digest, with their scopes (see [`crate::sinks::grpc::auth`]). None: the API
    /// is open.
    #[serde(rename = "token")]
    pub tokens: Vec<TokenConfig>,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            tls: None,
            allow_insecure_remote: false,
            max_subscribers: 256,
            max_push_calls: 256,
            max_streams_per_subscription: 64,
            tokens: Vec::new(),
        }
    }
}

/// TLS to the broker: `[mqtt.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttTlsConfig {
    /// The CA that signed the broker's certificate (PEM). The broker's certificate must name
    /// `mqtt.host`.
    pub ca_file: std::path::PathBuf,
    /// A client certificate and key (PEM), for a broker that wants one; the key must not be
    /// readable by group or others.
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
}

/// The gRPC API's TLS: `[grpc.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM).
    pub cert_file: std::path::PathBuf,
    /// Its private key (PEM); must not be readable by group or others.
    pub key_file: std::path::PathBuf,
    /// When set, clients must present a certificate signed by this CA (PEM): mutual TLS.
    pub client_ca_file: Option<std::path::PathBuf>,
}

/// One client's token: `[[grpc.token]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it (for the operator; never logged).
    pub name: String,
    /// SHA-256 of the token, lowercase hex (`hubgate token new` prints it).
    pub sha256: String,
    /// Streams it may subscribe to; `["*"]` for all.
    #[serde(default)]
    pub streams: Vec<String>,
    /// May read the policy and register (`GetPolicy`).
    #[serde(default)]
    pub policy: bool,
    /// May read the footprint (`GetFootprint`, `WatchFootprint`).
    #[serde(default)]
    pub footprint: bool,
    /// May push records (`Push`): for origin gateways.
    #[serde(default)]
    pub push: bool,
    /// The origin names it may push as (`upstream.origin` of the gateways that hold it); any
    /// when empty.
    #[serde(default)]
    pub origins: Vec<String>,
}

/// The admin HTTP endpoint (`/metrics`, `/healthz`, `/readyz`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address to listen on; port 0 picks a free port (printed at start).
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// The store of filtered records that Subscribe replays from: the durable outbox on disk, and the
/// newest records of each stream in memory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Where the gateway keeps its state (the outbox and the privacy-budget ledger); relative paths
    /// are taken from the working directory.
    pub data_dir: std::path::PathBuf,
    /// Bytes of records the outbox may hold over all streams, e.g. "1GiB"; what happens beyond is
    /// `on_full`.
    #[serde(deserialize_with = "byte_size")]
    pub max_bytes: u64,
    /// What happens when the outbox is full: `drop_oldest` (the oldest records are purged) or
    /// `stop_acking` (nothing more is taken from the broker, which holds the messages, until
    /// retention frees room).
    pub on_full: OnFull,
    /// Newest records held in memory per stream, so live subscribers do not read the disk; one
    /// further behind than this reads from it.
    pub memory_records_per_stream: usize,
    /// The outbox's storage engine: `redb` (`<data_dir>/outbox/outbox.redb` and its write-ahead
    /// log `outbox.log`, in builds with the `redb` feature, the default) or `sled`
    /// (`<data_dir>/outbox/sled/`).
    pub engine: Engine,
    /// Shortest time between the starts of two commits of the outbox (default "1ms"): messages
    /// that arrive sooner join the next commit. A commit costs a fixed amount of CPU and disk
    /// writes, whatever it holds, besides its records' own share, so a longer interval costs less
    /// per reading at moderate rates, and adds up to as much latency (records reach subscribers,
    /// and QoS 1 messages are acknowledged, only once committed). "0s" commits each turn as soon
    /// as the last commit is done.
    #[serde(deserialize_with = "duration")]
    pub commit_interval: Duration,
    /// Longest time between the starts of two commits under load (default "5ms"; never less
    /// than `commit_interval`). Under sustained traffic commits are spaced by 1 ms per 20,000
    /// messages a second taken in, within `commit_interval` and this: fewer, larger commits
    /// when there are many readings to commit, at some latency, and the shortest wait when
    /// there are few.
    #[serde(deserialize_with = "duration")]
    pub commit_interval_max: Duration,
}

/// The outbox's storage engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    Sled,
    Redb,
}

/// What happens when the outbox is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    DropOldest,
    StopAcking,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            data_dir: "hubgate-data".into(),
            max_bytes: 1 << 30,
            on_full: OnFull::DropOldest,
            memory_records_per_stream: 512,
            engine: if cfg!(feature = "redb") {
                Engine::Redb
            } else {
                Engine::Sled
            },
            commit_interval: DEFAULT_COMMIT_INTERVAL,
            commit_interval_max: DEFAULT_COMMIT_INTERVAL_MAX,
        }
    }
}

/// `store.commit_interval` when none is given. At 10,000 readings/s it halves the gateway's CPU
/// against "0s", within the latency goals (BENCHMARKS.md).
const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_millis(1);

/// `store.commit_interval_max` when none is given: at full load on the benchmark machine it cuts
/// commits from about 400 to 200 a second (BENCHMARKS.md).
const DEFAULT_COMMIT_INTERVAL_MAX: Duration = Duration::from_millis(5);

/// Longest `store.commit_interval` and `store.commit_interval_max` accepted.
const MAX_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// A size in bytes: an integer, or a string with a unit ("512MiB", "2GB", "64KiB").
fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    let text = match Size::deserialize(d)? {
        Size::Bytes(n) => return Ok(n),
        Size::Text(t) => t,
    };
    parse_byte_size(&text).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "invalid size '{text}' (write e.g. \"512MiB\", \"2GB\" or a number of bytes)"
        ))
    })
}

fn parse_byte_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(multiplier)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration '{text}' (write e.g. \"30s\"): {e}"
        ))
    })
}

/// The limit: a sustained rate and a burst, per topic or device.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Messages per second each topic or device may sustain.
    pub per_second: f64,
    /// Messages a topic or device may send at once after a quiet spell.
    pub burst: f64,
}

impl Limit {
    /// Whether the limit can be met: a positive, finite rate and a burst of at least one.
    pub fn is_valid(&self) -> bool {
        self.per_second.is_finite() && self.per_second > 0.0 && self.burst >= 1.0
    }
}

/// `mqtt.device_rate_limit`: a limit per device, the device named by a payload field.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceLimit {
    /// The payload field that names the device (a flattened path such as `device.id`).
    /// Readings without it are held only to their topic's limit.
    pub field: String,
    pub per_second: f64,
    pub burst: f64,
}

impl DeviceLimit {
    pub fn limit(&self) -> Limit {
        Limit {
            per_second: self.per_second,
            burst: self.burst,
        }
    }
}

/// A configuration that was rejected, with every problem found.
#[derive(Debug)]
pub struct Rejected {
    pub diagnostics: Vec<Diagnostic>,
}

/// Parses and validates a configuration file's text.
///
/// On success, also returns the warnings (weak but accepted settings).
pub fn parse(source: &str) -> Result<(Config, Vec<Diagnostic>), Rejected> {
    let doc = diagnostics::parse_document(source).map_err(|d| Rejected {
        diagnostics: d.into_sorted(),
    })?;
    let mut diags = Diagnostics::default();
    let (mut mqtt, mut grpc, mut admin, mut store) = Default::default();
    let mut upstream: Option<UpstreamConfig> = None;
    let mut upstream_span = 0..0;
    let mut nats: Option<NatsConfig> = None;
    let mut nats_span = 0..0;
    let mut footprint: Option<FootprintConfig> = None;
    let mut footprint_span = 0..0;
    let mut grpc_span = 0..0;
    let mut register: Option<RegisterConfig> = None;
    let mut register_span = 0..0;
    let mut audit: Option<AuditConfig> = None;
    let mut audit_span = 0..0;
    let mut raw_streams = None;
    let whole = 0..source.len().min(1);
    let (mut mqtt_span, mut store_span) = (whole.clone(), whole.clone());
    for (key, value) in doc {
        match key.get_ref().as_ref() {
            "mqtt" => {
                mqtt_span = key.span();
                mqtt = diags.section(value);
            }
            "grpc" => {
                grpc_span = key.span();
                grpc = diags.section(value);
            }
            "admin" => admin = diags.section(value),
            "store" => {
                store_span = key.span();
                store = diags.section(value);
            }
            "upstream" => {
                upstream_span = key.span();
                upstream = diags.section(value);
            }
            "nats" => {
                nats_span = key.span();
                nats = diags.section(value);
            }
            "footprint" => {
                footprint_span = key.span();
                footprint = diags.section(value);
            }
            "register" => {
                register_span = key.span();
                register = diags.section(value);
            }
            "audit" => {
                audit_span = key.span();
                audit = diags.section(value);
            }
            "stream" => raw_streams = Some(policy::parse_streams(value, &mut diags)),
            other => diags.error(
                key.span(),
                format!("unknown section '{other}', expected one of 'mqtt', 'grpc', 'admin', 'store', 'upstream', 'nats', 'footprint', 'register', 'audit', 'stream'"),
            ),
        }
    }
    let mqtt: MqttConfig = mqtt.unwrap_or_default();
    let grpc: GrpcConfig = grpc.unwrap_or_default();
    let admin: AdminConfig = admin.unwrap_or_default();
    let store: StoreConfig = store.unwrap_or_default();
    if mqtt.client_id.is_empty() {
        diags.error(
            mqtt_span.clone(),
            "mqtt.client_id must not be empty (the session is persistent)",
        );
    }
    if let Some(group) = &mqtt.shared_group
        && (group.is_empty() || group.contains(['/', '+', '#']))
    {
        diags.error(
            mqtt_span.clone(),
            "mqtt.shared_group must be a name without '/', '+' or '#'",
        );
    }
    if let Some(limit) = mqtt.rate_limit
        && !limit.is_valid()
    {
        diags.error(
            mqtt_span.clone(),
            "mqtt.rate_limit needs per_second above 0 and a burst of at least 1",
        );
    }
    if let Some(device) = &mqtt.device_rate_limit {
        if !device.limit().is_valid() {
            diags.error(
                mqtt_span.clone(),
                "mqtt.device_rate_limit needs per_second above 0 and a burst of at least 1",
            );
        }
        if device.field.is_empty() {
            diags.error(
                mqtt_span.clone(),
                "mqtt.device_rate_limit.field must name the payload field that names the device",
            );
        }
    }
    if let Some(tls) = &mqtt.tls
        && tls.cert_file.is_some() != tls.key_file.is_some()
    {
        diags.error(
            mqtt_span.clone(),
            "mqtt.tls.cert_file and mqtt.tls.key_file go together",
        );
    }
    if mqtt.password_file.is_some() && mqtt.username.is_none() {
        diags.error(
            mqtt_span.clone(),
            "mqtt.password_file is set but mqtt.username is not",
        );
    }
    if mqtt.queue_capacity == 0 {
        diags.error(mqtt_span.clone(), "mqtt.queue_capacity must be at least 1");
    }
    if mqtt.max_packet_bytes < 1024 {
        diags.error(mqtt_span, "mqtt.max_packet_bytes must be at least 1024");
    }
    if store.memory_records_per_stream == 0 {
        diags.error(
            store_span.clone(),
            "store.memory_records_per_stream must be at least 1",
        );
    }
    if store.max_bytes < 1 << 16 {
        diags.error(store_span.clone(), "store.max_bytes must be at least 64KiB");
    }
    if store.commit_interval > MAX_COMMIT_INTERVAL {
        diags.error(
            store_span.clone(),
            "store.commit_interval must be at most 1s (it delays every record and acknowledgement)",
        );
    }
    if store.commit_interval_max > MAX_COMMIT_INTERVAL {
        diags.error(
            store_span.clone(),
            "store.commit_interval_max must be at most 1s (it delays every record and acknowledgement)",
        );
    }
    if store.engine == Engine::Redb && !cfg!(feature = "redb") {
        diags.error(
            store_span,
            "store.engine = \"redb\" needs a build with the redb feature (cargo build --features redb)",
        );
    }
    if raw_streams.is_none() {
        diags.error(
            whole,
            "no [[stream]] is declared: the gateway would pass nothing",
        );
    }
    let raw_streams = raw_streams.unwrap_or_default();
    let policy = policy::compile(raw_streams, &mut diags);
    if let Some(up) = &upstream {
        check_upstream(up, policy.as_ref(), upstream_span, &mut diags);
    }
    if let Some(nats) = &nats {
        check_nats(nats, policy.as_ref(), nats_span, &mut diags);
    }
    let footprint = footprint.unwrap_or_default();
    for problem in footprint.problems() {
        diags.error(footprint_span.clone(), problem);
    }
    let register = register.unwrap_or_default();
    check_register(&register, register_span, &mut diags);
    check_grpc(&grpc, policy.as_ref(), grpc_span, &mut diags);
    let audit = audit.unwrap_or_default();
    if audit.retention < Duration::from_secs(86_400) {
        diags.error(audit_span, "audit.retention must be at least 1 day");
    }
    match policy {
        Some(policy) if !diags.has_errors() => {
            let config = Config {
                mqtt,
                grpc,
                admin,
                store,
                upstream,
                nats,
                footprint,
                register,
                audit,
                policy,
            };
            Ok((config, diags.into_sorted()))
        }
        _ => Err(Rejected {
            diagnostics: diags.into_sorted(),
        }),
    }
}

fn check_grpc(
    grpc: &GrpcConfig,
    policy: Option<&Policy>,
    span: std::ops::Range<usize>,
    diags: &mut Diagnostics,
) {
    if !grpc.listen.ip().is_loopback() && grpc.tls.is_none() && !grpc.allow_insecure_remote {
        diags.error(
            span.clone(),
            format!(
                "grpc.listen {} is not a loopback address: configure [grpc.tls], or, behind a proxy that terminates TLS, set grpc.allow_insecure_remote = true",
                grpc.listen
            ),
        );
    }
    if !grpc.listen.ip().is_loopback() && grpc.tokens.is_empty() {
        diags.warning(
            span.clone(),
            "the gRPC API is open to anyone who can reach it: give clients tokens ([[grpc.token]])",
        );
    }
    if grpc.max_subscribers == 0 {
        diags.error(span.clone(), "grpc.max_subscribers must be at least 1");
    }
    if grpc.max_push_calls == 0 {
        diags.error(span.clone(), "grpc.max_push_calls must be at least 1");
    }
    if grpc.max_streams_per_subscription == 0 {
        diags.error(
            span.clone(),
            "grpc.max_streams_per_subscription must be at least 1",
        );
    }
    let mut names = std::collections::HashSet::new();
    for token in &grpc.tokens {
        let valid_name = !token.name.is_empty()
            && token.name.len() <= 64
            && token
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !valid_name {
            diags.error(
                span.clone(),
                "grpc.token name must be 1 to 64 letters, digits, '.', '_' or '-'",
            );
        } else if !names.insert(token.name.as_str()) {
            diags.error(
                span.clone(),
                format!("grpc.token '{}' is declared twice", token.name),
            );
        }
        if !(token.sha256.len() == 64
            && token
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        {
            diags.error(
                span.clone(),
                format!(
                    "grpc.token '{}': sha256 must be 64 lowercase hex digits (the token's SHA-256, never the token)",
                    token.name
                ),
            );
        }
        if let Some(policy) = policy {
            for stream in &token.streams {
                if stream != "*" && policy.stream(stream).is_none() {
                    diags.error(
                        span.clone(),
                        format!(
                            "grpc.token '{}' names stream '{stream}', which the policy does not declare",
                            token.name
                        ),
                    );
                }
            }
        }
        if token.push && token.origins.is_empty() {
            diags.warning(
                span.clone(),
                format!(
                    "grpc.token '{}' may push records as any origin: name its origins",
                    token.name
                ),
            );
        }
        if token.streams.is_empty() && !token.policy && !token.footprint && !token.push {
            diags.warning(
                span.clone(),
                format!("grpc.token '{}' grants nothing", token.name),
            );
        }
    }
}

fn check_register(
    register: &RegisterConfig,
    span: std::ops::Range<usize>,
    diags: &mut Diagnostics,
) {
    let span = if span.is_empty() { 0..0 } else { span };
    if register
        .controller
        .as_deref()
        .is_none_or(|c| c.trim().is_empty())
    {
        diags.warning(
            span.clone(),
            "[register] names no controller: the transparency register cannot say who is accountable for the hub",
        );
    }
    if let Some(url) = &register.public_url
        && !(url.starts_with("https://") || url.starts_with("http://"))
    {
        diags.error(
            span.clone(),
            format!("register.public_url '{url}' must be an http:// or https:// address"),
        );
    }
    if let Some(date) = &register.end_date
        && humantime::parse_rfc3339(&format!("{date}T00:00:00Z")).is_err()
    {
        diags.error(
            span,
            format!("register.end_date '{date}' must be a date written YYYY-MM-DD"),
        );
    }
}

fn check_upstream(
    up: &UpstreamConfig,
    policy: Option<&Policy>,
    span: std::ops::Range<usize>,
    diags: &mut Diagnostics,
) {
    let https = up.endpoint.starts_with("https://");
    if !(https || up.endpoint.starts_with("http://")) {
        diags.error(
            span.clone(),
            format!(
                "upstream.endpoint '{}' must be https://host:port (or http:// on a trusted network)",
                up.endpoint
            ),
        );
    }
    if !https && (up.ca_file.is_some() || up.cert_file.is_some()) {
        diags.error(
            span.clone(),
            "upstream.ca_file and upstream.cert_file need an https:// endpoint",
        );
    }
    if up.cert_file.is_some() != up.key_file.is_some() {
        diags.error(
            span.clone(),
            "upstream.cert_file and upstream.key_file go together",
        );
    }
    if !valid_origin(&up.origin) {
        diags.error(
            span.clone(),
            "upstream.origin must be 1 to 64 letters, digits, '.', '_' or '-'",
        );
    }
    if up.batch == 0 || up.batch > 4096 {
        diags.error(span.clone(), "upstream.batch must be between 1 and 4096");
    }
    if up.window < up.batch as u64 {
        diags.error(
            span.clone(),
            "upstream.window must be at least upstream.batch",
        );
    }
    if let (Some(names), Some(policy)) = (&up.streams, policy) {
        for name in names {
            if !policy.streams().iter().any(|s| &s.name == name) {
                diags.error(
                    span.clone(),
                    format!("upstream.streams names '{name}', which no [[stream]] declares"),
                );
            }
        }
    }
}

/// A NATS subject token: letters, digits, '-' and '_' (no '.', '*', '>' or space).
fn subject_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

fn check_nats(
    nats: &NatsConfig,
    policy: Option<&Policy>,
    span: std::ops::Range<usize>,
    diags: &mut Diagnostics,
) {
    let tls = nats.url.starts_with("tls://");
    if !(tls || nats.url.starts_with("nats://")) {
        diags.error(
            span.clone(),
            format!(
                "nats.url '{}' must be tls://host:port (or nats:// on a trusted network)",
                nats.url
            ),
        );
    }
    if !tls && nats.ca_file.is_some() {
        diags.error(span.clone(), "nats.ca_file needs a tls:// url");
    }
    if !nats.subject_prefix.split('.').all(subject_token) {
        diags.error(
            span.clone(),
            "nats.subject_prefix must be subject tokens (letters, digits, '-', '_') separated by '.'",
        );
    }
    if !subject_token(&nats.jetstream) {
        diags.error(
            span.clone(),
            "nats.jetstream must be a stream name: letters, digits, '-' and '_'",
        );
    }
    if !(1..=16_384).contains(&nats.window) {
        diags.error(span.clone(), "nats.window must be between 1 and 16384");
    }
    if nats.url.contains('@') {
        diags.error(
            span.clone(),
            "nats.url must not hold credentials: put the token in nats.token_file",
        );
    }
    if nats.duplicate_window < Duration::from_secs(1) {
        diags.error(span.clone(), "nats.duplicate_window must be at least 1s");
    }
    if let (Some(names), Some(policy)) = (&nats.streams, policy) {
        for name in names {
            if !policy.streams().iter().any(|s| &s.name == name) {
                diags.error(
                    span.clone(),
                    format!("nats.streams names '{name}', which no [[stream]] declares"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hubgate_privacy::Severity;

    #[test]
    fn the_default_config_is_valid() {
        let (config, warnings) =
            parse(DEFAULT_CONFIG).unwrap_or_else(|r| panic!("{:?}", r.diagnostics));
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(config.policy.streams().len(), 4);
    }

    #[test]
    fn a_typo_is_reported_at_its_line_and_column() {
        let src = format!("[mqtt]\nhost = \"broker\"\n  precison = 7\n\n{DEFAULT_CONFIG}")
            .replacen("[mqtt]\nhost = \"127.0.0.1\"", "", 1);
        let err = parse(&src).unwrap_err();
        let errors: Vec<_> = err
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .collect();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].message.starts_with("unknown field 'precison'"),
            "{}",
            errors[0].message
        );
        assert_eq!(errors[0].position(&src), (3, 3));
    }

    #[test]
    fn store_sizes_take_units() {
        assert_eq!(parse_byte_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_byte_size("2GB"), Some(2_000_000_000));
        assert_eq!(parse_byte_size("4096"), Some(4096));
        assert_eq!(parse_byte_size("1 GiB"), Some(1 << 30));
        assert_eq!(parse_byte_size("1.5GB"), None);
        assert_eq!(parse_byte_size("12parsecs"), None);
        let src =
            format!("[store]\nmax_bytes = \"8MiB\"\non_full = \"stop_acking\"\n{DEFAULT_CONFIG}");
        let (config, _) = parse(&src).unwrap_or_else(|r| panic!("{:?}", r.diagnostics));
        assert_eq!(config.store.max_bytes, 8 << 20);
        assert_eq!(config.store.on_full, OnFull::StopAcking);
        let src = format!("[store]\nmax_bytes = \"lots\"\n{DEFAULT_CONFIG}");
        let err = parse(&src).unwrap_err();
        assert_eq!(
            err.diagnostics[0].position(&src),
            (2, 13),
            "{:?}",
            err.diagnostics
        );
        assert!(err.diagnostics[0].message.contains("invalid size 'lots'"));
    }

    #[test]
    fn commit_interval_is_a_duration_of_at_most_a_second() {
        let (config, _) = parse(DEFAULT_CONFIG).unwrap_or_else(|r| panic!("{:?}", r.diagnostics));
        assert_eq!(config.store.commit_interval, Duration::from_millis(1));
        let src = format!("[store]\ncommit_interval = \"10ms\"\n{DEFAULT_CONFIG}");
        let (config, _) = parse(&src).unwrap_or_else(|r| panic!("{:?}", r.diagnostics));
        assert_eq!(config.store.commit_interval, Duration::from_millis(10));
        assert_eq!(config.store.commit_interval_max, Duration::from_millis(5));
        let src = format!("[store]\ncommit_interval_max = \"2s\"\n{DEFAULT_CONFIG}");
        let err = parse(&src).unwrap_err();
        assert!(
            err.diagnostics[0]
                .message
                .contains("commit_interval_max must be at most 1s"),
            "{:?}",
            err.diagnostics
        );
        let src = format!("[store]\ncommit_interval = \"5s\"\n{DEFAULT_CONFIG}");
        let err = parse(&src).unwrap_err();
        assert!(
            err.diagnostics[0].message.contains("at most 1s"),
            "{:?}",
            err.diagnostics
        );
    }

    #[test]
    fn footprint_settings_are_checked() {
        let (config, _) = parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(config.footprint.grid_intensity_g_per_kwh, None);
        assert_eq!(config.footprint.embodied_kg, 30.0);
        let src = format!(
            "[footprint]\ngrid_intensity_g_per_kwh = 250.0\nembodied_kg = 4000.0\n{DEFAULT_CONFIG}"
        );
        let (config, _) = parse(&src).unwrap_or_else(|r| panic!("{:?}", r.diagnostics));
        assert_eq!(config.footprint.grid_intensity_g_per_kwh, Some(250.0));
        let src = format!(
            "[footprint]\nlifetime_years = 0.0\nhardware_share = 2.0\nidle_watts_per_vcpu = 5.0\n\
             sample_every = \"100ms\"\ngrid_zone = \"DE\"\n{DEFAULT_CONFIG}"
        );
        let err = parse(&src).unwrap_err();
        let messages: Vec<&str> = err.diagnostics.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(messages.len(), 5, "{messages:?}");
        assert!(messages.iter().any(|m| m.contains("sample_every")));
        assert!(
            messages
                .iter()
                .any(|m| m.contains("grid_zone names a zone"))
        );
        assert!(err.diagnostics.iter().all(|d| d.position(&src).0 == 1));
    }

    #[test]
    fn a_shared_group_is_a_plain_name() {
        let with = |group: &str| {
            DEFAULT_CONFIG.replacen(
                "[mqtt]\n",
                &format!("[mqtt]\nshared_group = {group:?}\n"),
                1,
            )
        };
        let (config, _) = parse(&with("hubgate")).unwrap();
        assert_eq!(config.mqtt.shared_group.as_deref(), Some("hubgate"));
        for bad in ["", "a/b", "g+", "#"] {
            let e = parse(&with(bad)).unwrap_err().diagnostics;
            assert!(
                e.iter().any(|d| d.message.contains("mqtt.shared_group")),
                "{bad}"
            );
        }
    }

    #[test]
    fn nats_settings_are_checked() {
        let with = |nats: &str| format!("[nats]\n{nats}\n{DEFAULT_CONFIG}");
        let (config, _) = parse(&with("url = \"nats://127.0.0.1:4222\"")).unwrap();
        let nats = config.nats.unwrap();
        assert_eq!(
            (nats.subject_prefix.as_str(), nats.jetstream.as_str()),
            ("hubgate", "HUBGATE")
        );
        assert!(nats.create_jetstream);
        let errors = |src: &str| -> Vec<String> {
            parse(&with(src))
                .unwrap_err()
                .diagnostics
                .into_iter()
                .map(|d| d.message)
                .collect()
        };
        let e = errors(
            "url = \"http://x:4222\"\nsubject_prefix = \"city.>\"\njetstream = \"a.b\"\nwindow = 0\nstreams = [\"nope\"]",
        );
        for expected in [
            "nats.url 'http://x:4222'",
            "nats.subject_prefix",
            "nats.jetstream",
            "nats.window",
            "nats.streams names 'nope'",
        ] {
            assert!(e.iter().any(|m| m.contains(expected)), "{expected}: {e:?}");
        }
        let e = errors("url = \"nats://x:4222\"\nca_file = \"/ca.pem\"");
        assert!(
            e.iter()
                .any(|m| m.contains("nats.ca_file needs a tls:// url"))
        );
        let e = errors("url = \"nats://user:secret@x:4222\"");
        assert!(e.iter().any(|m| m.contains("must not hold credentials")));
    }

    #[test]
    fn upstream_settings_are_checked() {
        let with = |upstream: &str| format!("[upstream]\n{upstream}\n{DEFAULT_CONFIG}");
        let ok =
            with("endpoint = \"http://hub:50051\"\norigin = \"district-1\"\nstreams = [\"noise\"]");
        let (config, _) = parse(&ok).unwrap_or_else(|r| panic!("{:?}", r.diagnostics));
        let up = config.upstream.unwrap();
        assert_eq!((up.batch, up.window), (256, 4096));
        let errors = |src: &str| -> Vec<String> {
            parse(src)
                .unwrap_err()
                .diagnostics
                .into_iter()
                .map(|d| d.message)
                .collect()
        };
        let e = errors(&with(
            "endpoint = \"ftp://hub\"\norigin = \"district 1\"\nstreams = [\"weather\"]\nbatch = 0\n\
             cert_file = \"gw.crt\"",
        ));
        assert_eq!(e.len(), 6, "{e:?}");
        assert!(e.iter().any(|m| m.contains("must be https://host:port")));
        assert!(e.iter().any(|m| m.contains("need an https:// endpoint")));
        assert!(
            e.iter()
                .any(|m| m.contains("cert_file and upstream.key_file go together"))
        );
        assert!(e.iter().any(|m| m.contains("upstream.origin")));
        assert!(e.iter().any(|m| m.contains("'weather'")));
        assert!(e.iter().any(|m| m.contains("upstream.batch")));
    }

    #[test]
    fn register_settings_are_checked() {
        let src = format!(
            "[register]\npublic_url = \"example.city/t\"\nend_date = \"31/12/2030\"\n{}",
            DEFAULT_CONFIG.replace("[register]", "[register_unused]")
        );
        // (The default's own [register] is renamed, so the one above is the only one.)
        let err = parse(&src).unwrap_err();
        let messages: Vec<&str> = err
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .map(|d| d.message.as_str())
            .collect();
        assert!(
            messages
                .iter()
                .any(|m| m.contains("public_url 'example.city/t'")),
            "{messages:?}"
        );
        assert!(
            messages.iter().any(|m| m.contains("end_date '31/12/2030'")),
            "{messages:?}"
        );
        // Without a controller: a warning, not an error.
        let src = DEFAULT_CONFIG.replace("controller = ", "# controller = ");
        let (config, warnings) = parse(&src).unwrap_or_else(|r| panic!("{:?}", r.diagnostics));
        assert_eq!(config.register.controller, None);
        assert!(
            warnings
                .iter()
                .any(|w| w.message.contains("names no controller"))
        );
    }

    #[test]
    fn the_audit_retention_is_read_and_checked() {
        let (config, _) = parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(config.audit.retention, DEFAULT_AUDIT_RETENTION);
        let (config, _) =
            parse(&format!("[audit]\nretention = \"400d\"\n{DEFAULT_CONFIG}")).unwrap();
        assert_eq!(config.audit.retention.as_secs(), 400 * 86_400);
        let err = parse(&format!("[audit]\nretention = \"2h\"\n{DEFAULT_CONFIG}")).unwrap_err();
        assert!(err.diagnostics.iter().any(|d| {
            d.message.contains("audit.retention must be at least 1 day")
                && d.position(&format!("[audit]\nretention = \"2h\"\n{DEFAULT_CONFIG}"))
                    .0
                    == 1
        }));
    }

    #[test]
    fn rate_limits_are_read_and_checked() {
        let with =
            |mqtt: &str| DEFAULT_CONFIG.replacen("[mqtt]\n", &format!("[mqtt]\n{mqtt}\n"), 1);
        let (config, _) = parse(&with(
            "rate_limit = { per_second = 2.0, burst = 20.0 }\n\
             device_rate_limit = { field = \"sensor.id\", per_second = 0.5, burst = 5.0 }",
        ))
        .unwrap_or_else(|r| panic!("{:?}", r.diagnostics));
        let device = config.mqtt.device_rate_limit.unwrap();
        assert_eq!(device.field, "sensor.id");
        assert_eq!(config.mqtt.rate_limit.unwrap().burst, 20.0);
        let src = with(
            "rate_limit = { per_second = 0.0, burst = 20.0 }\n\
             device_rate_limit = { field = \"\", per_second = 1.0, burst = 0.5 }",
        );
        let messages: Vec<_> = parse(&src)
            .unwrap_err()
            .diagnostics
            .into_iter()
            .map(|d| d.message)
            .collect();
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("mqtt.rate_limit needs"))
        );
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("mqtt.device_rate_limit needs"))
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("device_rate_limit.field"))
        );
        let src = with("device_rate_limit = { per_second = 1.0, burst = 5.0 }");
        assert!(parse(&src).is_err(), "the field is required");
    }

    #[test]
    fn errors_in_several_sections_are_all_reported() {
        let src = "[grpc]\nlisten = \"nowhere\"\n[admin]\nport = 1\n[telemetry]\n";
        let err = parse(src).unwrap_err();
        let lines: Vec<_> = err
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .map(|d| d.position(src).0)
            .collect();
        assert_eq!(lines, [1, 2, 4, 5], "{:?}", err.diagnostics);
        assert!(
            err.diagnostics
                .iter()
                .any(|d| d.message.contains("no [[stream]] is declared"))
        );
    }

    mod mangled {
        use super::*;
        use proptest::prelude::*;

        fn boundary(s: &str, at: usize) -> usize {
            let mut at = at.min(s.len());
            while !s.is_char_boundary(at) {
                at -= 1;
            }
            at
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(96))]
            /// A valid configuration with a piece cut off and a few characters inserted
            /// anywhere: the parser answers, never panics, and every diagnostic points inside
            /// the text.
            #[test]
            fn mangled_configurations_get_an_answer(
                insert in "[a-z0-9\\[\\]{}=\"', .#\n\t-]{0,12}",
                at in 0usize..6000,
                keep in 0usize..6000,
            ) {
                let mut src = DEFAULT_CONFIG.to_owned();
                let at = boundary(&src, at);
                src.insert_str(at, &insert);
                let keep = boundary(&src, keep.max(at));
                src.truncate(keep);
                let diagnostics = match parse(&src) {
                    Ok((_, warnings)) => warnings,
                    Err(rejected) => rejected.diagnostics,
                };
                let lines = src.lines().count().max(1);
                for d in &diagnostics {
                    let (line, column) = d.position(&src);
                    prop_assert!((1..=lines + 1).contains(&line) && column >= 1, "{line}:{column}");
                }
            }
        }
    }
}
