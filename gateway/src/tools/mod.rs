//! The command line and what it runs besides the gateway: dry-run, the demo, the district
//! simulator and the embedded broker.

#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod cli;
#[cfg(feature = "embedded-broker")]
pub mod demo;
pub mod dry_run;
pub mod outbox_repair;
pub mod simulator;
