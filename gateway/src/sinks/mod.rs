//! The ways records leave the gateway: the gRPC API, the upstream hub, NATS JetStream, and the
//! admin HTTP listener.

pub mod admin;
pub mod grpc;
pub mod guarded;
pub mod nats;
pub mod ngsi_ld;
pub mod position;
pub mod upstream;
