//! `[upstream]`: the hub this gateway forwards its records to (gRPC Push).

use std::time::Duration;

use hubgate_privacy::Policy;
use hubgate_privacy::diagnostics::Diagnostics;
use serde::Deserialize;

use super::keys::Keys;
use super::units::duration;

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
    pub(super) fn default_backoff() -> Duration {
        Duration::from_secs(30)
    }
}

/// Whether `origin` is a usable origin name: 1 to 64 of letters, digits, '.', '_' and '-'.
pub fn valid_origin(origin: &str) -> bool {
    (1..=64).contains(&origin.len())
        && origin
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl UpstreamConfig {
    pub(super) fn check(&self, keys: &Keys, policy: Option<&Policy>, diags: &mut Diagnostics) {
        let https = self.endpoint.starts_with("https://");
        if !(https || self.endpoint.starts_with("http://")) {
            diags.error(
                keys.at("endpoint"),
                format!(
                    "upstream.endpoint '{}' must be https://host:port (or http:// on a trusted network)",
                    super::units::redacted(&self.endpoint)
                ),
            );
        }
        if !https && (self.ca_file.is_some() || self.cert_file.is_some()) {
            diags.error(
                keys.written(&["ca_file", "cert_file"]),
                "upstream.ca_file and upstream.cert_file need an https:// endpoint",
            );
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            diags.error(
                keys.written(&["cert_file", "key_file"]),
                "upstream.cert_file and upstream.key_file go together",
            );
        }
        if !valid_origin(&self.origin) {
            diags.error(
                keys.at("origin"),
                "upstream.origin must be 1 to 64 letters, digits, '.', '_' or '-'",
            );
        }
        if self.batch == 0 || self.batch > 4096 {
            diags.error(
                keys.at("batch"),
                "upstream.batch must be between 1 and 4096",
            );
        }
        if self.window < self.batch as u64 {
            diags.error(
                keys.at("window"),
                "upstream.window must be at least upstream.batch",
            );
        }
        if let (Some(names), Some(policy)) = (&self.streams, policy) {
            super::check_stream_names("upstream.streams", names, policy, keys, diags);
        }
    }
}
