//! Who may call the gRPC API: bearer tokens with scopes.
//!
//! Tokens are random strings the operator hands to each client (`hubgate token new`). The
//! configuration holds only their SHA-256 (`[[grpc.token]] sha256 = "…"`), never a token itself,
//! with what each may do: the streams it may subscribe to (`["*"]` for all), and whether it may
//! read the policy (`GetPolicy`), the footprint (`GetFootprint`, `WatchFootprint`) and push records
//! (`Push`, for origin gateways). A client sends its token as `authorization: Bearer <token>`.
//!
//! With no token configured the API is open. The configuration allows a non-loopback address only
//! with TLS (or an explicit `allow_insecure_remote`), and warns when such an API has no tokens.
//! With tokens, a call without one or with an unknown one gets `UNAUTHENTICATED`, a call outside
//! its token's scope `PERMISSION_DENIED`; a stream the token does not cover is refused the same
//! way whether or not it exists, and `ListStreams` and subscriptions show only the streams the
//! token covers. `GetPolicy` (its own scope) returns the whole policy and register, every stream
//! included, as the public `/transparency` page does. Refusals are counted in
//! `hubgate_grpc_refused_total{reason}` (`missing`, `unknown`, `scope`, `capacity` for calls
//! over `grpc.max_subscribers` or `grpc.max_push_calls`, `token` for calls over a token's own
//! limit (see [`super::places`]), `streams` for subscriptions over
//! `grpc.max_streams_per_subscription`); no token and no token name appears in a label or a
//! log line.

use sha2::{Digest, Sha256};
use tonic::Status;

use crate::config::TokenConfig;
use hubgate_exporters::catalogue;

/// A client's token, as the configuration holds it.
#[derive(Debug, Clone)]
pub struct Token {
    pub name: String,
    /// Its place in the configuration's list.
    index: usize,
    /// Long-lived calls of each kind it may hold open at once; `None`: the default.
    max_calls: Option<usize>,
    digest: [u8; 32],
    /// `None`: every stream.
    streams: Option<Vec<String>>,
    policy: bool,
    footprint: bool,
    push: bool,
    /// `None`: any origin.
    origins: Option<Vec<String>>,
}

/// What a call may do.
#[derive(Debug, Clone)]
pub enum Grant {
    /// No token is configured: everything.
    Open,
    Token(std::sync::Arc<Token>),
}

/// A scope a call needs beyond streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Policy,
    Footprint,
    Push,
}

impl Grant {
    /// The token's place in the configuration's list; `None` without tokens.
    pub fn index(&self) -> Option<usize> {
        match self {
            Grant::Open => None,
            Grant::Token(t) => Some(t.index),
        }
    }

    /// The long-lived calls the token may hold open at once, if it says.
    pub fn max_calls(&self) -> Option<usize> {
        match self {
            Grant::Open => None,
            Grant::Token(t) => t.max_calls,
        }
    }

    /// Whether the call may subscribe to some stream or watch the footprint.
    pub fn reads_anything(&self) -> bool {
        match self {
            Grant::Open => true,
            Grant::Token(t) => t.footprint || t.streams.as_ref().is_none_or(|s| !s.is_empty()),
        }
    }

    /// Whether the call may read (or push to) `stream`.
    pub fn stream(&self, stream: &str) -> bool {
        match self {
            Grant::Open => true,
            Grant::Token(t) => t
                .streams
                .as_ref()
                .is_none_or(|names| names.iter().any(|n| n == stream)),
        }
    }

    /// Whether the call may push records as `origin`.
    pub fn origin(&self, origin: &str) -> bool {
        match self {
            Grant::Open => true,
            Grant::Token(t) => t
                .origins
                .as_ref()
                .is_none_or(|names| names.iter().any(|n| n == origin)),
        }
    }

    /// Whether the call has `scope`.
    pub fn has(&self, scope: Scope) -> bool {
        match self {
            Grant::Open => true,
            Grant::Token(t) => match scope {
                Scope::Policy => t.policy,
                Scope::Footprint => t.footprint,
                Scope::Push => t.push,
            },
        }
    }

    /// `Ok` with `scope`, else `PERMISSION_DENIED`, counted.
    pub fn require(&self, scope: Scope) -> Result<(), Status> {
        if self.has(scope) {
            Ok(())
        } else {
            Err(refused("scope"))
        }
    }
}

/// A refusal for a stream or scope the token does not cover, counted.
pub fn out_of_scope() -> Status {
    refused("scope")
}

/// A refusal of Push on an API without tokens that does not allow it, counted as out of scope:
/// without tokens, anyone who reaches the port could push.
pub fn push_needs_tokens() -> Status {
    metrics::counter!(catalogue::GRPC_REFUSED, "reason" => "scope").increment(1);
    Status::permission_denied(
        "Push needs a token: give origin gateways a [[grpc.token]] with push = true (or, on a trusted network, set grpc.push_without_tokens = true)",
    )
}

fn refused(reason: &'static str) -> Status {
    metrics::counter!(catalogue::GRPC_REFUSED, "reason" => reason).increment(1);
    match reason {
        "scope" => Status::permission_denied("not permitted for this token"),
        _ => Status::unauthenticated("a valid bearer token is required"),
    }
}

/// The tokens of the configuration.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    tokens: Vec<std::sync::Arc<Token>>,
}

impl Tokens {
    /// From the configuration (already validated: 64 hex digits per digest).
    pub fn new(configured: &[TokenConfig]) -> Self {
        let tokens = configured
            .iter()
            .enumerate()
            .map(|(index, t)| {
                let mut digest = [0u8; 32];
                for (i, byte) in digest.iter_mut().enumerate() {
                    *byte = t
                        .sha256
                        .get(2 * i..2 * i + 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .unwrap_or_default();
                }
                std::sync::Arc::new(Token {
                    name: t.name.clone(),
                    index,
                    max_calls: t.max_calls,
                    digest,
                    streams: (!t.streams.iter().any(|s| s == "*")).then(|| t.streams.clone()),
                    policy: t.policy,
                    footprint: t.footprint,
                    push: t.push,
                    origins: (!t.origins.is_empty()).then(|| t.origins.clone()),
                })
            })
            .collect();
        Self { tokens }
    }

    /// The grant of each configured token, in order.
    pub fn list(&self) -> Vec<Grant> {
        self.tokens
            .iter()
            .map(|t| Grant::Token(std::sync::Arc::clone(t)))
            .collect()
    }

    /// Whether the API is open (no token configured).
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The grant of a call from its metadata: `UNAUTHENTICATED` (counted) without a known token.
    pub fn check(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Grant, Status> {
        if self.is_open() {
            return Ok(Grant::Open);
        }
        let Some(header) = metadata.get("authorization") else {
            return Err(refused("missing"));
        };
        let presented = header
            .to_str()
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| refused("missing"))?;
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Every configured digest is compared, each in constant time.
        let mut found = None;
        for token in &self.tokens {
            let same = token
                .digest
                .iter()
                .zip(&digest)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
            if same && found.is_none() {
                found = Some(token);
            }
        }
        found
            .map(|t| Grant::Token(std::sync::Arc::clone(t)))
            .ok_or_else(|| refused("unknown"))
    }
}

/// SHA-256 of a token, as lowercase hex (what `[[grpc.token]] sha256` holds).
pub fn digest_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new random token: `hg_` and 64 hex digits (256 bits from the operating system).
pub fn new_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(format!(
        "hg_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataMap;

    fn config(name: &str, token: &str, streams: &[&str], policy: bool) -> TokenConfig {
        TokenConfig {
            name: name.to_owned(),
            sha256: digest_hex(token),
            streams: streams.iter().map(|s| (*s).to_owned()).collect(),
            policy,
            footprint: false,
            push: false,
            origins: Vec::new(),
            max_calls: None,
        }
    }

    fn with_auth(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", value.parse().unwrap());
        m
    }

    #[test]
    fn tokens_are_checked_by_digest_and_scoped() {
        let tokens = Tokens::new(&[
            config("north", "hg_north", &["air"], false),
            config("ops", "hg_ops", &["*"], true),
        ]);
        assert!(!tokens.is_open());
        assert_eq!(
            tokens.check(&MetadataMap::new()).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            tokens
                .check(&with_auth("Bearer hg_wrong"))
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            tokens.check(&with_auth("Basic aGk=")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let north = tokens.check(&with_auth("Bearer hg_north")).unwrap();
        assert!(north.stream("air") && !north.stream("noise"));
        assert_eq!(
            north.require(Scope::Policy).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let ops = tokens.check(&with_auth("Bearer hg_ops")).unwrap();
        assert!(ops.stream("air") && ops.stream("noise") && ops.has(Scope::Policy));
        assert!(!ops.has(Scope::Push));
        // No token configured: open.
        let open = Tokens::new(&[]);
        assert!(matches!(open.check(&MetadataMap::new()), Ok(Grant::Open)));
    }

    #[test]
    fn new_tokens_are_random_and_their_digest_is_sha256() {
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with("hg_") && a.len() == 67);
        // SHA-256 of "abc" (FIPS 180-2 test vector).
        assert_eq!(
            digest_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
