//! hubgate's gRPC API.
//!
//! The `.proto` files under `proto/hubgate/` are the source of truth. The Rust code generated from
//! them is committed in `src/gen/` so that building hubgate needs no `protoc`; the test
//! `tests/generated_code.rs` regenerates it with a pure-Rust protobuf compiler and fails when the
//! committed code is stale (run it with `HUBGATE_REGENERATE=1` to rewrite the files).

/// Version 1 of the API (`package hubgate.v1`).
pub mod v1 {
    #![allow(missing_docs, missing_debug_implementations, unused_qualifications)]
    #![allow(clippy::all)]
    include!("gen/hubgate.v1.rs");
}

/// Encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/hubgate_v1_descriptor.bin");
