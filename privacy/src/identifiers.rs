//! Detectors for direct identifiers inside kept values (ISO/IEC 20889: suppression).
//!
//! Every value that passes the allow-list as `keep` is scanned, strings and numbers. A value
//! that holds a MAC address (EUI-48), an EUI-64, an IMSI or IMEI, an e-mail address, a phone
//! number, a licence plate matching one of the stream's patterns, or inline image/video data is
//! suppressed: the field is dropped or its value replaced by a pseudonym, as the stream's policy
//! says.
//!
//! Detection runs on the folded text ([`crate::normalise::fold`]): escapes decoded, invisible
//! characters and combining marks removed, NFKC, digits of every script and look-alike letters
//! made ASCII. A first pass over it says which detectors can find anything. On it:
//! - **hex identifiers**: groups of hex digits separated by `:`, `-`, `.`, `_`, `/`, `|`, spaces
//!   or tabs (mixed or not, one separator between groups with spaces around it allowed; `,` and
//!   `;` only where a group holds a letter), of one size (2, 3, 4 or 6) making 12 digits (a MAC)
//!   or 16 (an EUI-64), the first and last group perhaps glued to a label's hex letters; and 12 to
//!   16 hex digits in one run that holds a letter, also glued to other letters or after `0x`.
//!   `O`, `I` and `l` between digits are read as digits. Digits only are not a MAC when they read
//!   as a decimal number, a list of numbers, a date and a time, or part of a longer number;
//! - **numbers**: digits grouped with spaces, dashes, dots, slashes or brackets (calendar dates
//!   neither are numbers nor join them): 14 to 16 digits (an IMEI, with Luhn, or an IMSI; mixed
//!   separators when the Luhn check passes), `+` or a leading trunk `0` and 8 to 15 digits, three
//!   or more groups of 2 to 4 digits (a national phone number), and any bare run of 10 or more
//!   digits that is not a time (2005 to a year ahead, in any unit): a phone number with its
//!   country code, an IMEI, or a MAC written as a number. Digits glued to letters are a word's, unless there are 12 or more,
//!   or 9 or more after a trunk `0` (`imei356…`, `tel0612…`);
//! - **e-mail addresses**, with international or punycode domains, and `@` or `.` spelled out
//!   ("at", "dot"), in brackets, or with spaces around;
//! - **licence plates**: the stream's patterns, matched in any case and with any spacing or
//!   separators between their parts (see [`plate_pattern`]);
//! - **base64**: a token that may be base64 (not a word, not one kind of character), also after a
//!   glued label of up to three characters, that decodes to text is scanned as text; one that
//!   decodes to 6 or 8 bytes and looks random is a MAC or an EUI-64.
//!
//! JSON numbers are scanned by the same number rule ([`Detector::find_value`]): an integer of 10
//! or more digits (without its sign), or a float with no fraction, is an identifier unless it is
//! a time. National phone numbers of 8 or 9 digits written as bare numbers are not found: as many
//! counters and codes have that many digits.
//!
//! Each identifier found has a canonical form ([`Found::canonical`]): every spelling of it gives
//! the same, so that it gets one pseudonym.
//!
//! The detectors are deliberately eager (when unsure, treat it as an identifier): a false positive
//! loses one field value, a false negative leaks a person's identifier.

use regex::Regex;

use crate::normalise::{self, fold, is_separator};
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

/// An identifier found in a value: its kind, and the one form every spelling of it gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub kind: IdKind,
    /// Lowercase hex of a MAC or EUI-64 (also when written as a number or in base64), the
    /// digits of a number, the lowercase address of an e-mail, the plate's letters and digits.
    pub canonical: String,
}

/// A configured set of detectors.
#[derive(Debug, Clone)]
pub struct Detector {
    kinds: Vec<IdKind>,
    plates: Vec<Regex>,
}

/// Times up to this far ahead of now are times, not identifiers.
const TIME_SLACK_MS: i64 = 366 * 86_400_000;

/// Most characters of a base64 token scanned for an identifier it encodes.
const BASE64_MAX: usize = 4096;

impl Detector {
    /// Detectors of `kinds`, with `plates` as the stream's plate patterns (see
    /// [`plate_pattern`] for how a pattern is matched).
    pub fn new(kinds: Vec<IdKind>, plates: Vec<Regex>) -> Self {
        Self { kinds, plates }
    }

    /// The stream's plate patterns, as the detector matches them.
    pub fn plates(&self) -> &[Regex] {
        &self.plates
    }

    fn on(&self, kind: IdKind) -> bool {
        self.kinds.contains(&kind)
    }

    /// The first kind of identifier found in a value: anywhere in a string, or a number that is
    /// one (see the module's description). `now_ms` tells times from identifiers.
    pub fn find_value(&self, value: &Value, now_ms: i64) -> Option<IdKind> {
        self.identify_value(value, Some(now_ms)).map(|f| f.kind)
    }

    /// [`Detector::find_value`], with the identifier's canonical form. Without `now_ms`, no
    /// number is taken for a time. An integer is read without its sign; a negative decimal number
    /// is a measurement.
    pub fn identify_value(&self, value: &Value, now_ms: Option<i64>) -> Option<Found> {
        match value {
            Value::Str(s) => self.identify(s, now_ms),
            // Fewer than 10 digits are never an identifier: not even written out.
            Value::Int(i) if i.unsigned_abs() < 1_000_000_000 => None,
            Value::Int(i) => self.number(&i.unsigned_abs().to_string(), now_ms),
            Value::Float(f) if *f >= 1e9 && f.fract() == 0.0 && *f < 1.8e19 => {
                self.number(&(*f as u64).to_string(), now_ms)
            }
            Value::Float(_) | Value::Bool(_) => None,
        }
    }

    /// The first kind of identifier found anywhere in `s`, if any.
    pub fn find(&self, s: &str, now_ms: i64) -> Option<IdKind> {
        self.identify(s, Some(now_ms)).map(|f| f.kind)
    }

    /// The first identifier found anywhere in `s`, with its canonical form.
    pub fn identify(&self, s: &str, now_ms: Option<i64>) -> Option<Found> {
        if self.on(IdKind::Media) && looks_like_media(s) {
            return Some(Found {
                kind: IdKind::Media,
                canonical: String::new(),
            });
        }
        if let Some(found) = self.plain_hex_id(s) {
            return Some(found);
        }
        let t = fold(s);
        self.scan(&t, now_ms, true)
    }

    /// The usual spellings of a MAC or an EUI-64 as a whole value (`3c:22:fb:12:34:56`,
    /// `3C-22-FB-12-34-56`, `3c22fb123456`), recognised without the full scan, which finds them
    /// too, with the same canonical form.
    fn plain_hex_id(&self, s: &str) -> Option<Found> {
        let b = s.as_bytes();
        let (kind, hex) = match b.len() {
            12 | 17 => (IdKind::Mac, 12),
            16 | 23 => (IdKind::Eui64, 16),
            _ => return None,
        };
        if !self.on(kind) {
            return None;
        }
        let grouped = b.len() != hex;
        let separator = b.get(2).copied().filter(|_| grouped);
        let ok = b.iter().enumerate().all(|(i, c)| {
            if grouped && i % 3 == 2 {
                Some(*c) == separator && matches!(c, b':' | b'-')
            } else {
                c.is_ascii_hexdigit()
            }
        });
        ok.then(|| Found {
            kind,
            canonical: hex_canonical(
                &b.iter()
                    .filter(|c| c.is_ascii_hexdigit())
                    .map(|c| char::from(*c))
                    .collect::<String>(),
            ),
        })
    }

    /// Scans folded text; `base64` says whether base64 tokens are decoded and scanned too (once:
    /// what they decode to is not decoded again).
    fn scan(&self, t: &str, now_ms: Option<i64>, base64: bool) -> Option<Found> {
        let shape = Shape::of(t);
        if shape.dot
            && self.on(IdKind::Email)
            && let Some(found) = email(t)
        {
            return Some(found);
        }
        if shape.hex_run
            && let Some(found) = self.hex_and_digits(t, now_ms)
        {
            return Some(found);
        }
        if self.on(IdKind::Plate)
            && let Some(found) = self.plate(t)
        {
            return Some(found);
        }
        if base64 && shape.base64_token {
            return self.base64(t, now_ms);
        }
        None
    }

    fn plate(&self, t: &str) -> Option<Found> {
        self.plates.iter().find_map(|re| {
            re.find(t).map(|m| Found {
                kind: IdKind::Plate,
                canonical: m
                    .as_str()
                    .chars()
                    .filter(char::is_ascii_alphanumeric)
                    .collect::<String>()
                    .to_ascii_uppercase(),
            })
        })
    }

    /// Hex identifiers and numbers in runs of hex digits, separators, `+` and brackets.
    fn hex_and_digits(&self, t: &str, now_ms: Option<i64>) -> Option<Found> {
        let mut chars: Vec<char> = t.chars().collect();
        digit_lookalikes(&mut chars);
        let mut i = 0;
        while i < chars.len() {
            if !in_hex_run(chars[i]) || is_separator(chars[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < chars.len() && in_hex_run(chars[i]) {
                i += 1;
            }
            // The run without the separators it ends with.
            let mut end = i;
            while end > start && is_separator(chars[end - 1]) {
                end -= 1;
            }
            // After `0x`, a run is a hex number, not glued to a word.
            let hex_prefix = start >= 2
                && matches!(chars[start - 1], 'x' | 'X')
                && chars[start - 2] == '0'
                && (start == 2 || !chars[start - 3].is_ascii_digit());
            let ends = Ends {
                glued_before: start > 0 && chars[start - 1].is_alphanumeric() && !hex_prefix,
                glued_after: end == i && chars.get(i).is_some_and(|c| c.is_alphanumeric()),
                hex_prefix,
            };
            // No identifier has fewer than 8 digits: a shorter run is a word or a reading.
            let digits = chars[start..end]
                .iter()
                .filter(|c| c.is_ascii_hexdigit())
                .count();
            if digits >= 8
                && let Some(found) = self.run(&chars[start..end], ends, now_ms)
            {
                return Some(found);
            }
        }
        None
    }

    /// One run of hex digits, separators, `+` and brackets, that begins and ends with no
    /// separator.
    fn run(&self, run: &[char], ends: Ends, now_ms: Option<i64>) -> Option<Found> {
        let groups = groups(run);
        if let Some(found) = self.grouped_hex(&groups) {
            return Some(found);
        }
        let alone =
            groups.len() == 1 && !groups[0].after_plus && !ends.glued_before && !ends.glued_after;
        for g in &groups {
            let hex = &g.text;
            let letters = hex.bytes().any(|b| b.is_ascii_alphabetic());
            // 12 to 16 hex digits in one run: a MAC or an EUI-64, also glued to letters; of
            // digits only, exactly 12 or 16 and standing alone (a longer or glued run of digits
            // is a number, below).
            let hex_id = (12..=16).contains(&hex.len()) && (letters || ends.hex_prefix)
                || alone && (hex.len() == 12 || hex.len() == 16);
            if hex_id {
                // Letters glued to 13 to 15 hex digits are a label's, not the identifier's.
                let hex = match hex.len() {
                    13..=15 if ends.glued_before => &hex[hex.len() - 12..],
                    13..=15 if ends.glued_after => &hex[..12],
                    _ => hex.as_str(),
                };
                let kind = if hex.len() == 16 {
                    IdKind::Eui64
                } else {
                    IdKind::Mac
                };
                if self.on(kind) {
                    return Some(Found {
                        kind,
                        canonical: hex_canonical(hex),
                    });
                }
            }
        }
        self.numbers(run, &groups, ends, now_ms)
    }

    /// Groups of one size (2, 3, 4 or 6 hex digits), each separated from the next by one
    /// separator, that make 12 digits (a MAC) or 16 (an EUI-64). The first group may carry hex
    /// letters glued before it (`mac3c:22:…`), the last hex letters glued after it. Groups of
    /// digits only are not an identifier when they read as a decimal number, a list of numbers,
    /// or a date and a time.
    fn grouped_hex(&self, groups: &[Group]) -> Option<Found> {
        for (kind, digits) in [(IdKind::Eui64, 16), (IdKind::Mac, 12)] {
            if !self.on(kind) {
                continue;
            }
            for size in [2, 3, 4, 6] {
                let n = digits / size;
                if digits % size != 0 || n < 2 {
                    continue;
                }
                for (i, window) in groups.windows(n).enumerate() {
                    // Digits joined to more digits are part of a longer number (an IMEI in
                    // groups of 2, 6, 6 and 1), not a MAC.
                    let digits = |g: &Group| g.text.bytes().all(|b| b.is_ascii_digit());
                    let longer = window.iter().all(digits)
                        && (i > 0 && window[0].after_one_separator && digits(&groups[i - 1])
                            || groups
                                .get(i + n)
                                .is_some_and(|g| g.after_one_separator && digits(g)));
                    if longer {
                        continue;
                    }
                    if let Some(hex) = grouped(window, size) {
                        return Some(Found {
                            kind,
                            canonical: hex_canonical(&hex),
                        });
                    }
                }
            }
        }
        None
    }

    /// Numbers: the digit groups of a run, joined by single separators (or brackets), read as one
    /// number.
    fn numbers(
        &self,
        run: &[char],
        groups: &[Group],
        ends: Ends,
        now_ms: Option<i64>,
    ) -> Option<Found> {
        for number in digit_numbers(run, groups) {
            let digits = number.digits.len();
            let found = if number.groups == 1 {
                // A bare run of digits glued to letters is part of a word or a code, unless it is
                // long enough to be an identifier with a label (`imei356938035643809`,
                // `tel0612345678`).
                let glued = number.first == 0 && ends.glued_before
                    || number.last + 1 == groups.len() && ends.glued_after;
                let labelled = digits >= 12 || number.digits.starts_with('0') && digits >= 9;
                if glued && !number.plus && !labelled {
                    continue;
                }
                let international = number.plus && (8..=15).contains(&digits);
                let national = number.digits.starts_with('0') && (9..=12).contains(&digits);
                if international || national {
                    self.number_found(IdKind::Phone, &number.digits)
                } else {
                    self.number(&number.digits, now_ms)
                }
            } else if (14..=16).contains(&digits)
                && (number.one_kind || digits == 15 && luhn(number.digits.as_bytes()))
            {
                let kind = imei_or_imsi(&number.digits);
                self.number_found(kind, &number.digits)
            } else if (number.plus || number.trunk) && (8..=15).contains(&digits)
                || number.phone_like && (9..=12).contains(&digits)
                || number.four_pairs
            {
                self.number_found(IdKind::Phone, &number.digits)
            } else {
                None
            };
            if found.is_some() {
                return found;
            }
        }
        None
    }

    fn number_found(&self, kind: IdKind, digits: &str) -> Option<Found> {
        self.on(kind).then(|| Found {
            kind,
            canonical: canonical_digits(digits),
        })
    }

    /// A number that is an identifier: 10 or more digits (a phone number with its country code,
    /// a MAC as a 48-bit value, an IMEI or an IMSI), not a time ([`is_time`]). Shorter numbers
    /// are counters, codes and readings as often as national phone numbers.
    fn number(&self, digits: &str, now_ms: Option<i64>) -> Option<Found> {
        let n = digits.parse::<u64>().ok()?;
        if n < 1_000_000_000 || is_time(n, digits.len(), now_ms) {
            return None;
        }
        let kind = match digits.len() {
            14..=16 => imei_or_imsi(digits),
            _ if (1 << 40..1 << 48).contains(&n) => IdKind::Mac,
            _ => IdKind::Phone,
        };
        // The kind is a guess for a bare number: whichever detector is on catches it.
        let kind = if self.on(kind) {
            kind
        } else {
            [IdKind::Mac, IdKind::Phone, IdKind::Imei, IdKind::Imsi]
                .into_iter()
                .find(|k| self.on(*k))?
        };
        Some(Found {
            kind,
            canonical: canonical_digits(digits),
        })
    }

    /// Base64 tokens: what one decodes to is scanned as text (once), and one of 6 or 8 bytes that
    /// looks random is a MAC or an EUI-64.
    fn base64(&self, t: &str, now_ms: Option<i64>) -> Option<Found> {
        let tokens = t.split(|c: char| !(c.is_ascii_alphanumeric() || "+/-_".contains(c)));
        for token in tokens.filter(|t| (8..=BASE64_MAX).contains(&t.len())) {
            // A word or words run together are not decoded. A label glued before the encoding
            // (`mac` in `macPCL7EjRW`) shifts it by up to three characters.
            for skip in 0..=3.min(token.len() - 8) {
                let token = &token[skip..];
                if !may_be_base64(token) {
                    continue;
                }
                let Some(bytes) = normalise::decode_base64(token) else {
                    continue;
                };
                if let Some(found) = self.decoded(&bytes, looks_random(token), now_ms) {
                    return Some(found);
                }
            }
        }
        None
    }

    /// What base64 decoded to: text is scanned (once: not decoded again); other bytes are a MAC
    /// or an EUI-64 when there are 6 or 8 of them and their encoding looks `random`, and are
    /// scanned as text where they are text.
    fn decoded(&self, bytes: &[u8], random: bool, now_ms: Option<i64>) -> Option<Found> {
        if let Ok(text) = std::str::from_utf8(bytes)
            && text.chars().all(|c| !c.is_control() || c.is_whitespace())
        {
            return self.scan(&fold(text), now_ms, false);
        }
        let kind = match bytes.len() {
            6 if random => Some(IdKind::Mac),
            8 if random => Some(IdKind::Eui64),
            _ => None,
        };
        if let Some(kind) = kind.filter(|k| self.on(*k)) {
            return Some(Found {
                kind,
                canonical: hex_canonical(
                    &bytes.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                ),
            });
        }
        // Text with a control character or a byte that is not UTF-8 in it: the text around.
        let text: String = String::from_utf8_lossy(bytes)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        self.scan(&fold(&text), now_ms, false)
    }
}

/// Every detector but plates and media, for canonical forms.
static EVERY_KIND: std::sync::LazyLock<Detector> = std::sync::LazyLock::new(|| {
    Detector::new(
        IdKind::ALL
            .into_iter()
            .filter(|k| !matches!(k, IdKind::Plate | IdKind::Media))
            .collect(),
        Vec::new(),
    )
});

/// The one string every spelling of a value gives, for its pseudonym: the canonical form of the
/// identifier it holds ([`Found::canonical`]: a MAC in any grouping, case, encoding or as a
/// number gives its 12 hex digits), else its folded text, trimmed and in lowercase
/// ([`normalise::plain`]); a number without an identifier, its digits. It does not depend on the
/// time: no number is taken for a time here.
pub fn canonical(value: &Value) -> String {
    match value {
        Value::Str(s) => match EVERY_KIND.identify(s, None) {
            Some(found) => found.canonical,
            None => normalise::plain(s),
        },
        Value::Int(i) if *i > 0 => canonical_number(i.unsigned_abs()),
        Value::Float(f) if *f > 0.0 && f.fract() == 0.0 && *f < 1.8e19 => {
            canonical_number(*f as u64)
        }
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Bool(b) => b.to_string(),
    }
}

/// Letters that look like digits, `O` like `0` and `I` or `l` like `1`, read as the digits
/// where they stand between digits or separators, next to a digit (`3c:22:fb:I2`).
fn digit_lookalikes(chars: &mut [char]) {
    let digitish = |c: char| c.is_ascii_digit() || is_separator(c);
    for i in 1..chars.len().saturating_sub(1) {
        let digit = match chars[i] {
            'O' | 'o' => '0',
            'I' | 'l' => '1',
            _ => continue,
        };
        let (before, after) = (chars[i - 1], chars[i + 1]);
        if digitish(before)
            && digitish(after)
            && (before.is_ascii_digit() || after.is_ascii_digit())
        {
            chars[i] = digit;
        }
    }
}

/// Whether `c` belongs to a run of hex digits, separators, `+` and brackets.
fn in_hex_run(c: char) -> bool {
    c.is_ascii_hexdigit() || is_separator(c) || matches!(c, '+' | '(' | ')')
}

/// Where in a folded text identifiers can be, from one pass over it: the detectors that cannot
/// find anything are not run.
#[derive(Debug, Default)]
struct Shape {
    /// A `.` or a spelled-out "dot": an e-mail domain needs one.
    dot: bool,
    /// A run of hex digits and separators holding 8 digits or more: no MAC, EUI-64, IMEI, IMSI or
    /// phone number has fewer.
    hex_run: bool,
    /// A token of 8 base64 characters or more: 6 bytes or more encoded.
    base64_token: bool,
}

/// Per ASCII byte, what [`Shape::of`] needs to know of it (bytes of other characters have none
/// of these).
const HEX: u8 = 1;
const RUN: u8 = 2;
const LOOKALIKE: u8 = 4;
const BASE64: u8 = 8;
const BYTE_CLASSES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 128 {
        let c = b as u8 as char;
        let mut class = 0;
        if c.is_ascii_hexdigit() {
            class |= HEX | RUN;
        }
        if matches!(
            c,
            ':' | '-' | '.' | '_' | ' ' | '\t' | '/' | '|' | ',' | ';' | '+' | '(' | ')'
        ) {
            class |= RUN;
        }
        if matches!(c, 'O' | 'o' | 'I' | 'l') {
            class |= LOOKALIKE;
        }
        if c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '-' | '_') {
            class |= BASE64;
        }
        table[b] = class;
        b += 1;
    }
    table
};

impl Shape {
    fn of(t: &str) -> Self {
        let mut shape = Self::default();
        let (mut hex, mut token) = (0usize, 0usize);
        let mut last_two = [0u8; 2];
        // Bytes, not characters: a character beyond ASCII is neither a digit, a separator nor
        // base64, and each of its bytes is read as such.
        for &b in t.as_bytes() {
            let class = BYTE_CLASSES[usize::from(b)];
            let lower = b.to_ascii_lowercase();
            shape.dot |= b == b'.' || (lower == b't' && last_two == *b"do");
            last_two = [last_two[1], lower];
            // Letters that may stand for digits ([`digit_lookalikes`]) count as digits here.
            hex = if class & (RUN | LOOKALIKE) != 0 {
                hex + usize::from(class & (HEX | LOOKALIKE) != 0)
            } else {
                0
            };
            shape.hex_run |= hex >= 8;
            token = if class & BASE64 != 0 { token + 1 } else { 0 };
            shape.base64_token |= token >= 8;
        }
        shape
    }
}

/// What surrounds a run: whether it is glued to letters or digits before or after it, and
/// whether it follows `0x`.
#[derive(Debug, Clone, Copy)]
struct Ends {
    glued_before: bool,
    glued_after: bool,
    hex_prefix: bool,
}

/// A group of a run: hex digits between separators.
#[derive(Debug)]
struct Group {
    text: String,
    /// Whether exactly one separator comes between this group and the one before.
    after_one_separator: bool,
    /// The separator before it, if one came (the last, when several did).
    separator: Option<char>,
    /// Whether `+` comes right before it.
    after_plus: bool,
}

/// The hex-digit groups of a run, split at separators, `+` and brackets.
fn groups(run: &[char]) -> Vec<Group> {
    let mut out: Vec<Group> = Vec::new();
    let mut current = String::new();
    // Between the group being read and the one before: spaces, other separators, and whether
    // anything else (a `+`, a bracket) came.
    let (mut spaces, mut marks, mut other) = (0usize, 0usize, false);
    let mut separator = None;
    let mut previous = None;
    let mut plus = false;
    let joined = |spaces: usize, marks: usize, other: bool| {
        // One separator, perhaps with spaces around it (`3c: 22`, `06 - 1234`), or one space.
        !other && (marks == 1 && spaces <= 2 || marks == 0 && spaces == 1)
    };
    for &c in run {
        if c.is_ascii_hexdigit() {
            if current.is_empty() {
                plus = previous == Some('+');
            }
            current.push(c);
            previous = Some(c);
            continue;
        }
        if !current.is_empty() {
            out.push(Group {
                text: std::mem::take(&mut current),
                after_one_separator: joined(spaces, marks, other),
                separator,
                after_plus: plus,
            });
            (spaces, marks, other) = (0, 0, false);
            separator = None;
        }
        if matches!(c, ' ' | '\t') {
            spaces += 1;
            separator = separator.or(Some(' '));
        } else if is_separator(c) {
            marks += 1;
            separator = Some(c);
        } else {
            other = true;
        }
        previous = Some(c);
    }
    if !current.is_empty() {
        out.push(Group {
            text: current,
            after_one_separator: joined(spaces, marks, other),
            separator,
            after_plus: plus,
        });
    }
    out
}

/// A number read from a run: its digits, how many groups they came in, and how it was written.
#[derive(Debug)]
struct Number {
    digits: String,
    groups: usize,
    /// Its first and last group, among the run's.
    first: usize,
    last: usize,
    /// Written after `+`.
    plus: bool,
    /// Begins with a trunk `0` (or a bracketed one) and is grouped.
    trunk: bool,
    /// One kind of separator between its groups.
    one_kind: bool,
    /// Three or more groups of 2 to 4 digits, one kind of separator (or brackets): a national
    /// phone number.
    phone_like: bool,
    /// Four pairs of digits with one separator, not `.`: the 8-digit national numbers of the
    /// Nordic countries (`12 34 56 78`), which have no trunk prefix.
    four_pairs: bool,
}

/// The numbers of a run: maximal sequences of all-digit groups, each joined to the next by one
/// separator (not `:`, which writes times) or a bracket. A decimal fraction (`52.3702`) is not a
/// number here.
fn digit_numbers(run: &[char], groups: &[Group]) -> Vec<Number> {
    let text: String = run.iter().collect();
    let bracketed = text.contains('(');
    let digits_only = |g: &Group| g.text.bytes().all(|b| b.is_ascii_digit());
    let mut out = Vec::new();
    let mut i = 0;
    while i < groups.len() {
        if is_date(groups, i) {
            i += 3;
            continue;
        }
        if !digits_only(&groups[i]) {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < groups.len()
            && digits_only(&groups[j])
            && (groups[j].after_one_separator || bracketed)
            && !groups[j]
                .separator
                .is_some_and(|c| c == ':' || normalise::is_list_separator(c))
            && !is_date(groups, j)
        {
            j += 1;
        }
        let parts = &groups[i..j];
        let digits: String = parts.iter().map(|g| g.text.as_str()).collect();
        let separators: Vec<Option<char>> = parts[1..].iter().map(|g| g.separator).collect();
        let one_kind = separators.windows(2).all(|w| w[0] == w[1]);
        let decimal = parts.len() == 2
            && separators == [Some('.')]
            && digits.len() < 14
            && !groups[i].after_plus;
        if !decimal {
            out.push(Number {
                groups: parts.len(),
                first: i,
                last: j - 1,
                plus: groups[i].after_plus,
                trunk: (parts.len() > 1 || bracketed) && digits.starts_with('0'),
                one_kind,
                phone_like: (parts.len() >= 3 && one_kind || bracketed)
                    && parts.iter().all(|p| (2..=4).contains(&p.text.len())),
                four_pairs: parts.len() == 4
                    && one_kind
                    && separators[0] != Some('.')
                    && parts.iter().all(|p| p.text.len() == 2),
                digits,
            });
        }
        i = j;
    }
    out
}

/// Whether the groups from `i` write a calendar date, `2016-03-15`, `2016/03/15`, `15.03.2016`,
/// `15/03/2016`, `15-03-2016` or `15-03-16`: one separator kind, a year from 1900 to 2199 (or of
/// two digits, last), a month and a day.
/// A date is neither a number nor part of one.
fn is_date(groups: &[Group], i: usize) -> bool {
    let Some(g) = groups.get(i..i + 3) else {
        return false;
    };
    let value = |k: usize| -> Option<u32> {
        let t = &g[k].text;
        (t.bytes().all(|b| b.is_ascii_digit()) && !t.is_empty())
            .then(|| t.parse().ok())
            .flatten()
    };
    let separator = g[1].separator;
    if !matches!(separator, Some('-' | '/' | '.'))
        || g[2].separator != separator
        || !g[1].after_one_separator
        || !g[2].after_one_separator
    {
        return false;
    }
    let (Some(a), Some(b), Some(c)) = (value(0), value(1), value(2)) else {
        return false;
    };
    let year = |k: usize, y: u32| g[k].text.len() == 4 && (1900..2200).contains(&y);
    let day_month = |d: u32, m: u32, k: usize| {
        (1..=31).contains(&d) && (1..=12).contains(&m) && g[k].text.len() <= 2
    };
    // A year of two digits (`01-12-26`) only where the date ends there: `06-12-34-56-78` is a
    // phone number.
    let ends = groups
        .get(i + 3)
        .is_none_or(|next| !next.after_one_separator || next.separator != separator);
    let short_year = g[2].text.len() == 2 && ends;
    (year(0, a) && day_month(c, b, 1) && g[2].text.len() <= 2)
        || ((year(2, c) || short_year) && day_month(a, b, 0) && g[1].text.len() <= 2)
}

/// IMEI when the 15 digits pass the Luhn check (or there are 14 or 16 of them), else IMSI.
fn imei_or_imsi(digits: &str) -> IdKind {
    if digits.len() != 15 || luhn(digits.as_bytes()) {
        IdKind::Imei
    } else {
        IdKind::Imsi
    }
}

/// The hex digits of `window`'s groups, if they write one identifier in groups of `size`.
fn grouped(window: &[Group], size: usize) -> Option<String> {
    let last = window.len() - 1;
    let letters = |t: &str| t.bytes().all(|b| b.is_ascii_alphabetic());
    let mut hex = String::with_capacity(size * window.len());
    for (k, g) in window.iter().enumerate() {
        let t = g.text.as_str();
        let part = if t.len() == size {
            t
        } else if k == 0 && t.len() > size && letters(&t[..t.len() - size]) {
            &t[t.len() - size..]
        } else if k == last && k > 0 && t.len() > size && letters(&t[size..]) {
            &t[..size]
        } else {
            return None;
        };
        if k > 0 && !g.after_one_separator {
            return None;
        }
        hex.push_str(part);
    }
    if hex.bytes().all(|b| b.is_ascii_digit()) {
        let separators: Vec<Option<char>> = window[1..].iter().map(|g| g.separator).collect();
        let decimal = window.len() == 2 && matches!(separators[0], Some('.' | ','));
        let list = separators
            .iter()
            .any(|c| c.is_some_and(normalise::is_list_separator));
        // `01-12-26 12:34:56`: a date, a space, a time.
        let value = |k: usize| window[k].text.parse::<u32>().unwrap_or(99);
        let date_time = window.len() == 6
            && separators[2] == Some(' ')
            && separators[3..] == [Some(':'), Some(':')]
            && value(3) <= 23
            && value(4) <= 59
            && value(5) <= 59;
        if decimal || list || date_time {
            return None;
        }
    }
    Some(hex)
}

/// The canonical form of a MAC or an EUI-64 from its hex digits: that of the number they write
/// ([`canonical_number`]), so that the value written in hex, as a number or in base64 is one.
fn hex_canonical(hex: &str) -> String {
    u64::from_str_radix(hex, 16).map_or_else(|_| hex.to_ascii_lowercase(), canonical_number)
}

/// The canonical form of a number: 12 hex digits when it is a 48-bit value of the size most MACs
/// have, its decimal digits otherwise. A MAC and an EUI-64 have the form of their value too, so
/// every spelling of one value is one.
fn canonical_number(n: u64) -> String {
    if (1 << 40..1 << 48).contains(&n) {
        format!("{n:012x}")
    } else {
        n.to_string()
    }
}

/// The canonical form of a number's digits: after an international prefix `00` is dropped, that
/// of the number they write ([`canonical_number`]), unless they begin with a trunk `0`, which is
/// kept.
fn canonical_digits(digits: &str) -> String {
    let digits = digits.strip_prefix("00").unwrap_or(digits);
    match digits.parse::<u64>() {
        Ok(n) if !digits.starts_with('0') => canonical_number(n),
        _ => digits.to_owned(),
    }
}

/// Whether `n` reads as a time from 2005 to a year after `now_ms`, in seconds, milliseconds,
/// microseconds or nanoseconds since the Unix epoch; without a clock, no number is a time. No
/// phone number with its country code reads as such a time: those of 10 to 12 digits read as
/// times before 2005 or after 2100 in every unit, and country codes do not begin with the
/// digits of a 13-digit time.
fn is_time(n: u64, written: usize, now_ms: Option<i64>) -> bool {
    /// 2005-01-01T00:00:00Z.
    const EARLIEST_MS: i128 = 1_104_537_600_000;
    let Some(now) = now_ms else {
        return false;
    };
    let latest = i128::from(now) + i128::from(TIME_SLACK_MS);
    let plausible = |ms: i128| (EARLIEST_MS..=latest).contains(&ms);
    // A time is written without leading zeros: as many digits as its unit's times have.
    let n = i128::from(n);
    [(1000, 1, 10), (1, 1, 13), (1, 1000, 16), (1, 1_000_000, 19)]
        .into_iter()
        .any(|(mul, div, len)| written == len && plausible(n * mul / div))
}

/// Whether a token may be base64 worth decoding: not one kind of character only (`ABCDEFGH`,
/// `temperature`), and not words run together ([`camel_words`]).
fn may_be_base64(token: &str) -> bool {
    let b = token.as_bytes();
    let kinds = [
        b.iter().any(u8::is_ascii_uppercase),
        b.iter().any(u8::is_ascii_lowercase),
        b.iter().any(u8::is_ascii_digit),
        b.iter().any(|c| !c.is_ascii_alphanumeric()),
    ];
    kinds.iter().filter(|k| **k).count() >= 2 && !camel_words(token)
}

/// Whether a base64 token looks like encoded bytes rather than a word or a code: it holds `+`
/// or `/`, or its characters change between capitals, small letters and digits at least three
/// times (`PCL7EjRW`, not `Obsv4567` or `Category`), and it is not words run together
/// ([`camel_words`]). Bytes encoded this way almost always do.
fn looks_random(token: &str) -> bool {
    let class = |c: char| {
        if c.is_ascii_uppercase() {
            0
        } else if c.is_ascii_lowercase() {
            1
        } else {
            2
        }
    };
    let changes = token
        .chars()
        .zip(token.chars().skip(1))
        .filter(|(a, b)| class(*a) != class(*b))
        .count();
    (token.contains(['+', '/']) || changes >= 3) && !camel_words(token)
}

/// Whether a token is words run together in camel case, perhaps followed by a number
/// (`HomeNetwork`, `deviceId`, `Sensor12`): letters in which every capital is followed by a small
/// letter and every word holds a vowel. Random bytes in base64 seldom are: of 6 random bytes,
/// 0.5 % more are taken for words than by the count of changes alone (7.0 % against 6.5 %), of
/// 8 bytes 0.1 % (0.9 % against 0.8 %).
fn camel_words(token: &str) -> bool {
    let letters = token.trim_end_matches(|c: char| c.is_ascii_digit());
    let bytes = letters.as_bytes();
    let capital_then_small = bytes.iter().enumerate().all(|(i, c)| {
        !c.is_ascii_uppercase() || bytes.get(i + 1).is_some_and(u8::is_ascii_lowercase)
    });
    !bytes.is_empty()
        && bytes.iter().all(u8::is_ascii_alphabetic)
        && capital_then_small
        && words(letters)
            .all(|w| w.contains(['a', 'e', 'i', 'o', 'u', 'y', 'A', 'E', 'I', 'O', 'U', 'Y']))
}

/// The words of a camel-case token: each capital starts one.
fn words(letters: &str) -> impl Iterator<Item = &str> {
    let mut starts: Vec<usize> = letters
        .char_indices()
        .filter(|(i, c)| *i > 0 && c.is_ascii_uppercase())
        .map(|(i, _)| i)
        .collect();
    starts.insert(0, 0);
    starts.push(letters.len());
    (0..starts.len() - 1).map(move |k| &letters[starts[k]..starts[k + 1]])
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

/// An e-mail address in folded text, with an "at" or "dot" spelled out (`ana (at) example (dot)
/// org`, `ana at example dot org`) read as `@` and `.`; domains may be international.
fn email(t: &str) -> Option<Found> {
    let at = SPELLED_AT.replace_all(t, "@");
    if !at.contains('@') {
        return None;
    }
    let text = SPELLED_DOT.replace_all(&at, ".");
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c != '@' || i == 0 {
            continue;
        }
        let local_ok = |c: char| c.is_alphanumeric() || "._%+-'".contains(c);
        let mut start = i;
        while start > 0 && local_ok(chars[start - 1]) {
            start -= 1;
        }
        if start == i {
            continue;
        }
        let mut end = i + 1;
        while end < chars.len()
            && (chars[end].is_alphanumeric() || chars[end] == '.' || chars[end] == '-')
        {
            end += 1;
        }
        let domain: String = chars[i + 1..end].iter().collect();
        let domain = domain.trim_end_matches(['.', '-']);
        let labels: Vec<&str> = domain.split('.').collect();
        // A top-level domain of letters, or in punycode (`xn--p1ai`).
        let tld_ok = labels.last().is_some_and(|tld| {
            tld.chars().count() >= 2 && tld.chars().all(char::is_alphabetic)
                || tld.len() > 4
                    && tld.starts_with("xn--")
                    && tld.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
        if labels.len() >= 2 && labels.iter().all(|l| !l.is_empty()) && tld_ok {
            let local: String = chars[start..i].iter().collect();
            return Some(Found {
                kind: IdKind::Email,
                canonical: format!("{local}@{domain}").to_lowercase(),
            });
        }
    }
    None
}

/// `@` or `at` in brackets (`(at)`, `[ at ]`, `{@}`, `<at>`), `at` as a word between spaces, and
/// `@` with spaces around it.
static SPELLED_AT: std::sync::LazyLock<Regex> = std::sync::LazyLock::new(|| {
    Regex::new(r"(?i) *[(\[{<] *(?:at|@) *[)\]}>] *| +at +| *@ *").expect("a valid pattern")
});

/// `.` or `dot` in brackets, `dot` as a word between spaces, and `.` with spaces on both sides.
static SPELLED_DOT: std::sync::LazyLock<Regex> = std::sync::LazyLock::new(|| {
    Regex::new(r"(?i) *[(\[{<] *(?:dot|\.) *[)\]}>] *| +dot +| +\. +").expect("a valid pattern")
});

/// A plate pattern as the detector matches it: in any case, and with any separators (or none)
/// where the pattern has a space, `-`, `.`, `_`, `/` or `\s`, or nothing, between its parts, so
/// that `AB-123-CD`,
/// `ab 123 cd` and `AB123CD` all match `[A-Z]{2}-[0-9]{3}-[A-Z]{2}`.
pub fn plate_pattern(pattern: &str) -> Result<Regex, regex::Error> {
    use regex_syntax::ast::{self, Ast};
    let mut ast = ast::parse::Parser::new()
        .parse(pattern)
        .map_err(|e| regex::Error::Syntax(e.to_string()))?;
    /// `[\s\-._·/|]*`: any separators, or none.
    fn loose() -> Option<Ast> {
        ast::parse::Parser::new().parse(r"[\s\-._·/|]*").ok()
    }
    fn is_separator(ast: &Ast) -> bool {
        match ast {
            Ast::Literal(l) => matches!(l.c, ' ' | '-' | '.' | '_' | '/' | '\u{00B7}'),
            Ast::ClassPerl(c) => c.kind == ast::ClassPerlKind::Space && !c.negated,
            _ => false,
        }
    }
    /// Whether `ast` matches the letters or digits of a plate (not a separator or an anchor).
    fn is_part(ast: &Ast) -> bool {
        match ast {
            Ast::Literal(l) => l.c.is_alphanumeric(),
            Ast::ClassBracketed(_) | Ast::ClassUnicode(_) | Ast::Group(_) => true,
            Ast::ClassPerl(c) => c.kind != ast::ClassPerlKind::Space,
            Ast::Repetition(r) => is_part(&r.ast),
            _ => false,
        }
    }
    fn loosen(ast: &mut Ast) {
        if is_separator(ast) {
            if let Some(l) = loose() {
                *ast = l;
            }
            return;
        }
        match ast {
            Ast::Repetition(r) => loosen(&mut r.ast),
            Ast::Group(g) => loosen(&mut g.ast),
            Ast::Alternation(a) => a.asts.iter_mut().for_each(loosen),
            Ast::Concat(c) => {
                // Separators where the pattern has none, between its parts: a pattern written
                // `[A-Z]{2}[0-9]{3}` matches `AB 123` too.
                let mut parts: Vec<Ast> = Vec::with_capacity(2 * c.asts.len());
                for mut part in c.asts.drain(..) {
                    let between = parts.last().is_some_and(is_part) && is_part(&part);
                    loosen(&mut part);
                    if between && let Some(l) = loose() {
                        parts.push(l);
                    }
                    parts.push(part);
                }
                c.asts = parts;
            }
            _ => {}
        }
    }
    loosen(&mut ast);
    let mut loosened = String::new();
    ast::print::Printer::new()
        .print(&ast, &mut loosened)
        .map_err(|e| regex::Error::Syntax(e.to_string()))?;
    Regex::new(&format!("(?i){loosened}"))
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
mod tests;
