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
//! [`fold`] repeats these steps until they change nothing (at most four rounds), so that an
//! encoding hidden behind another (`%` written full-width, a zero-width space inside an escape)
//! is undone too:
//! 1. escapes decoded: percent-encoding (`3c%3A22`), HTML character references (`&#58;`,
//!    `&#x3a;`, `&colon;`, `&commat;`, …) and backslash escapes (`\x3a`, `\u003a`);
//! 2. invisible characters removed: Unicode's default-ignorable code points (zero-width spaces
//!    and joiners, soft hyphens, direction marks, variation selectors, tags, fillers);
//! 3. Unicode NFKC (ICU4X's normaliser): full-width, mathematical, circled and other
//!    compatibility forms become their plain characters (`３ｃ：２２` is `3c:22`);
//! 4. combining marks removed (after NFD): `ć` is `c`, a keycap or an underline goes;
//! 5. decimal digits of every script become ASCII digits (`٣` is `3`); dashes become `-`, and
//!    bullets, middle dots and the ideographic full stop become `.`;
//! 6. letters that look like ASCII letters (UTS #39 confusables, through `unicode-security`)
//!    become them, when they look like one ASCII character (Cyrillic `с` is `c`). ASCII is
//!    never changed by this step.
//!
//! Case is left alone; the detectors match hex digits and e-mail addresses in any case. ASCII
//! text without `%`, `&` or a backslash is returned as it is, without a copy.

use std::borrow::Cow;

use base64::Engine as _;
use icu_normalizer::{ComposingNormalizerBorrowed, DecomposingNormalizerBorrowed};
use icu_properties::CodePointMapData;
use icu_properties::props::GeneralCategory;

const NFKC: ComposingNormalizerBorrowed<'static> = ComposingNormalizerBorrowed::new_nfkc();
const NFD: DecomposingNormalizerBorrowed<'static> = DecomposingNormalizerBorrowed::new_nfd();

/// Text as the detectors see it (see the module's description).
pub fn fold(s: &str) -> Cow<'_, str> {
    let plain = s
        .bytes()
        .all(|b| b.is_ascii() && !matches!(b, b'%' | b'&' | b'\\'));
    if plain {
        return Cow::Borrowed(s);
    }
    let mut text = s.to_owned();
    for _ in 0..4 {
        let next = fold_once(&text);
        if next == text {
            break;
        }
        text = next;
    }
    Cow::Owned(text)
}

/// One round of [`fold`]'s steps.
fn fold_once(s: &str) -> String {
    let decoded = unescaped(s);
    let visible: String = decoded.chars().filter(|c| !is_invisible(*c)).collect();
    let nfkc = NFKC.normalize(&visible);
    let unmarked: String = if nfkc.is_ascii() {
        nfkc.into_owned()
    } else {
        let gc = CodePointMapData::<GeneralCategory>::new();
        NFD.normalize(&nfkc)
            .chars()
            .filter(|c| {
                !matches!(
                    gc.get(*c),
                    GeneralCategory::NonspacingMark | GeneralCategory::EnclosingMark
                )
            })
            .collect()
    };
    let mut out = String::with_capacity(unmarked.len());
    for c in unmarked.chars() {
        if c.is_ascii() {
            out.push(c);
        } else if let Some(d) = digit_value(c) {
            out.push(char::from(b'0' + d));
        } else if let Some(p) = punctuation(c) {
            out.push(p);
        } else if let Some(a) = ascii_lookalike(c) {
            out.push(a);
        } else {
            out.push(c);
        }
    }
    out
}

/// Dashes as `-`; bullets, middle dots and the ideographic full stop (which IDNA reads as a
/// domain's dot) as `.`.
fn punctuation(c: char) -> Option<char> {
    let gc = CodePointMapData::<GeneralCategory>::new();
    if gc.get(c) == GeneralCategory::DashPunctuation || c == '\u{2212}' {
        return Some('-');
    }
    matches!(
        c,
        '\u{00B7}'
            | '\u{2022}'
            | '\u{2027}'
            | '\u{2219}'
            | '\u{22C5}'
            | '\u{30FB}'
            | '\u{FF65}'
            | '\u{3002}'
            | '\u{FF61}'
    )
    .then_some('.')
}

/// `s` with its escapes decoded once: percent-encoding, HTML character references and
/// backslash escapes. Invalid escapes, and bytes that are not UTF-8, are kept as they are.
fn unescaped(s: &str) -> String {
    let s = if s.contains('%') {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    } else {
        s.to_owned()
    };
    if !s.contains(['&', '\\']) {
        return s;
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(i) = rest.find(['&', '\\']) {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        match escape(rest) {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push_str(&rest[..1]);
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The character an escape at the start of `s` stands for, and the escape's length.
fn escape(s: &str) -> Option<(char, usize)> {
    let hex_char = |digits: &str| {
        u32::from_str_radix(digits, 16)
            .ok()
            .and_then(char::from_u32)
    };
    if let Some(body) = s.strip_prefix("&#") {
        let end = body.find(';')?;
        let (digits, radix) = match body[..end].strip_prefix(['x', 'X']) {
            Some(hex) => (hex, 16),
            None => (&body[..end], 10),
        };
        let c = u32::from_str_radix(digits, radix)
            .ok()
            .and_then(char::from_u32)?;
        return Some((c, 2 + end + 1));
    }
    if let Some(body) = s.strip_prefix('&') {
        let end = body.find(';').filter(|e| *e <= 8)?;
        let c = match &body[..end] {
            "colon" => ':',
            "commat" => '@',
            "period" => '.',
            "lowbar" | "UnderBar" => '_',
            "hyphen" | "dash" => '-',
            "sol" => '/',
            "plus" => '+',
            "amp" => '&',
            "nbsp" => ' ',
            _ => return None,
        };
        return Some((c, 1 + end + 1));
    }
    let body = s.strip_prefix('\\')?;
    if let Some(hex) = body.strip_prefix('x') {
        let digits = hex.get(..2)?;
        return Some((hex_char(digits)?, 4));
    }
    if let Some(braced) = body.strip_prefix("u{") {
        let end = braced.find('}').filter(|e| *e <= 6)?;
        return Some((hex_char(&braced[..end])?, 3 + end + 1));
    }
    let hex = body.strip_prefix('u')?;
    let digits = hex.get(..4)?;
    Some((hex_char(digits)?, 6))
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
/// `3c 22 fb`, `3c_22_fb`, `3c|22|fb`, and the list separators `,` and `;` (which join groups
/// only where a group holds a hex letter: a list of numbers is not a MAC).
pub fn is_separator(c: char) -> bool {
    matches!(
        c,
        ':' | '-' | '.' | '_' | ' ' | '\t' | '/' | '|' | ',' | ';' | '\u{00B7}'
    )
}

/// Whether `c` separates the items of a list rather than the groups of one value.
pub fn is_list_separator(c: char) -> bool {
    matches!(c, ',' | ';')
}

/// The folded text of `s` in lowercase, its letters and digits only: what a value that holds no
/// identifier is pseudonymised as (an identifier is pseudonymised as its canonical form,
/// [`crate::identifiers::canonical`]), so that `AB-123-CD`, `ab 123 cd` and `AB123CD` are one.
/// A value without a letter or digit is kept whole.
pub fn plain(s: &str) -> String {
    let folded = fold(s).to_lowercase();
    let alphanumeric: String = folded.chars().filter(|c| c.is_alphanumeric()).collect();
    if alphanumeric.is_empty() {
        folded.trim().to_owned()
    } else {
        alphanumeric
    }
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
