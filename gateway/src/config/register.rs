//! `[register]`: who runs the hub and where, for the transparency register.

use hubgate_privacy::diagnostics::Diagnostics;
use serde::Deserialize;

use super::keys::Keys;

/// Who runs the hub and where, for the transparency register (see [`crate::governance::register`]).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RegisterConfig {
    /// The organisation accountable for the hub (the controller, in GDPR terms).
    pub controller: Option<String>,
    /// How residents reach the controller: an address, e-mail or web page.
    pub contact: Option<String>,
    /// The data protection officer's contact, if there is one.
    pub dpo_contact: Option<String>,
    /// Where the hub and its sensors are, in words a resident recognises.
    pub location: Option<String>,
    /// The public address of the transparency page, for the QR code on printed signs.
    pub public_url: Option<String>,
    /// When the deployment is planned to end (YYYY-MM-DD), if it is.
    pub end_date: Option<String>,
}

impl RegisterConfig {
    pub(super) fn check(&self, keys: &Keys, diags: &mut Diagnostics) {
        if self
            .controller
            .as_deref()
            .is_none_or(|c| c.trim().is_empty())
        {
            diags.warning(
                keys.at("controller"),
                "[register] names no controller: the transparency register cannot say who is accountable for the hub",
            );
        }
        if let Some(url) = &self.public_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            diags.error(
                keys.at("public_url"),
                format!(
                    "register.public_url '{}' must be an http:// or https:// address",
                    super::units::redacted(url)
                ),
            );
        }
        if let Some(date) = &self.end_date
            && humantime::parse_rfc3339(&format!("{date}T00:00:00Z")).is_err()
        {
            diags.error(
                keys.at("end_date"),
                format!("register.end_date '{date}' must be a date written YYYY-MM-DD"),
            );
        }
    }
}
