//! The committed generated code must match what the `.proto` files produce.

use std::path::{Path, PathBuf};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Compiles the protos (pure Rust, no protoc) and writes the generated code and descriptor set into
/// `out`.
fn generate(out: &Path) {
    let root = crate_dir();
    let fds = protox::compile([root.join("hubgate/v1/gateway.proto")], [&root])
        .expect("the .proto files compile");
    let encoded = prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("hubgate_v1_descriptor.bin"), encoded).expect("write descriptor set");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(out)
        .compile_fds(fds)
        .expect("code generation succeeds");
}

#[test]
fn committed_generated_code_is_up_to_date() {
    let committed = crate_dir().join("src/gen");
    if std::env::var_os("HUBGATE_REGENERATE").is_some() {
        generate(&committed);
        return;
    }
    let fresh = tempfile::tempdir().expect("temp dir");
    generate(fresh.path());
    for name in ["hubgate.v1.rs", "hubgate_v1_descriptor.bin"] {
        let want = std::fs::read(fresh.path().join(name)).expect("generated file");
        let have = std::fs::read(committed.join(name)).unwrap_or_default();
        assert!(
            want == have,
            "proto/src/gen/{name} is stale: run `HUBGATE_REGENERATE=1 cargo test -p hubgate-proto` and commit the result"
        );
    }
}
