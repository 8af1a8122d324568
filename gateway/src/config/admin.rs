//! `[admin]`: the operator's HTTP listener (metrics, health), and the public one for the
//! transparency notice.

use std::net::SocketAddr;

use hubgate_privacy::diagnostics::Diagnostics;
use serde::Deserialize;

use super::keys::Keys;

/// The admin HTTP endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// The operator's listener: `/metrics`, `/healthz`, `/readyz` (and the transparency notice,
    /// when `public_listen` is not set). Port 0 picks a free port (printed at start).
    pub listen: SocketAddr,
    /// The public listener of the transparency notice (`/transparency`, `/transparency.json`,
    /// `/processing-record`), apart from the operator's telemetry. Port 0 picks a free port.
    pub public_listen: Option<SocketAddr>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            public_listen: None,
        }
    }
}

impl AdminConfig {
    pub(super) fn check(&self, keys: &Keys, diags: &mut Diagnostics) {
        if !self.listen.ip().is_loopback() {
            diags.warning(
                keys.at("listen"),
                format!(
                    "admin.listen {} is not a loopback address: /metrics and /readyz are served without authentication to anyone who can reach it; keep it on loopback (or behind a proxy that authenticates) and publish the transparency notice on admin.public_listen",
                    self.listen
                ),
            );
        }
        if let Some(public) = self.public_listen
            && public == self.listen
            && public.port() != 0
        {
            diags.error(
                keys.at("public_listen"),
                "admin.public_listen must differ from admin.listen",
            );
        }
    }
}
