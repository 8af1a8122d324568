//! Where readings come from: the MQTT broker, and other hubs forwarding with Push.

pub mod mqtt;
pub mod oversized;
pub mod push;
pub mod ratelimit;
