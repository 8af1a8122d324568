//! `[mqtt]`: the connection to the broker, rate limits and TLS.

use std::time::Duration;

use hubgate_privacy::diagnostics::Diagnostics;
use serde::Deserialize;

use super::keys::Keys;
use super::units::{byte_size, duration};

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
    /// ([`MqttConfig::read_limit`]) cannot be read at all: cap the broker's packet size below it.
    pub max_packet_bytes: usize,
    /// The packet size limit set at the broker (mosquitto's `max_packet_size`), as the operator
    /// declares it. A packet over the gateway's read limit costs a reconnect and a second
    /// connection that skips it, so `check` warns unless the broker refuses such packets first.
    pub broker_max_packet_bytes: Option<usize>,
    /// Messages waiting between the MQTT connection and the privacy chain. When full, the gateway
    /// stops reading from the broker (backpressure) instead of buffering more.
    pub queue_capacity: usize,
    /// Payload bytes in flight between the connection and the end of the privacy chain, at
    /// most (the queue and the turn being processed); when spent, the gateway stops reading
    /// from the broker. Bounds memory whatever the payload sizes.
    #[serde(deserialize_with = "byte_size")]
    pub queue_bytes: u64,
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
            broker_max_packet_bytes: None,
            queue_capacity: 4096,
            queue_bytes: 2 << 20,
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

impl MqttConfig {
    /// The largest packet the client reads: 16 MiB, or twice `max_packet_bytes` if that is more.
    /// A larger packet breaks the connection and is skipped unread by a second connection
    /// ([`crate::sources::oversized`]); messages between `max_packet_bytes` and this are read,
    /// dropped and counted.
    pub fn read_limit(&self) -> usize {
        (16 << 20).max(self.max_packet_bytes.saturating_mul(2))
    }

    /// The broker's packet limit as declared, and the queue's byte budget.
    fn check_sizes(&self, keys: &Keys, diags: &mut Diagnostics) {
        let read_limit = self.read_limit();
        match self.broker_max_packet_bytes {
            None => diags.warning(
                keys.at("max_packet_bytes"),
                format!(
                    "the broker's packet size limit is not declared: make the broker refuse packets \
                     over {read_limit} bytes (mosquitto: max_packet_size), which the gateway cannot read, \
                     and declare it as mqtt.broker_max_packet_bytes"
                ),
            ),
            Some(limit) if limit > read_limit => diags.warning(
                keys.at("broker_max_packet_bytes"),
                format!(
                    "mqtt.broker_max_packet_bytes ({limit}) is above what the gateway reads \
                     ({read_limit} bytes): each larger message costs a reconnect and is dropped unread"
                ),
            ),
            Some(_) => {}
        }
        if self.queue_bytes < 64 << 10 || self.queue_bytes > 4 << 30 {
            diags.error(
                keys.at("queue_bytes"),
                "mqtt.queue_bytes must be between 64KiB and 4GiB",
            );
        } else if self.queue_bytes < self.max_packet_bytes as u64 {
            diags.warning(
                keys.at("queue_bytes"),
                "mqtt.queue_bytes is below mqtt.max_packet_bytes: a message that large is taken in only when nothing else is in flight",
            );
        }
    }

    pub(super) fn check(&self, keys: &Keys, diags: &mut Diagnostics) {
        if self.client_id.is_empty() {
            diags.error(
                keys.at("client_id"),
                "mqtt.client_id must not be empty (the session is persistent)",
            );
        }
        if let Some(group) = &self.shared_group
            && (group.is_empty() || group.contains(['/', '+', '#']))
        {
            diags.error(
                keys.at("shared_group"),
                "mqtt.shared_group must be a name without '/', '+' or '#'",
            );
        }
        if let Some(limit) = self.rate_limit
            && !limit.is_valid()
        {
            diags.error(
                keys.at("rate_limit"),
                "mqtt.rate_limit needs per_second above 0 and a burst of at least 1",
            );
        }
        if let Some(device) = &self.device_rate_limit {
            if !device.limit().is_valid() {
                diags.error(
                    keys.at("device_rate_limit"),
                    "mqtt.device_rate_limit needs per_second above 0 and a burst of at least 1",
                );
            }
            if device.field.is_empty() {
                diags.error(
                    keys.at("device_rate_limit.field"),
                    "mqtt.device_rate_limit.field must name the payload field that names the device",
                );
            }
        }
        if let Some(tls) = &self.tls
            && tls.cert_file.is_some() != tls.key_file.is_some()
        {
            diags.error(
                keys.written(&["tls.cert_file", "tls.key_file"]),
                "mqtt.tls.cert_file and mqtt.tls.key_file go together",
            );
        }
        if self.password_file.is_some() && self.username.is_none() {
            diags.error(
                keys.at("password_file"),
                "mqtt.password_file is set but mqtt.username is not",
            );
        }
        if self.queue_capacity == 0 {
            diags.error(
                keys.at("queue_capacity"),
                "mqtt.queue_capacity must be at least 1",
            );
        }
        self.check_sizes(keys, diags);
        if self.max_packet_bytes < 1024 {
            diags.error(
                keys.at("max_packet_bytes"),
                "mqtt.max_packet_bytes must be at least 1024",
            );
        }
    }
}
