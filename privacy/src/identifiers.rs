//! Detectors for direct identifiers inside string values (ISO/IEC 20889: suppression).
//!
//! Every string that passes the allow-list is scanned. A value that holds a MAC address (EUI-48),
//! an EUI-64, an IMSI or IMEI, an e-mail address, a phone number, a licence plate matching one of
//! the stream's patterns, or inline image/video data is suppressed: the field is dropped or its
//! value replaced by a pseudonym, as the stream's policy says.
//!
//! The detectors are deliberately eager (when unsure, treat it as an identifier): a false positive
//! loses one field value, a false negative leaks a person's identifier.

use regex::Regex;

use crate::value::Value;
use serde::{Deserialize, Serialize};

/// Kinds of direct identifier the detectors recognise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdKind {
    /// EUI-48 / MAC address: `3c:22:fb:12:34:56`, `3c-22-fb-12-34-56`, `3c22.fb12.3456`, `3c22fb123456`.
    Mac,
    /// EUI-64: eight colon- or dash-separated octets, or 16 hex digits.
    Eui64,
    /// IMSI: 15 digits that fail the Luhn check.
    Imsi,
    /// IMEI: 15 digits that pass the Luhn check (or 16-digit IMEISV).
    Imei,
    /// E-mail address.
    Email,
    /// Phone number: `+` and 8 to 15 digits, or a national number starting with 0 and 9 to 12 digits.
    Phone,
    /// Licence plate, by the stream's patterns.
    Plate,
    /// Inline image or video data (data URLs, base64 of JPEG, PNG, GIF, MP4).
    Media,
}

impl IdKind {
    pub const ALL: [IdKind; 8] = [
        IdKind::Mac,
        IdKind::Eui64,
        IdKind::Imsi,
        IdKind::Imei,
        IdKind::Email,
        IdKind::Phone,
        IdKind::Plate,
        IdKind::Media,
    ];

    /// Short, stable name for metric labels.
    pub fn name(self) -> &'static str {
        match self {
            IdKind::Mac => "mac",
            IdKind::Eui64 => "eui64",
            IdKind::Imsi => "imsi",
            IdKind::Imei => "imei",
            IdKind::Email => "email",
            IdKind::Phone => "phone",
            IdKind::Plate => "plate",
            IdKind::Media => "media",
        }
    }
}

/// A configured set of detectors.
#[derive(Debug, Clone)]
pub struct Detector {
    kinds: Vec<IdKind>,
    plates: Vec<Regex>,
}

impl Detector {
    pub fn new(kinds: Vec<IdKind>, plates: Vec<Regex>) -> Self {
        Self { kinds, plates }
    }

    fn on(&self, kind: IdKind) -> bool {
        self.kinds.contains(&kind)
    }

    /// The first kind of identifier found in a value: in a string, anywhere in it.
    pub fn find_value(&self, value: &Value) -> Option<IdKind> {
        match value {
            Value::Str(s) => self.find(s),
            Value::Int(_) | Value::Float(_) | Value::Bool(_) => None,
        }
    }

    /// The first kind of identifier found anywhere in `s`, if any.
    pub fn find(&self, s: &str) -> Option<IdKind> {
        if self.on(IdKind::Media) && looks_like_media(s) {
            return Some(IdKind::Media);
        }
        if self.on(IdKind::Email) && has_email(s) {
            return Some(IdKind::Email);
        }
        if let Some(kind) = self.scan_hex_and_digits(s) {
            return Some(kind);
        }
        if self.on(IdKind::Plate) && self.plates.iter().any(|re| re.is_match(s)) {
            return Some(IdKind::Plate);
        }
        None
    }

    fn scan_hex_and_digits(&self, s: &str) -> Option<IdKind> {
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if !b[i].is_ascii_hexdigit() && b[i] != b'+' && b[i] != b'(' {
                i += 1;
                continue;
            }
            // Only start at a token boundary.
            if i > 0 && b[i - 1].is_ascii_alphanumeric() {
                i += 1;
                continue;
            }
            if let Some(kind) = self.match_at(&b[i..]) {
                return Some(kind);
            }
            i += 1;
        }
        None
    }

    fn match_at(&self, b: &[u8]) -> Option<IdKind> {
        // Separated octets: aa:bb:cc:dd:ee:ff (6 → MAC, 8 → EUI-64).
        if let Some(octets) = separated_octets(b) {
            if octets >= 8 && self.on(IdKind::Eui64) {
                return Some(IdKind::Eui64);
            }
            if octets >= 6 && self.on(IdKind::Mac) {
                return Some(IdKind::Mac);
            }
        }
        // Cisco dotted form: aabb.ccdd.eeff
        if self.on(IdKind::Mac) && dotted_mac(b) {
            return Some(IdKind::Mac);
        }
        let hex_run = b.iter().take_while(|c| c.is_ascii_hexdigit()).count();
        let boundary = b.get(hex_run).is_none_or(|c| !c.is_ascii_alphanumeric());
        let digits = b[..hex_run].iter().all(u8::is_ascii_digit);
        if boundary {
            if digits && (hex_run == 15 || hex_run == 16) {
                let imei = hex_run == 16 || luhn(&b[..15]);
                if imei && self.on(IdKind::Imei) {
                    return Some(IdKind::Imei);
                }
                if !imei && self.on(IdKind::Imsi) {
                    return Some(IdKind::Imsi);
                }
            } else if hex_run == 12 && self.on(IdKind::Mac) {
                return Some(IdKind::Mac);
            } else if hex_run == 16 && self.on(IdKind::Eui64) {
                return Some(IdKind::Eui64);
            }
        }
        if self.on(IdKind::Phone) && phone_at(b) {
            return Some(IdKind::Phone);
        }
        None
    }
}

/// Number of hex octets separated by one consistent ':' or '-' at the start of `b`.
fn separated_octets(b: &[u8]) -> Option<usize> {
    let hex2 =
        |i: usize| b.len() >= i + 2 && b[i].is_ascii_hexdigit() && b[i + 1].is_ascii_hexdigit();
    if !hex2(0) {
        return None;
    }
    let sep = *b.get(2)?;
    if sep != b':' && sep != b'-' {
        return None;
    }
    let mut octets = 1;
    let mut i = 2;
    while b.get(i) == Some(&sep) && hex2(i + 1) {
        octets += 1;
        i += 3;
    }
    let boundary = b.get(i).is_none_or(|c| !c.is_ascii_alphanumeric());
    (boundary && octets >= 6).then_some(octets)
}

fn dotted_mac(b: &[u8]) -> bool {
    b.len() >= 14
        && [0, 5, 10]
            .iter()
            .all(|&i| b[i..i + 4].iter().all(u8::is_ascii_hexdigit))
        && b[4] == b'.'
        && b[9] == b'.'
        && b.get(14).is_none_or(|c| !c.is_ascii_alphanumeric())
}

/// Luhn check over ASCII digits.
pub fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d - b'0');
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

fn phone_at(b: &[u8]) -> bool {
    let international = b.first() == Some(&b'+');
    let body = &b[usize::from(international)..];
    // A national number starts with a trunk prefix 0, possibly in parentheses ("(020) 555 0123");
    // "0." is a decimal, not a phone number.
    let national = matches!(body, [b'0', d, ..] | [b'(', b'0', d, ..] if d.is_ascii_digit() || *d == b' ' || *d == b'-' || *d == b')');
    if !international && !national {
        return false;
    }
    let mut digits = 0;
    let mut after_last_digit = 0;
    for (i, &c) in body.iter().enumerate() {
        match c {
            b'0'..=b'9' => {
                digits += 1;
                after_last_digit = i + 1;
            }
            b' ' | b'-' | b'.' | b'(' | b')' | b'/' => {}
            _ => break,
        }
    }
    let boundary = body
        .get(after_last_digit)
        .is_none_or(|c| !c.is_ascii_alphanumeric());
    boundary
        && if international {
            (8..=15).contains(&digits)
        } else {
            (9..=12).contains(&digits)
        }
}

fn has_email(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter().enumerate().any(|(i, &c)| {
        if c != b'@' || i == 0 {
            return false;
        }
        let local_ok = b[i - 1].is_ascii_alphanumeric() || b"._%+-".contains(&b[i - 1]);
        let domain: Vec<u8> = b[i + 1..]
            .iter()
            .copied()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == b'.' || *c == b'-')
            .collect();
        let dot = domain.iter().rposition(|&c| c == b'.');
        local_ok && dot.is_some_and(|d| d > 0 && domain.len() - d > 2)
    })
}

fn looks_like_media(s: &str) -> bool {
    let t = s.trim_start();
    const PREFIXES: [&str; 8] = [
        "data:image/",
        "data:video/",
        "/9j/",        // JPEG, base64
        "iVBORw0KGgo", // PNG, base64
        "R0lGOD",      // GIF, base64
        "AAAAGGZ0eXA", // MP4 ftyp box, base64
        "AAAAIGZ0eXA",
        "AAAAHGZ0eXA",
    ];
    PREFIXES.iter().any(|p| t.starts_with(p))
}

/// Whether a raw payload is an image or a video (by its magic bytes): such payloads are rejected
/// before decoding.
pub fn is_media_payload(p: &[u8]) -> bool {
    p.starts_with(&[0xFF, 0xD8, 0xFF])                       // JPEG
        || p.starts_with(b"\x89PNG\r\n\x1a\n")               // PNG
        || p.starts_with(b"GIF87a") || p.starts_with(b"GIF89a")
        || (p.starts_with(b"RIFF") && p.get(8..12).is_some_and(|t| t == b"WEBP" || t == b"AVI "))
        || p.get(4..8).is_some_and(|t| t == b"ftyp")          // MP4, MOV, HEIC
        || p.starts_with(&[0x1A, 0x45, 0xDF, 0xA3])          // Matroska, WebM
        || p.starts_with(&[0x00, 0x00, 0x00, 0x01, 0x67]) // H.264 Annex B SPS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Detector {
        let plate = Regex::new(r"\b[A-Z]{2}-[0-9]{3}-[A-Z]{2}\b").unwrap();
        Detector::new(IdKind::ALL.to_vec(), vec![plate])
    }

    #[test]
    fn finds_each_kind() {
        let d = all();
        let cases = [
            ("3c:22:fb:12:34:56", IdKind::Mac),
            ("probe from 3C-22-FB-12-34-56.", IdKind::Mac),
            ("3c22.fb12.3456", IdKind::Mac),
            ("mac=3c22fb123456", IdKind::Mac),
            ("00:11:22:ff:fe:33:44:55", IdKind::Eui64),
            ("imei 490154203237518", IdKind::Imei),
            ("204081234567890", IdKind::Imsi),
            ("ana.silva@example.org", IdKind::Email),
            ("call +31 20 555 0123", IdKind::Phone),
            ("+442071838750", IdKind::Phone),
            ("(020) 555 0123", IdKind::Phone),
            ("0612345678", IdKind::Phone),
            ("AB-123-CD", IdKind::Plate),
            ("data:image/png;base64,iVBORw0KGgo=", IdKind::Media),
            ("/9j/4AAQSkZJRgABAQ", IdKind::Media),
        ];
        for (text, kind) in cases {
            assert_eq!(d.find(text), Some(kind), "{text}");
        }
    }

    #[test]
    fn leaves_ordinary_values_alone() {
        let d = all();
        for text in [
            "north",
            "aq-03",
            "2024-03-01T12:00:00Z",
            "2024-03-01 12:00:00",
            "12:00:00",
            "0.123456789",
            "firmware 2.4.1",
            "12345",
            "a@b",
            "pm25 high",
            "car",
        ] {
            assert_eq!(d.find(text), None, "{text}");
        }
    }

    #[test]
    fn turned_off_detectors_do_not_fire() {
        let d = Detector::new(vec![IdKind::Email], Vec::new());
        assert_eq!(d.find("3c:22:fb:12:34:56"), None);
        assert_eq!(d.find("x@example.org"), Some(IdKind::Email));
    }

    #[test]
    fn luhn_checks_imei() {
        assert!(luhn(b"490154203237518"));
        assert!(!luhn(b"490154203237519"));
    }

    #[test]
    fn media_payloads_are_recognised_by_magic_bytes() {
        assert!(is_media_payload(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0]));
        assert!(is_media_payload(b"\x89PNG\r\n\x1a\nrest"));
        assert!(is_media_payload(b"\0\0\0\x18ftypmp42"));
        assert!(!is_media_payload(b"{\"pm25\": 3}"));
    }
}
