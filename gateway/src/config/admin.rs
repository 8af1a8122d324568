//! `[admin]`: the admin HTTP listener (metrics, health, the transparency register).

use std::net::SocketAddr;

use serde::Deserialize;

/// The admin HTTP endpoint (`/metrics`, `/healthz`, `/readyz`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address to listen on; port 0 picks a free port (printed at start).
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}
