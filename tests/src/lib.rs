//! Harness for hubgate's end-to-end tests: a real mosquitto on a free port, the gateway as a
//! separate process, a real MQTT publisher and a real gRPC client.
//!
//! Each test starts its own broker and gateway in its own temporary directory, so tests are
//! isolated and can run in parallel. They need `mosquitto` on PATH (`cargo xtask test` installs it).

pub mod bench;
pub mod durable;
pub mod load;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hubgate_proto::v1::gateway_client::GatewayClient;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tempfile::TempDir;
use tonic::transport::Channel;

/// Path of the gateway binary built for these tests.
#[macro_export]
macro_rules! gateway_bin {
    () => {
        std::path::Path::new(env!("CARGO_BIN_EXE_hubgate-e2e-gateway"))
    };
}

/// The workspace's root folder (the repository).
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
}

/// Runs `bin run --config config`, which must refuse to start; its standard error.
pub fn refused_start(bin: &Path, config: &Path) -> String {
    let out = Command::new(bin)
        .args(["run", "--config"])
        .arg(config)
        .output()
        .expect("run the gateway");
    assert!(!out.status.success(), "the gateway started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A temporary directory only its owner can enter (0700), as a gateway's data directory must be:
/// the gateway refuses one that others can read.
pub fn private_dir() -> TempDir {
    tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .expect("temp dir")
}

/// A free TCP port on loopback (the OS picks it; it is released before use).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A Subscribe request for `streams` (all when empty) starting at `position`.
pub fn subscribe_request(
    streams: &[&str],
    position: hubgate_proto::v1::start_position::Position,
) -> hubgate_proto::v1::SubscribeRequest {
    hubgate_proto::v1::SubscribeRequest {
        streams: streams.iter().map(|s| s.to_string()).collect(),
        start: Some(hubgate_proto::v1::StartPosition {
            position: Some(position),
        }),
        from_sequence: HashMap::new(),
    }
}

/// Polls `ready` every 25 ms until it holds, failing the test after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status();
}

/// A mosquitto broker of the test's own, with persistence so that a restart keeps sessions and
/// queued QoS 1 messages (as a production broker is configured).
#[derive(Debug)]
pub struct Mosquitto {
    pub port: u16,
    /// A second listener, with TLS, when the broker was started with one.
    pub tls_port: Option<u16>,
    dir: TempDir,
    child: Option<Child>,
    /// Only these users may connect (`allow_anonymous false`), when set.
    users: bool,
    /// QoS 1 messages in flight to each client at once (mosquitto's `max_inflight_messages`).
    max_inflight: u32,
}

impl Mosquitto {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut broker = Self {
            port: free_port(),
            tls_port: None,
            dir,
            child: None,
            users: false,
            max_inflight: 20,
        };
        broker.spawn();
        broker
    }

    /// A broker that lets `max_inflight` QoS 1 messages be unacknowledged by each client at once
    /// (20 by default), for the benchmarks.
    pub fn with_max_inflight(max_inflight: u32) -> Self {
        let mut broker = Self {
            port: free_port(),
            tls_port: None,
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
            users: false,
            max_inflight,
        };
        broker.spawn();
        broker
    }

    /// A broker with a plain listener on `port` and a TLS listener on `tls_port` that presents
    /// `server.crt` from `tls` and wants a client certificate signed by `ca.crt` there.
    pub fn with_tls(tls: &Path) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        for name in ["ca.crt", "server.crt", "server.key"] {
            let to = dir.path().join(name);
            std::fs::copy(tls.join(name), &to).expect("copy the broker's TLS files");
            // mosquitto reads them after dropping to its own user.
            std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .expect("chmod");
        }
        let mut broker = Self {
            port: free_port(),
            tls_port: Some(free_port()),
            dir,
            child: None,
            users: false,
            max_inflight: 20,
        };
        broker.spawn();
        broker
    }

    /// A broker that lets only `users` (name, password) connect.
    pub fn with_users(users: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let passwords = dir.path().join("passwords");
        for (i, (user, password)) in users.iter().enumerate() {
            let mut command = Command::new("mosquitto_passwd");
            if i == 0 {
                command.arg("-c");
            }
            let status = command
                .arg("-b")
                .arg(&passwords)
                .arg(user)
                .arg(password)
                .status()
                .expect("mosquitto_passwd (part of mosquitto)");
            assert!(status.success(), "mosquitto_passwd failed");
        }
        // mosquitto reads it after dropping to its own user.
        std::fs::set_permissions(
            &passwords,
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .expect("chmod");
        let mut broker = Self {
            port: free_port(),
            tls_port: None,
            dir,
            child: None,
            users: true,
            max_inflight: 20,
        };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data).expect("broker data dir");
        // Started as root, mosquitto drops to its own user: let it write its data and log here.
        for dir in [self.dir.path(), data.as_path()] {
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
                .expect("chmod");
        }
        let access = if self.users {
            format!(
                "allow_anonymous false\npassword_file {}",
                self.dir.path().join("passwords").display()
            )
        } else {
            "allow_anonymous true".to_owned()
        };
        let tls = match self.tls_port {
            Some(tls_port) => format!(
                "listener {tls_port} 127.0.0.1\ncafile {dir}/ca.crt\ncertfile {dir}/server.crt\n\
                 keyfile {dir}/server.key\nrequire_certificate true\n",
                dir = self.dir.path().display()
            ),
            None => String::new(),
        };
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\n{tls}listener {port} 127.0.0.1\n{access}\npersistence true\npersistence_location {data}/\n\
                 autosave_interval 1\nmax_queued_messages 0\nmax_inflight_messages {inflight}\nset_tcp_nodelay true\n\
                 log_dest file {log}\nlog_type error\nlog_type warning\nlog_type notice\n",
                port = self.port,
                inflight = self.max_inflight,
                data = data.display(),
                log = self.dir.path().join("mosquitto.log").display(),
            ),
        )
        .expect("write mosquitto.conf");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto must be on PATH (apt-get install mosquitto)");
        self.child = Some(child);
        let port = self.port;
        wait_for("mosquitto to listen", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// Stops the broker gracefully (SIGTERM: it saves its sessions) and starts it again on the
    /// same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Stops the broker and starts it again with its persistence file deleted: every session
    /// and queued message is gone, as when the broker's disk was lost.
    pub fn restart_forgetting(&mut self) {
        self.stop();
        let data = self.dir.path().join("data");
        let _ = std::fs::remove_dir_all(&data);
        self.spawn();
    }

    /// Stops the broker gracefully.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "TERM");
            let _ = child.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A NATS server with JetStream of the test's own, storing in a directory that outlives restarts.
#[derive(Debug)]
pub struct NatsServer {
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts `nats-server -js` on a free port (found on PATH, or in /usr/sbin where Debian puts
    /// it).
    pub fn start() -> Self {
        let mut server = Self {
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        server.spawn();
        server
    }

    /// A server that is not running yet: [`NatsServer::restart`] starts it.
    pub fn not_started() -> Self {
        Self {
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nats-server");
        let child = Command::new(binary)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (apt-get install nats-server)");
        self.child = Some(child);
        let port = self.port;
        wait_for("nats-server to listen", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// Stops the server (SIGTERM: it flushes its store), if it runs, and starts it again on the
    /// same port and store.
    pub fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "TERM");
            let _ = child.wait();
        }
        self.spawn();
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A stream `seq` on `test/seq` that keeps a sequence number `n` (and padding `pad`), for the
/// delivery tests: which numbers arrived, and how many times.
pub fn sequence_stream(retention: &str) -> String {
    format!(
        r#"
[[stream]]
name = "seq"
topics = ["test/seq"]
purpose = "Delivery guarantees under test"
legal_basis = "public task"
principles = ["sustainability_resilience"]
retention = "{retention}"

[stream.fields]
n = "keep"
pad = "keep"
"#
    )
}

/// An aggregated footfall stream: people counters on `city/footfall/<counter>/probe` report the
/// MAC addresses they hear; the MAC is pseudonymised and counted as the contributor, groups are per
/// counter. `extra_fields` are more `[stream.fields]` lines; `window`, `lateness` and `k` set the
/// aggregation; `measures` is the `[stream.aggregate.measures]` table's lines and anything after
/// it (a noise table).
pub fn footfall_aggregated(
    extra_fields: &str,
    window: &str,
    lateness: &str,
    k: u32,
    measures: &str,
) -> String {
    format!(
        r#"
[[stream]]
name = "footfall"
topics = ["city/footfall/+/probe"]
purpose = "How busy public spaces are"
legal_basis = "public task"
principles = ["community_participation"]
retention = "1d"
time_field = "ts"

[stream.fields]
counter_id = "keep"
mac = "pseudonymise"
{extra_fields}
[stream.aggregate]
window = "{window}"
allowed_lateness = "{lateness}"
group_by = ["counter_id"]
contributor = "mac"
min_group_size = {k}

[stream.aggregate.measures]
{measures}"#
    )
}

/// A gateway configuration for tests: the given broker, free gRPC and admin ports, and the
/// given `[[stream]]` tables.
pub fn config(mqtt_port: u16, client_id: &str, streams: &str) -> String {
    format!(
        "[mqtt]\nhost = \"127.0.0.1\"\nport = {mqtt_port}\nclient_id = \"{client_id}\"\nreconnect_backoff_max = \"500ms\"\n\n\
         [grpc]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{streams}"
    )
}

/// The gateway, running as its own process.
#[derive(Debug)]
pub struct Gateway {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    /// The transparency notice's own listener, when the configuration gives it one.
    pub public: Option<SocketAddr>,
    child: Child,
    dir: TempDir,
}

impl Gateway {
    /// Starts `bin run --config` with `config_text`, and waits until it listens.
    pub fn start(bin: &Path, config_text: &str) -> Self {
        Self::start_with_env(bin, config_text, &[])
    }

    /// [`Gateway::start`], with these environment variables set for the gateway.
    pub fn start_with_env(bin: &Path, config_text: &str, env: &[(&str, &str)]) -> Self {
        Self::launch(bin, config_text, env, None).unwrap_or_else(|log| {
            panic!("the gateway did not start; its log:\n{log}");
        })
    }

    /// Starts the gateway as [`Gateway::start`] does; `Err` with its log when it exits (refuses
    /// to start) instead.
    pub fn try_start(bin: &Path, config_text: &str) -> Result<Self, String> {
        Self::launch(bin, config_text, &[], None)
    }

    /// [`Gateway::start`] from a shell whose file mode mask is `umask` (for example 0o022).
    pub fn start_with_umask(bin: &Path, config_text: &str, umask: u32) -> Self {
        Self::launch(bin, config_text, &[], Some(umask)).unwrap_or_else(|log| {
            panic!("the gateway did not start; its log:\n{log}");
        })
    }

    fn launch(
        bin: &Path,
        config_text: &str,
        env: &[(&str, &str)],
        umask: Option<u32>,
    ) -> Result<Self, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("hubgate.toml");
        std::fs::write(&config_path, config_text).expect("write config");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
        let mut command = match umask {
            Some(mask) => {
                let mut shell = Command::new("sh");
                shell
                    .arg("-c")
                    .arg(format!("umask {mask:03o} && exec \"$0\" \"$@\""))
                    .arg(bin);
                shell
            }
            None => Command::new(bin),
        };
        let mut child = command
            // Relative paths in the config (the data directory) land in the test's own directory.
            .current_dir(dir.path())
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start the gateway");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default());
        };
        let addr_after = |label: &str| -> SocketAddr {
            let rest = line
                .split(label)
                .nth(1)
                .unwrap_or_else(|| panic!("no '{label}' in {line:?}"));
            rest.split([',', ' '])
                .next()
                .and_then(|a| a.parse().ok())
                .expect("address")
        };
        let grpc = addr_after("gRPC listening on ");
        let admin = addr_after("admin HTTP listening on ");
        let public = line
            .split("transparency notice on http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|a| a.parse().ok());
        Ok(Self {
            grpc,
            admin,
            public,
            child,
            dir,
        })
    }

    /// The gateway's working directory: its data directory is `hubgate-data` in it, unless the
    /// configuration says otherwise.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sends SIGHUP: the gateway reads its configuration file again.
    pub fn hangup(&self) {
        signal(&self.child, "HUP");
    }

    /// The configuration file the gateway was started with.
    pub fn config_path(&self) -> std::path::PathBuf {
        self.dir.path().join("hubgate.toml")
    }

    /// The entries of the audit log in the default data directory (`hubgate-data`), parsed.
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("hubgate-data/audit.jsonl"))
            .expect("the audit log")
            .lines()
            .map(|l| serde_json::from_str(l).expect("an audit entry"))
            .collect()
    }

    /// The gateway's log so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Waits until `/readyz` says the MQTT connection is up.
    pub fn wait_ready(&self) {
        wait_for(
            "the gateway to connect to the broker",
            Duration::from_secs(20),
            || http_get(self.admin, "/readyz").0 == 200,
        );
    }

    pub async fn client(&self) -> GatewayClient<Channel> {
        GatewayClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("gRPC connect")
    }

    /// The Prometheus page.
    pub fn metrics(&self) -> String {
        let (status, body) = http_get(self.admin, "/metrics");
        if status != 200 {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "GET /metrics on {} answered {status}; the gateway's log ends with:\n{}",
                self.admin,
                tail.join("\n")
            );
        }
        body
    }

    /// The value of one sample of a metric, or 0 if it is absent. `labels` must match exactly.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics(), name, labels)
    }

    /// Kills the gateway with SIGKILL (no chance to flush or close anything) and waits for it.
    pub fn kill(mut self) {
        self.child.kill().expect("kill the gateway");
        self.child.wait().expect("wait for the gateway");
    }

    /// Resident memory of the gateway process, in KiB (Linux).
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The most resident memory the gateway process has had, in KiB (Linux).
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} in /proc/PID/status"))
    }

    /// CPU time the gateway process has used, user and system, in seconds (Linux; clock ticks
    /// of 1/100 s).
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("read /proc/PID/stat");
        cpu_seconds_of_stat(&stat)
    }

    /// Bytes the gateway process has caused to be written to storage (`write_bytes` of
    /// /proc/PID/io, Linux): its own files, whatever the page cache later merges.
    pub fn disk_written_bytes(&self) -> u64 {
        let io = std::fs::read_to_string(format!("/proc/{}/io", self.child.id()))
            .expect("read /proc/PID/io");
        io.lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("write_bytes in /proc/PID/io"))
    }

    /// Stops the gateway with SIGTERM and waits for it.
    pub fn stop(mut self) -> std::process::ExitStatus {
        signal(&self.child, "TERM");
        self.child.wait().expect("wait for the gateway")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses one sample out of a Prometheus text page.
pub fn metric_value(page: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, mut have) = match series.split_once('{') {
            Some((m, rest)) => (
                m,
                rest.trim_end_matches('}')
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
            None => (series, Vec::new()),
        };
        have.sort();
        if metric == name && have == want {
            return value.parse().expect("metric value");
        }
    }
    0.0
}

/// A plain HTTP/1.0 GET on loopback: `(status, body)`.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, String::new());
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// An MQTT publisher with a persistent session: what the broker has not acknowledged is sent
/// again after a reconnect.
#[derive(Debug)]
pub struct Publisher {
    pub client: AsyncClient,
    acks: tokio::sync::watch::Receiver<u64>,
    driver: tokio::task::JoinHandle<()>,
    /// The last number [`Publisher::publish_numbers`] published.
    numbered: u64,
}

impl Publisher {
    pub fn connect(port: u16, client_id: &str) -> Self {
        Self::connect_sized(port, client_id, 1 << 20)
    }

    /// [`Publisher::connect`], sending packets of up to `max_packet` bytes.
    pub fn connect_sized(port: u16, client_id: &str, max_packet: usize) -> Self {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options
            .set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(max_packet, max_packet);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let (tx, acks) = tokio::sync::watch::channel(0);
        let driver = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        tx.send_modify(|n| *n += 1);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Self {
            client,
            acks,
            driver,
            numbered: 0,
        }
    }

    /// Publishes `{"n": k}` on `topic` for each k after the last number published up to `upto`,
    /// pausing briefly every 100, and waits until the broker acknowledged them all (this
    /// publisher publishes nothing else meanwhile).
    pub async fn publish_numbers(&mut self, topic: &str, upto: u64) {
        while self.numbered < upto {
            self.numbered += 1;
            self.publish(topic, format!("{{\"n\": {}}}", self.numbered))
                .await;
            if self.numbered.is_multiple_of(100) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        self.wait_acked(upto).await;
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish");
    }

    /// Waits until the broker has acknowledged at least `n` messages.
    pub async fn wait_acked(&mut self, n: u64) {
        tokio::time::timeout(Duration::from_secs(30), self.acks.wait_for(|&a| a >= n))
            .await
            .expect("the broker acknowledged every message")
            .expect("publisher running");
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// `config` with the files it names under `/etc/hubgate/` made in `dir` instead, so that a shipped
/// configuration can be checked as it is: certificates and keys are the test certificates
/// (`tests/fixtures/tls/`), other files (passwords, tokens) a placeholder secret; all readable by
/// their owner only, as hubgate requires.
pub fn with_secret_files(config: &str, dir: &Path) -> String {
    let fixtures = repo().join("tests/fixtures/tls");
    for name in config.split("\"/etc/hubgate/").skip(1) {
        let name = name.split('"').next().unwrap_or_default();
        let to = dir.join(name);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).expect("make the secrets directory");
        }
        match Path::new(name).extension().and_then(|e| e.to_str()) {
            Some("crt") => std::fs::copy(fixtures.join("server.crt"), &to).map(drop),
            Some("key") => std::fs::copy(fixtures.join("server.key"), &to).map(drop),
            _ => std::fs::write(&to, "placeholder-secret\n"),
        }
        .expect("write a secret file");
        std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod 600");
    }
    config.replace("\"/etc/hubgate/", &format!("\"{}/", dir.display()))
}

/// Field values of a record, as JSON-like strings keyed by path (for assertions).
pub fn fields(record: &hubgate_proto::v1::Record) -> HashMap<String, String> {
    use hubgate_proto::v1::value::Kind;
    record
        .fields
        .iter()
        .map(|(k, v)| {
            let text = match &v.kind {
                Some(Kind::IntValue(i)) => i.to_string(),
                Some(Kind::DoubleValue(d)) => d.to_string(),
                Some(Kind::StringValue(s)) => s.clone(),
                Some(Kind::BoolValue(b)) => b.to_string(),
                None => String::new(),
            };
            (k.clone(), text)
        })
        .collect()
}

/// The CPU time (user and system, seconds) in a Linux `/proc/…/stat` line, of a process or of
/// one of its threads.
pub fn cpu_seconds_of_stat(stat: &str) -> f64 {
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name, in
    // clock ticks of 1/100 s.
    let ticks = |i: usize| -> f64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0.0) };
    (ticks(11) + ticks(12)) / 100.0
}
