//! `[nats]`: the NATS JetStream server the filtered streams are published to.

use std::time::Duration;

use hubgate_privacy::Policy;
use hubgate_privacy::diagnostics::Diagnostics;
use serde::Deserialize;

use super::UpstreamConfig;
use super::keys::Keys;
use super::units::duration;

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

/// A NATS subject token: letters, digits, '-' and '_' (no '.', '*', '>' or space).
fn subject_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

impl NatsConfig {
    pub(super) fn check(&self, keys: &Keys, policy: Option<&Policy>, diags: &mut Diagnostics) {
        let tls = self.url.starts_with("tls://");
        if !(tls || self.url.starts_with("nats://")) {
            diags.error(
                keys.at("url"),
                format!(
                    "nats.url '{}' must be tls://host:port (or nats:// on a trusted network)",
                    super::units::redacted(&self.url)
                ),
            );
        }
        if !tls && self.ca_file.is_some() {
            diags.error(keys.at("ca_file"), "nats.ca_file needs a tls:// url");
        }
        if !self.subject_prefix.split('.').all(subject_token) {
            diags.error(
                keys.at("subject_prefix"),
                "nats.subject_prefix must be subject tokens (letters, digits, '-', '_') separated by '.'",
            );
        }
        if !subject_token(&self.jetstream) {
            diags.error(
                keys.at("jetstream"),
                "nats.jetstream must be a stream name: letters, digits, '-' and '_'",
            );
        }
        if !(1..=16_384).contains(&self.window) {
            diags.error(keys.at("window"), "nats.window must be between 1 and 16384");
        }
        if self.duplicate_window < Duration::from_secs(1) {
            diags.error(
                keys.at("duplicate_window"),
                "nats.duplicate_window must be at least 1s",
            );
        }
        if let (Some(names), Some(policy)) = (&self.streams, policy) {
            super::check_stream_names("nats.streams", names, policy, keys, diags);
        }
    }
}
