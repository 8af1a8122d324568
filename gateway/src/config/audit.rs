//! `[audit]`: the audit log's own retention.

use std::time::Duration;

use hubgate_privacy::diagnostics::Diagnostics;
use serde::Deserialize;

use super::keys::Keys;
use super::units::duration;

/// The audit log's own settings (see [`crate::governance::audit`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// How long audit entries are kept ("730d" by default).
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention: DEFAULT_AUDIT_RETENTION,
        }
    }
}

/// How long the audit log keeps entries when the configuration does not say: two years.
pub const DEFAULT_AUDIT_RETENTION: Duration = Duration::from_secs(730 * 86_400);

impl AuditConfig {
    pub(super) fn check(&self, keys: &Keys, diags: &mut Diagnostics) {
        if self.retention < Duration::from_secs(86_400) {
            diags.error(
                keys.at("retention"),
                "audit.retention must be at least 1 day",
            );
        }
    }
}
