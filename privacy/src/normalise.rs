//! The one normaliser: text as the identifier detectors and pseudonymisation see it.
//!
//! An identifier can be written in many spellings that mean the same to a person: with other
//! separators or grouping, in capitals, percent-encoded, with zero-width characters inside, in
//! full-width or mathematical digits, with Cyrillic or Greek letters that look like Latin ones.
//! [`fold`] takes every such spelling to one plain text, so that the detectors
//! ([`crate::identifiers`]) look for identifiers in one form only, and every spelling of one
//! identifier has one canonical form ([`crate::identifiers::canonical`]), so that
//! pseudonymisation gives one device one pseudonym ([`crate::pseudonym`]). Both the detectors and
//! the pseudonyms use this module; no other code folds text.
//!
//! [`fold`], in order:
//! 1. percent-decoding, repeated while it changes something (at most three times), so that
//!    `3c%253A22` is read as `3c:22`;
//! 2. invisible characters removed: Unicode's default-ignorable code points (zero-width spaces
//!    and joiners, soft hyphens, direction marks, variation selectors, tags, fillers);
//! 3. Unicode NFKC (ICU4X's normaliser): full-width, mathematical, circled and other
//!    compatibility forms become their plain characters (`３ｃ：２２` is `3c:22`);
//! 4. decimal digits of every script become ASCII digits (`٣` is `3`);
//! 5. letters that look like ASCII letters (UTS #39 confusables, through `unicode-security`)
//!    become them, when they look like one ASCII character (Cyrillic `с` is `c`). ASCII is
//!    never changed by this step.
//!
//! Case is left alone; the detectors match hex digits and e-mail addresses in any case.

use std::borrow::Cow;

use base64::Engine as _;
use icu_normalizer::ComposingNormalizerBorrowed;
use icu_properties::CodePointMapData;
use icu_properties::props::GeneralCategory;

const NFKC: ComposingNormalizerBorrowed<'static> = ComposingNormalizerBorrowed::new_nfkc();

/// Text as the detectors see it (see the module's description).
pub fn fold(s: &str) -> Cow<'_, str> {
    let plain = s.bytes().all(|b| b.is_ascii() && b != b'%');
    if plain {
        return Cow::Borrowed(s);
    }
    let decoded = percent_decoded(s);
    let visible: String = decoded.chars().filter(|c| !is_invisible(*c)).collect();
    let nfkc = NFKC.normalize(&visible);
    let mut out = String::with_capacity(nfkc.len());
    for c in nfkc.chars() {
        if c.is_ascii() {
            out.push(c);
        } else if let Some(d) = digit_value(c) {
            out.push(char::from(b'0' + d));
        } else if c == '\u{3002}' {
            // The ideographic full stop, which IDNA reads as a domain's dot.
            out.push('.');
        } else if let Some(a) = ascii_lookalike(c) {
            out.push(a);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Percent-decodes `s` while that changes it (at most three times); invalid escapes and bytes
/// that are not UTF-8 are kept as they are.
fn percent_decoded(s: &str) -> Cow<'_, str> {
    let mut text = Cow::Borrowed(s);
    for _ in 0..3 {
        if !text.contains('%') {
            break;
        }
        let next = percent_encoding::percent_decode_str(&text)
            .decode_utf8_lossy()
            .into_owned();
        if next == *text {
            break;
        }
        text = Cow::Owned(next);
    }
    text
}

/// Whether `c` is invisible: a default-ignorable code point (Unicode's
/// Default_Ignorable_Code_Point), or an interlinear annotation mark.
pub fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}'
        | '\u{034F}'
        | '\u{061C}'
        | '\u{115F}' | '\u{1160}'
        | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}'
        | '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}'
        | '\u{3164}'
        | '\u{FE00}'..='\u{FE0F}'
        | '\u{FEFF}'
        | '\u{FFA0}'
        | '\u{FFF0}'..='\u{FFFB}'
        | '\u{1BCA0}'..='\u{1BCA3}'
        | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0000}'..='\u{E0FFF}')
}

/// The value of a decimal digit of any script (General_Category Nd). Nd digits come in runs
/// of ten, zero first.
fn digit_value(c: char) -> Option<u8> {
    let gc = CodePointMapData::<GeneralCategory>::new();
    if gc.get(c) != GeneralCategory::DecimalNumber {
        return None;
    }
    let mut start = u32::from(c);
    while start > 0
        && char::from_u32(start - 1).is_some_and(|p| gc.get(p) == GeneralCategory::DecimalNumber)
    {
        start -= 1;
    }
    u8::try_from((u32::from(c) - start) % 10).ok()
}

/// The ASCII letter, digit or separator a non-ASCII character looks like, when it looks like one
/// (its UTS #39 skeleton is one ASCII character).
fn ascii_lookalike(c: char) -> Option<char> {
    let mut buf = [0u8; 4];
    let mut skeleton = unicode_security::skeleton(c.encode_utf8(&mut buf));
    let first = skeleton.next()?;
    if skeleton.next().is_some() || !first.is_ascii() || first.is_ascii_control() {
        return None;
    }
    Some(first)
}

/// Characters that separate the groups of an identifier's digits: `3c:22:fb`, `3c22.fb12`,
/// `3c 22 fb`, `3c_22_fb`.
pub fn is_separator(c: char) -> bool {
    matches!(c, ':' | '-' | '.' | '_' | ' ' | '/' | '\u{00B7}')
}

/// The folded text of `s`, trimmed and in lowercase: what a value that holds no identifier is
/// pseudonymised as (an identifier is pseudonymised as its canonical form,
/// [`crate::identifiers::canonical`]).
pub fn plain(s: &str) -> String {
    fold(s).trim().to_lowercase()
}

/// `t` decoded as base64 (standard or URL-safe, padded or not), if it is base64 of at least
/// four characters.
pub fn decode_base64(t: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    if t.len() < 4
        || !t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/-_=".contains(&b))
    {
        return None;
    }
    let body = t.trim_end_matches('=');
    STANDARD_NO_PAD
        .decode(body)
        .or_else(|_| URL_SAFE_NO_PAD.decode(body))
        .ok()
}

#[cfg(test)]
mod tests;
