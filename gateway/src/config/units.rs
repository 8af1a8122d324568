//! Values with units in the configuration: durations ("30s") and sizes ("512MiB"); and URLs,
//! which must not carry credentials.

use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use hubgate_privacy::diagnostics::Diagnostics;

use serde::{Deserialize, Deserializer};

/// A size in bytes: an integer, or a string with a unit ("512MiB", "2GB", "64KiB").
pub(super) fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    let text = match Size::deserialize(d)? {
        Size::Bytes(n) => return Ok(n),
        Size::Text(t) => t,
    };
    parse_byte_size(&text).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "invalid size '{text}' (write e.g. \"512MiB\", \"2GB\" or a number of bytes)"
        ))
    })
}

pub(super) fn parse_byte_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(multiplier)
}

pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration '{text}' (write e.g. \"30s\"): {e}"
        ))
    })
}

/// Whether `url` carries credentials before its host (`scheme://user:password@host`): they would
/// be printed wherever the URL is (the log, `check`, the transparency register).
pub fn has_userinfo(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return url.contains('@');
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    authority.contains('@')
}

/// `url` with any credentials before its host replaced by `***`, for messages.
pub fn redacted(url: &str) -> String {
    if !has_userinfo(url) {
        return url.to_owned();
    }
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let at = rest.find('@').map_or(0, |i| i + 1);
    let scheme = if scheme.is_empty() {
        String::new()
    } else {
        format!("{scheme}://")
    };
    format!("{scheme}***@{}", &rest[at..])
}

/// Every string of the configuration `doc` that holds a URL with credentials, anywhere in its
/// text: URL settings are printed in logs and by `check`, and the register publishes the
/// policy's words; secrets belong in the `*_file` settings.
pub(super) fn refuse_credentials(doc: &DeTable<'_>, diags: &mut Diagnostics) {
    fn walk(path: &str, value: &Spanned<DeValue<'_>>, diags: &mut Diagnostics) {
        match value.get_ref() {
            DeValue::String(text)
                if text
                    .split_whitespace()
                    .any(|word| word.contains("://") && has_userinfo(word)) =>
            {
                diags.error(
                    value.span(),
                    format!(
                        "{path} must not hold credentials in a URL: it is printed in logs and \
                         by `explain`, and may be published; give secrets in a *_file setting"
                    ),
                );
            }
            DeValue::Table(table) => {
                for (key, value) in table {
                    walk(&join(path, key.get_ref()), value, diags);
                }
            }
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(&join(path, &i.to_string()), item, diags);
                }
            }
            _ => {}
        }
    }
    fn join(path: &str, key: &str) -> String {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    }
    for (key, value) in doc {
        walk(key.get_ref(), value, diags);
    }
}

#[cfg(test)]
mod url_tests {
    use super::*;

    #[test]
    fn credentials_in_urls_are_found_and_hidden() {
        for url in [
            "http://user:pass@hub:50051",
            "https://token@hub",
            "nats://a:b@localhost:4222/x",
        ] {
            assert!(has_userinfo(url), "{url}");
            assert!(!redacted(url).contains("pass") && redacted(url).contains("***@"));
        }
        for url in ["https://hub:50051", "https://hub/path@x", "http://[::1]:80"] {
            assert!(!has_userinfo(url), "{url}");
            assert_eq!(redacted(url), url);
        }
    }
}
