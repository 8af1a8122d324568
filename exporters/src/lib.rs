//! Metrics of a hubgate gateway: one catalogue of names, and their Prometheus exposition.
//!
//! Every metric hubgate emits is named in [`catalogue`], with its unit in the name and a
//! description. Labels are stream names, stage kinds and reasons: never a topic (topics often carry
//! device identifiers), never a device identifier, never error text.

pub mod carbon;
pub mod catalogue;
pub mod energy;
pub mod prometheus;
