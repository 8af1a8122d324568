//! The deployment files in `deploy/` that a test can exercise for real: the broker configuration
//! and its ACL, run by mosquitto, the Grafana dashboard against the metric catalogue, and the malloc
//! settings of the systemd unit, the container file and the manifest against the benchmark's. (The
//! gateway configurations are checked in `check.rs`; `.ci/run` lints the systemd unit, the
//! container file and the Kubernetes manifests.)

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// mosquitto run with `deploy/mosquitto.conf` and `deploy/mosquitto.acl` as shipped, but for the
/// paths and port of a test.
struct Broker {
    port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn shipped_broker(users: &[(&str, &str)]) -> Broker {
    let dir = tempfile::tempdir().expect("test setup");
    let chmod = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .expect("test setup");
    };
    // Started as root, mosquitto drops to its own user: let it read and write here.
    chmod(dir.path(), 0o777);
    let passwd = dir.path().join("passwd");
    for (i, (user, password)) in users.iter().enumerate() {
        let mut command = Command::new("mosquitto_passwd");
        if i == 0 {
            command.arg("-c");
        }
        assert!(
            command
                .arg("-b")
                .arg(&passwd)
                .args([user, password])
                .status()
                .expect("test setup")
                .success()
        );
    }
    chmod(&passwd, 0o644);
    let acl = dir.path().join("hubgate.acl");
    std::fs::copy(hubgate_tests::repo().join("deploy/mosquitto.acl"), &acl).expect("test setup");
    chmod(&acl, 0o644);
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).expect("test setup");
    for name in ["ca.crt", "server.crt", "server.key"] {
        let to = certs.join(name);
        std::fs::copy(
            hubgate_tests::repo().join("tests/fixtures/tls").join(name),
            &to,
        )
        .expect("test setup");
        chmod(&to, 0o644);
    }
    let port = hubgate_tests::free_port();
    let tls_port = hubgate_tests::free_port();
    let shipped = std::fs::read_to_string(hubgate_tests::repo().join("deploy/mosquitto.conf"))
        .expect("test setup");
    let mut conf = String::new();
    for line in shipped.lines() {
        let line = match line.split_whitespace().next() {
            Some("listener") if line.contains("1883") => format!("listener {port} 127.0.0.1"),
            Some("listener") => format!("listener {tls_port} 127.0.0.1"),
            Some(file @ ("cafile" | "certfile" | "keyfile")) => {
                let name = line.rsplit('/').next().expect("a file name");
                format!("{file} {}", certs.join(name).display())
            }
            Some("password_file") => format!("password_file {}", passwd.display()),
            Some("acl_file") => format!("acl_file {}", acl.display()),
            Some("persistence_location") => {
                format!("persistence_location {}/", dir.path().display())
            }
            _ => line.to_owned(),
        };
        conf.push_str(&line);
        conf.push('\n');
    }
    for setting in [
        "password_file",
        "acl_file",
        "allow_anonymous false",
        "certfile",
    ] {
        assert!(
            conf.contains(setting),
            "deploy/mosquitto.conf lost {setting}"
        );
    }
    let conf_path = dir.path().join("mosquitto.conf");
    std::fs::write(&conf_path, conf).expect("test setup");
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto on PATH");
    // Both listeners come up: the plain one on loopback and the TLS one for devices.
    hubgate_tests::wait_for("mosquitto to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_ok()
    });
    Broker {
        port,
        child,
        _dir: dir,
    }
}

/// A client of `user` that subscribes to `filter` and counts the messages it gets.
async fn counting_subscriber(
    port: u16,
    user: &str,
    password: &str,
    filter: &str,
) -> (
    AsyncClient,
    tokio::sync::watch::Receiver<Vec<String>>,
    tokio::task::JoinHandle<()>,
) {
    let mut options = MqttOptions::new(format!("sub-{user}"), "127.0.0.1", port);
    options.set_credentials(user, password);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("test setup");
    let (tx, rx) = tokio::sync::watch::channel(Vec::new());
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut subscribed_tx = Some(subscribed_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    tx.send_modify(|seen| seen.push(p.topic))
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(done) = subscribed_tx.take() {
                        let _ = done.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed)
        .await
        .expect("subscribed")
        .expect("test setup");
    (client, rx, task)
}

/// The shipped broker settings: the gateway's user reads every city topic; a device writes only
/// topics that name it and reads nothing; an unknown user cannot connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_broker_acl_lets_the_gateway_read_and_each_device_write_only_topics_naming_it()
{
    let broker = shipped_broker(&[("hubgate", "gw-pass"), ("aq-00042", "dev-pass")]);
    let (_gw_client, gateway_seen, gw_task) =
        counting_subscriber(broker.port, "hubgate", "gw-pass", "city/#").await;
    // The device subscribes to everything: the ACL gives it nothing to read.
    let (_dev_sub, device_seen, dev_task) =
        counting_subscriber(broker.port, "aq-00042", "dev-pass", "city/#").await;

    let mut options = MqttOptions::new("aq-00042-pub", "127.0.0.1", broker.port);
    options.set_credentials("aq-00042", "dev-pass");
    let (device, mut eventloop) = AsyncClient::new(options, 16);
    let driver = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    for topic in [
        "city/air/aq-00042/reading", // its own: delivered
        "city/air/aq-99999/reading", // another device's: refused
        "city/noise/aq-00042/level", // its id under another kind: the pattern allows it
    ] {
        device
            .publish(topic, QoS::AtLeastOnce, false, b"{}".to_vec())
            .await
            .expect("test setup");
    }
    let mut seen = gateway_seen.clone();
    tokio::time::timeout(Duration::from_secs(10), seen.wait_for(|s| s.len() >= 2))
        .await
        .expect("the gateway's user gets the device's readings")
        .expect("test setup");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        *gateway_seen.borrow(),
        ["city/air/aq-00042/reading", "city/noise/aq-00042/level"]
    );
    assert!(
        device_seen.borrow().is_empty(),
        "{:?}",
        device_seen.borrow()
    );

    // A user the password file does not know is refused.
    let mut options = MqttOptions::new("intruder", "127.0.0.1", broker.port);
    options.set_credentials("intruder", "guess");
    let (_intruder, mut eventloop) = AsyncClient::new(options, 16);
    let refused = tokio::time::timeout(Duration::from_secs(5), eventloop.poll())
        .await
        .expect("an answer");
    assert!(refused.is_err(), "{refused:?}");
    for task in [gw_task, dev_task, driver] {
        task.abort();
    }
}

/// Every metric the Grafana dashboard queries exists in the catalogue, so the dashboard cannot
/// drift from what the gateway exports.
#[test]
fn the_dashboard_queries_only_metrics_the_gateway_exports() {
    let catalogue =
        std::fs::read_to_string(hubgate_tests::repo().join("exporters/src/catalogue.rs"))
            .expect("test setup");
    let exported: std::collections::HashSet<&str> = catalogue
        .split('"')
        .filter(|s| s.starts_with("hubgate_"))
        .collect();
    let text = std::fs::read_to_string(
        hubgate_tests::repo().join("deploy/grafana/hubgate-dashboard.json"),
    )
    .expect("test setup");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("hubgate_") {
                    queried.push(word.to_owned());
                }
            }
        }
    }
    assert!(queried.len() >= 15, "{queried:?}");
    let unknown: Vec<_> = queried
        .iter()
        .filter(|m| !exported.contains(m.as_str()))
        .collect();
    assert!(unknown.is_empty(), "not in the catalogue: {unknown:?}");
    // The four concerns each have a panel.
    for metric in [
        "hubgate_fields_dropped_total",
        "hubgate_outbox_bytes",
        "hubgate_upstream_lag_records",
        "hubgate_energy_joules_total",
    ] {
        assert!(queried.iter().any(|m| m == metric), "no panel for {metric}");
    }
}

/// The systemd unit, the container file and the Kubernetes manifest give the gateway the malloc
/// settings the benchmark measured memory with.
#[test]
fn every_deployment_file_tunes_malloc_as_the_benchmark_does() {
    let read =
        |path: &str| std::fs::read_to_string(hubgate_tests::repo().join(path)).expect("test setup");
    let unit = read("deploy/hubgate.service");
    let unit: Vec<(&str, &str)> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let container = read("deploy/Containerfile");
    let container: Vec<(&str, &str)> = container
        .lines()
        .filter_map(|l| l.strip_prefix("ENV "))
        .flat_map(str::split_whitespace)
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let manifest = read("deploy/kubernetes/hubgate.yaml");
    let lines: Vec<&str> = manifest.lines().map(str::trim).collect();
    let manifest: Vec<(&str, &str)> = lines
        .windows(2)
        .filter_map(|w| {
            let name = w[0].strip_prefix("- name: ")?;
            let value = w[1].strip_prefix("value: ")?;
            Some((name, value.trim_matches('"')))
        })
        .collect();
    for (file, env) in [
        ("hubgate.service", &unit),
        ("Containerfile", &container),
        ("hubgate.yaml", &manifest),
    ] {
        let malloc: Vec<(&str, &str)> = env
            .iter()
            .copied()
            .filter(|(k, _)| k.starts_with("MALLOC_"))
            .collect();
        assert_eq!(malloc, hubgate_tests::bench::MALLOC, "{file}");
    }
}
