//! The example clients in `examples/`, against a live gateway: the Python dashboard client
//! (grpcio, its code generated from `proto/`) reads a stream from the oldest record, and is
//! refused without a valid token.
//!
//! The Python client needs grpcio and grpcio-tools: `cargo xtask test` installs them
//! (`examples/python/requirements.txt`) in a virtualenv, `target/test-python`, and names its
//! interpreter in `HUBGATE_PYTHON`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use hubgate_tests::{Gateway, Mosquitto, Publisher, config, gateway_bin};

const STREAMS: &str = r#"
[[stream]]
name = "noise"
topics = ["city/noise/+/level"]
purpose = "Map environmental noise"
legal_basis = "legal obligation"
principles = ["human_rights_equity_inclusion"]
technology = "tech__sound_level_meter"
retention = "1d"

[stream.fields]
meter_id = "keep"
laeq_db = "keep"
"#;

/// The Python that has the client's packages.
fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("HUBGATE_PYTHON") {
        return PathBuf::from(python);
    }
    let venv = hubgate_tests::repo().join("target/test-python/bin/python");
    assert!(
        venv.exists(),
        "this test needs Python with grpcio: run the tests with `cargo xtask test`, which installs it"
    );
    venv
}

/// Runs the Python client with `args` and `token`; returns its exit code, stdout and stderr.
fn run_client(gw: &Gateway, token: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let generated = tempfile::tempdir().expect("temp dir");
    let mut command = Command::new(python());
    command
        .arg(hubgate_tests::repo().join("examples/python/hubgate_client.py"))
        .arg("--target")
        .arg(gw.grpc.to_string())
        .args(args)
        .env("HUBGATE_PY_GEN", generated.path())
        .env_remove("HUBGATE_TOKEN");
    if let Some(token) = token {
        command.env("HUBGATE_TOKEN", token);
    }
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the Python client");
    // It must finish on its own; a hung client fails the test instead of hanging it.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("client status").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the Python client did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("client output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_reads_a_stream_and_is_refused_without_a_valid_token() {
    let token = "hg_python_dashboard_token";
    let broker = Mosquitto::start();
    let gw = Gateway::start(
        gateway_bin!(),
        &format!(
            "{}\n[[grpc.token]]\nname = \"dashboard\"\nsha256 = \"{}\"\nstreams = [\"noise\"]\n",
            config(broker.port, "gw-python", STREAMS),
            hubgate::sinks::grpc::auth::digest_hex(token)
        ),
    );
    gw.wait_ready();
    let mut publisher = Publisher::connect(broker.port, "pub-python");
    for i in 0..5 {
        publisher
            .publish(
                "city/noise/nm-7/level",
                format!(
                    r#"{{"meter_id":"nm-7","laeq_db":{},"operator_email":"x@example.org"}}"#,
                    50 + i
                ),
            )
            .await;
    }
    publisher.wait_acked(5).await;
    hubgate_tests::wait_for("5 records kept", Duration::from_secs(15), || {
        gw.metric("hubgate_records_kept_total", &[("stream", "noise")]) == 5.0
    });

    let (code, out, err) = run_client(
        &gw,
        Some(token),
        &["--stream", "noise", "--from", "oldest", "--count", "5"],
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let records: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON record per line"))
        .collect();
    assert_eq!(records.len(), 5, "{out}");
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record["stream"], "noise");
        assert_eq!(record["sequence"], i as u64 + 1);
        assert_eq!(record["fields"]["meter_id"], "nm-7");
        assert_eq!(record["fields"]["laeq_db"], 50 + i as i64);
        // Only what the policy declares.
        assert_eq!(
            record["fields"].as_object().expect("fields").len(),
            2,
            "{record}"
        );
    }

    let (code, _, err) = run_client(&gw, Some("hg_wrong_token"), &["--from", "oldest"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("refused: UNAUTHENTICATED"), "{err}");
    let (code, _, err) = run_client(&gw, None, &["--from", "oldest"]);
    assert_eq!(code, 2, "{err}");
}
