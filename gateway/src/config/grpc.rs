//! `[grpc]`: the gRPC API's address, TLS, limits and client tokens.

use std::net::SocketAddr;

use hubgate_privacy::Policy;
use hubgate_privacy::diagnostics::Diagnostics;
use serde::Deserialize;

use super::keys::Keys;

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
    /// Serve Push when no tokens are configured: anyone who reaches the address could then push
    /// records into the hub's streams. Off by default; Push then needs a token with `push`.
    pub push_without_tokens: bool,
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
            push_without_tokens: false,
            tokens: Vec::new(),
        }
    }
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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it: for the operator and the audit log's grants, never in the request logs.
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
    /// Long-lived calls of each kind (Subscribe and WatchFootprint; Push) it may hold open at
    /// once. By default a quarter of `grpc.max_subscribers` (or `grpc.max_push_calls`); other
    /// tokens' reserved places stay out of its reach whatever this says.
    pub max_calls: Option<usize>,
}

impl GrpcConfig {
    pub(super) fn check(&self, keys: &Keys, policy: Option<&Policy>, diags: &mut Diagnostics) {
        let remote = !self.listen.ip().is_loopback();
        if remote && self.tls.is_none() && !self.allow_insecure_remote {
            diags.error(
                keys.at("listen"),
                format!(
                    "grpc.listen {} is not a loopback address: configure [grpc.tls], or, behind a proxy that terminates TLS, set grpc.allow_insecure_remote = true",
                    self.listen
                ),
            );
        }
        if remote && self.tls.is_none() && !self.tokens.is_empty() {
            diags.warning(
                keys.at("allow_insecure_remote"),
                "bearer tokens over plaintext: with grpc.allow_insecure_remote and no [grpc.tls], every token \
                 crosses the network in the clear unless the proxy in front terminates TLS on the same host",
            );
        }
        if self.push_without_tokens && !self.tokens.is_empty() {
            diags.warning(
                keys.at("push_without_tokens"),
                "grpc.push_without_tokens has no effect: with tokens, Push needs a token with push = true",
            );
        } else if self.push_without_tokens && remote {
            diags.warning(
                keys.at("push_without_tokens"),
                "grpc.push_without_tokens on a non-loopback address: anyone who reaches it can push records into the hub's streams",
            );
        }
        if remote && self.tokens.is_empty() {
            diags.warning(
                keys.at("listen"),
                "the gRPC API is open to anyone who can reach it: give clients tokens ([[grpc.token]])",
            );
        }
        for (key, value) in [
            ("max_subscribers", self.max_subscribers),
            ("max_push_calls", self.max_push_calls),
            (
                "max_streams_per_subscription",
                self.max_streams_per_subscription,
            ),
        ] {
            if value == 0 {
                diags.error(keys.at(key), format!("grpc.{key} must be at least 1"));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, token) in self.tokens.iter().enumerate() {
            token.check(&format!("token.{i}."), keys, &mut names, policy, diags);
        }
    }
}

impl TokenConfig {
    /// Checks one `[[grpc.token]]`, whose keys are at `prefix` in `keys`; `names` are the names
    /// of the tokens before it.
    fn check<'a>(
        &'a self,
        prefix: &str,
        keys: &Keys,
        names: &mut std::collections::HashSet<&'a str>,
        policy: Option<&Policy>,
        diags: &mut Diagnostics,
    ) {
        let at = |key: &str| keys.at(&format!("{prefix}{key}"));
        let valid_name = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !valid_name {
            diags.error(
                at("name"),
                "grpc.token name must be 1 to 64 letters, digits, '.', '_' or '-'",
            );
        } else if !names.insert(self.name.as_str()) {
            diags.error(
                at("name"),
                format!("grpc.token '{}' is declared twice", self.name),
            );
        }
        if !(self.sha256.len() == 64
            && self
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        {
            diags.error(
                at("sha256"),
                format!(
                    "grpc.token '{}': sha256 must be 64 lowercase hex digits (the token's SHA-256, never the token)",
                    self.name
                ),
            );
        }
        if let Some(policy) = policy {
            for (j, stream) in self.streams.iter().enumerate() {
                if stream != "*" && policy.stream(stream).is_none() {
                    diags.error(
                        at(&format!("streams.{j}")),
                        format!(
                            "grpc.token '{}' names stream '{stream}', which the policy does not declare",
                            self.name
                        ),
                    );
                }
            }
        }
        if self.push && self.origins.is_empty() {
            diags.warning(
                at("push"),
                format!(
                    "grpc.token '{}' may push records as any origin: name its origins",
                    self.name
                ),
            );
        }
        if self.max_calls == Some(0) {
            diags.error(
                at("max_calls"),
                format!(
                    "grpc.token '{}': max_calls must be at least 1 (remove the token to revoke it)",
                    self.name
                ),
            );
        }
        if self.streams.is_empty() && !self.policy && !self.footprint && !self.push {
            diags.warning(
                at("name"),
                format!("grpc.token '{}' grants nothing", self.name),
            );
        }
    }
}
