//! The privacy policy of a hubgate gateway and the stages that enforce it.
//!
//! This crate is pure: no I/O, no clock reads, no metrics, no async. Time comes in through the
//! caller (see [`chain::Context`]), so every stage is deterministic and easy to test.
//!
//! - [`diagnostics`]: errors and warnings with line and column, for `hubgate check`.
//! - [`policy`]: the policy language (one TOML `[[stream]]` table per stream), its validation and
//!   the compiled [`policy::Policy`] with its content hash.
//! - [`normalise`]: the one normaliser of text, shared by the detectors and pseudonymisation.
//! - [`identifiers`]: detectors for direct identifiers in kept strings and numbers.
//! - [`pseudonym`]: keyed pseudonyms (HMAC-SHA256 under a per-epoch, per-stream key).
//! - [`topic`]: MQTT topic filters, used to route a message to the streams that declare it.
//! - [`value`]: the internal form of a decoded reading and of a filtered record.
//! - [`chain`]: the privacy chain a reading goes through, stage by stage.
//! - [`invariants`]: what every record a stream serves satisfies, whatever path it took.
//! - [`forwarded`]: records another hub forwarded, admitted under this hub's policy.
//! - [`window`]: windowed aggregation with a minimum group size, and differential-privacy noise
//!   ([`noise`]) paid for from a per-day budget ([`budget`]).

pub mod budget;
pub mod chain;
pub mod diagnostics;
pub mod forwarded;
pub mod identifiers;
pub mod invariants;
pub mod lorawan;
pub mod noise;
pub mod normalise;
pub mod policy;
pub mod pseudonym;
pub mod topic;
pub mod value;
pub mod window;

#[cfg(test)]
mod testing;

pub use chain::{Context, Outcome, Rejection};
pub use diagnostics::{Diagnostic, Severity};
pub use policy::{Policy, StreamPolicy};
pub use value::{Reading, Record, Text, Value};
