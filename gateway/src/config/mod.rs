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

use std::ops::Range;

use hubgate_privacy::diagnostics::{self, Diagnostic, Diagnostics};
use hubgate_privacy::policy::{self, Policy};
use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::DeValue;

mod admin;
mod audit;
mod footprint;
mod grpc;
mod keys;
mod mqtt;
mod nats;
mod register;
mod store;
mod units;
mod upstream;

pub use admin::AdminConfig;
pub use audit::{AuditConfig, DEFAULT_AUDIT_RETENTION};
pub use footprint::FootprintConfig;
pub use grpc::{GrpcConfig, TlsConfig, TokenConfig};
use keys::Keys;
pub use mqtt::{DeviceLimit, Limit, MqttConfig, MqttTlsConfig};
pub use nats::{NatsConfig, NatsPayload};
pub use register::RegisterConfig;
pub use store::{Engine, OnFull, StoreConfig};
pub use units::redacted;
pub use upstream::{UpstreamConfig, valid_origin};

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

/// A configuration that was rejected, with every problem found.
#[derive(Debug)]
pub struct Rejected {
    pub diagnostics: Vec<Diagnostic>,
}

/// The sections of a configuration file as written, each with where its keys are.
#[derive(Debug, Default)]
struct Sections<'a> {
    written: Vec<(String, Range<usize>, Spanned<DeValue<'a>>)>,
    streams: Option<Vec<policy::RawStream>>,
}

/// The sections a configuration file may have, besides `[[stream]]`.
const SECTIONS: [&str; 9] = [
    "mqtt",
    "grpc",
    "admin",
    "store",
    "upstream",
    "nats",
    "footprint",
    "register",
    "audit",
];

impl<'a> Sections<'a> {
    /// Sorts the document's sections; an unknown one is an error.
    fn of(doc: toml::de::DeTable<'a>, diags: &mut Diagnostics) -> Self {
        let mut sections = Self::default();
        for (key, value) in doc {
            let name = key.get_ref().as_ref();
            if name == "stream" {
                sections.streams = Some(policy::parse_streams(value, diags));
            } else if SECTIONS.contains(&name) {
                sections.written.push((name.to_owned(), key.span(), value));
            } else {
                diags.error(
                    key.span(),
                    format!(
                        "unknown section '{name}', expected one of {}, 'stream'",
                        SECTIONS.map(|s| format!("'{s}'")).join(", ")
                    ),
                );
            }
        }
        sections
    }

    /// Section `name` parsed, with where its keys are: `None` when it is not written or does
    /// not parse (the error is recorded); keys that point at `absent` when it is not written.
    fn take<T: DeserializeOwned>(
        &mut self,
        name: &str,
        absent: Range<usize>,
        diags: &mut Diagnostics,
    ) -> (Option<T>, Keys) {
        let Some(i) = self.written.iter().position(|(n, _, _)| n == name) else {
            return (None, Keys::absent(absent));
        };
        let (_, header, value) = self.written.swap_remove(i);
        let keys = Keys::of(header, &value);
        (diags.section(value), keys)
    }
}

/// Parses and validates a configuration file's text.
///
/// On success, also returns the warnings (weak but accepted settings).
pub fn parse(source: &str) -> Result<(Config, Vec<Diagnostic>), Rejected> {
    let doc = diagnostics::parse_document(source).map_err(|d| Rejected {
        diagnostics: d.into_sorted(),
    })?;
    let mut diags = Diagnostics::default();
    units::refuse_credentials(&doc, &mut diags);
    let mut sections = Sections::of(doc, &mut diags);
    let whole = 0..source.len().min(1);
    let (mqtt, mqtt_keys) = sections.take::<MqttConfig>("mqtt", whole.clone(), &mut diags);
    let (grpc, grpc_keys) = sections.take::<GrpcConfig>("grpc", 0..0, &mut diags);
    let (admin, admin_keys) = sections.take::<AdminConfig>("admin", 0..0, &mut diags);
    let (store, store_keys) = sections.take::<StoreConfig>("store", whole.clone(), &mut diags);
    let (upstream, upstream_keys) = sections.take::<UpstreamConfig>("upstream", 0..0, &mut diags);
    let (nats, nats_keys) = sections.take::<NatsConfig>("nats", 0..0, &mut diags);
    let (footprint, footprint_keys) =
        sections.take::<FootprintConfig>("footprint", 0..0, &mut diags);
    let (register, register_keys) = sections.take::<RegisterConfig>("register", 0..0, &mut diags);
    let (audit, audit_keys) = sections.take::<AuditConfig>("audit", 0..0, &mut diags);
    let (mqtt, grpc, admin, store) = (
        mqtt.unwrap_or_default(),
        grpc.unwrap_or_default(),
        admin.unwrap_or_default(),
        store.unwrap_or_default(),
    );
    let (footprint, register, audit) = (
        footprint.unwrap_or_default(),
        register.unwrap_or_default(),
        audit.unwrap_or_default(),
    );
    if sections.streams.is_none() {
        diags.error(
            whole,
            "no [[stream]] is declared: the gateway would pass nothing",
        );
    }
    let policy = policy::compile(sections.streams.unwrap_or_default(), &mut diags);
    mqtt.check(&mqtt_keys, &mut diags);
    admin.check(&admin_keys, &mut diags);
    store.check(&store_keys, &mut diags);
    grpc.check(&grpc_keys, policy.as_ref(), &mut diags);
    if let Some(up) = &upstream {
        up.check(&upstream_keys, policy.as_ref(), &mut diags);
    }
    if let Some(nats) = &nats {
        nats.check(&nats_keys, policy.as_ref(), &mut diags);
    }
    footprint.check(&footprint_keys, &mut diags);
    register.check(&register_keys, &mut diags);
    audit.check(&audit_keys, &mut diags);
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

/// Checks that the stream names a section's `key` lists are declared by the policy.
fn check_stream_names(
    key: &str,
    names: &[String],
    policy: &Policy,
    keys: &Keys,
    diags: &mut Diagnostics,
) {
    let field = key.rsplit('.').next().unwrap_or(key);
    for (i, name) in names.iter().enumerate() {
        if policy.stream(name).is_none() {
            diags.error(
                keys.at(&format!("{field}.{i}")),
                format!("{key} names '{name}', which no [[stream]] declares"),
            );
        }
    }
}

#[cfg(test)]
mod tests;
