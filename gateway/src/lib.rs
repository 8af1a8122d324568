//! hubgate: an edge gateway for people-centred smart-city hubs.
//!
//! It subscribes to city telemetry over MQTT, applies the city's privacy policy to every reading,
//! keeps only the filtered records in a durable outbox and serves them over gRPC, to an upstream
//! hub and to NATS JetStream.
//!
//! ```text
//!  MQTT broker ─► sources::mqtt ─► pipeline: route, decode, privacy chain ─► store ─► sinks::grpc
//!  other hubs ──► sources::push ─┘  (decode, hubgate-privacy)                 (outbox)  sinks::upstream
//!                   QoS 1, acknowledged after the turn is durable                       sinks::nats
//! ```
//!
//! [`start`] runs a gateway inside the current tokio runtime and returns once it is listening, so
//! the CLI, `hubgate demo` and tests all start it the same way and stop it with a
//! [`CancellationToken`].
//!
//! # Modules
//!
//! Layers, from the top of the application down. A module uses only the modules below it, never
//! one above (`tests/layers.rs` checks every `crate::` path), so the import graph has no cycle:
//!
//! - [`tools`]: the command line, dry-run, the demo, the district simulator, the embedded broker.
//! - [`app`]: starting and stopping a gateway, policy reloads, the files a configuration names.
//! - [`sinks`]: the gRPC API and its tokens, the upstream client, NATS, NGSI-LD, admin HTTP.
//! - [`pipeline`]: route, decode, privacy chain and stage; the turn loop and its commit thread;
//!   window checkpoints, pseudonymisation keys and the privacy-budget ledger.
//! - [`sources`]: MQTT ingest and its acknowledgements, rate limits, Push intake from other hubs.
//! - [`store`]: the per-stream logs readers follow, over the outbox; retention and size cap.
//! - [`outbox`]: the durable engines (redb with its write-ahead log, sled), the batch format,
//!   data keys and the sealed checkpoint vault.
//! - [`governance`]: the audit log, the footprint meter, the transparency register.
//! - [`decode`]: payload formats (JSON, SenML, Sparkplug B, NGSI); pure.
//! - [`record`]: the one owner of the `hubgate.v1.Record` wire layout.
//! - [`config`]: the configuration file, one file per section, each with its checks.
//! - [`telemetry`]: the clock and the counts shared by every layer.

pub mod app;
pub mod config;
pub mod decode;
pub mod governance;
pub mod outbox;
pub mod pipeline;
pub mod record;
pub mod sinks;
pub mod sources;
pub mod store;
pub mod telemetry;
pub mod tools;

pub use app::{
    Files, Process, Running, Start, check_files, install_crypto_provider, start, start_in,
};
pub use tokio_util::sync::CancellationToken;
