//! Where readings come from: the MQTT broker, and other hubs forwarding with Push.

pub mod mqtt;
pub mod push;
pub mod ratelimit;
