//! The embedded MQTT broker (rumqttd) behind `hubgate run` without a config and `hubgate demo`.
//!
//! It exists so a newcomer can see hubgate work without installing a broker; a deployment uses the
//! city's own broker. It is sized for a small hub: rumqttd's default router segments let its memory
//! grow to gigabytes under load, so each topic log here is capped at 4 segments of 1 MiB.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Where the embedded broker listens when the standard port is free.
pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1883);

/// Starts the broker on `preferred`, or on a free port if that one is taken (or is port 0).
///
/// Returns the address it listens on. The broker runs on its own threads for the life of the
/// process.
pub fn start(preferred: SocketAddr) -> anyhow::Result<SocketAddr> {
    let free_port = || -> std::io::Result<SocketAddr> {
        TcpListener::bind(SocketAddr::new(preferred.ip(), 0))?.local_addr()
    };
    let addr = match TcpListener::bind(preferred) {
        Ok(_) if preferred.port() == 0 => free_port()?,
        Ok(_) => preferred,
        Err(_) => {
            let addr = free_port()?;
            tracing::warn!(
                "port {} is taken (another MQTT broker is probably running there); the embedded broker \
                 listens on {addr} instead. To use your own broker, run `hubgate run --config FILE` with its \
                 address under [mqtt]",
                preferred.port()
            );
            addr
        }
    };
    let server = ServerSettings {
        name: "embedded".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 5000,
            max_payload_size: 256 * 1024,
            max_inflight_count: 256,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 128,
            max_outgoing_packet_count: 256,
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("embedded".to_owned(), server)])),
        ..Config::default()
    };
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(err) = broker.start() {
                tracing::error!(error = %err, "embedded MQTT broker stopped");
            }
        })?;
    Ok(addr)
}
