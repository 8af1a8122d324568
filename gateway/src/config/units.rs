//! Values with units in the configuration: durations ("30s") and sizes ("512MiB").

use std::time::Duration;

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
