//! Keyed pseudonymisation: `truncate(HMAC-SHA256(K_epoch_purpose, canonical(id)))`.
//!
//! A plain hash of an identifier is not a pseudonym: the MAC address space is small enough to
//! enumerate, so anyone can invert it. hubgate keys the hash with a random 256-bit key per stream
//! (purpose) and per key epoch (24 h by default). Within an epoch one device maps to one pseudonym,
//! so it can be counted; across epochs its pseudonyms are unrelated, so it cannot be followed. The
//! gateway holds keys in memory only and destroys each one when its epoch ends (see the gateway's
//! key manager); this module only computes with a key it is given.
//!
//! Identifiers are taken to their canonical form first ([`crate::identifiers::canonical`]), so
//! that spelling does not split a device in two: a MAC address written `3C:22:FB:12:34:56`,
//! `3c-22-fb-12-34-56`, `3c22.fb12.3456`, `0x3c22fb123456`, with zero-width or full-width
//! characters, percent-encoded, in base64 or as the number 66118713062486 gives one pseudonym.

use hmac::{Hmac, KeyInit, Mac};

use crate::identifiers;
use crate::value::Value;
use sha2::Sha256;
use zeroize::Zeroizing;

/// Bytes of HMAC output kept in a pseudonym (shown as twice as many hex digits).
pub const PSEUDONYM_BYTES: usize = 16;

/// A 256-bit pseudonymisation key, wiped from memory when dropped.
///
/// It also holds the HMAC state keyed with it (the hashed inner and outer pads), computed once so
/// each pseudonym costs two SHA-256 compressions instead of four; that state is secret too and is
/// wiped on drop as well (`hmac`'s `zeroize` feature).
#[derive(Clone)]
pub struct Key {
    _bytes: Zeroizing<[u8; 32]>,
    mac: Hmac<Sha256>,
}

impl Key {
    pub fn new(bytes: [u8; 32]) -> Self {
        let mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&bytes).expect("HMAC takes any key length");
        Self {
            _bytes: Zeroizing::new(bytes),
            mac,
        }
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<secret>)")
    }
}

/// HMAC-SHA256 of `message` under `key` (RFC 2104).
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// The pseudonym of `id` under `key`: lowercase hex of the first [`PSEUDONYM_BYTES`] bytes of
/// `HMAC-SHA256(key, canonical(id))`.
pub fn pseudonymise(key: &Key, id: &str) -> String {
    pseudonymise_value(key, &Value::Str(id.into()))
}

/// The pseudonym of a value: of its canonical form ([`identifiers::canonical`]).
pub fn pseudonymise_value(key: &Key, value: &Value) -> String {
    pseudonymise_canonical(key, &identifiers::canonical(value))
}

/// The pseudonym of a canonical form, as it is.
pub fn pseudonymise_canonical(key: &Key, canonical: &str) -> String {
    let mut mac = key.mac.clone();
    mac.update(canonical.as_bytes());
    let digest = mac.finalize().into_bytes();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * PSEUDONYM_BYTES);
    for b in &digest[..PSEUDONYM_BYTES] {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::Digest;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 4231 test cases 1, 2, 3, 4, 6 and 7 (HMAC-SHA-256). Case 5 tests truncated output.
    #[test]
    fn hmac_matches_rfc_4231() {
        let cases: [(Vec<u8>, Vec<u8>, &str); 6] = [
            (vec![0x0b; 20], b"Hi There".to_vec(), "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
            (b"Jefe".to_vec(), b"what do ya want for nothing?".to_vec(), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
            (vec![0xaa; 20], vec![0xdd; 50], "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
            (
                unhex("0102030405060708090a0b0c0d0e0f10111213141516171819"),
                vec![0xcd; 50],
                "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
            ),
            (
                vec![0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First".to_vec(),
                "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
            ),
            (
                vec![0xaa; 131],
                b"This is a test using a larger than block-size key and a larger than block-size data. The key needs to be hashed before being used by the HMAC algorithm.".to_vec(),
                "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
            ),
        ];
        for (key, data, want) in cases {
            assert_eq!(hex(&hmac_sha256(&key, &data)), want);
        }
    }

    #[test]
    fn formatting_variants_of_one_mac_give_one_pseudonym() {
        let key = Key::new([7; 32]);
        let variants = [
            "3C:22:FB:12:34:56",
            "3c-22-fb-12-34-56",
            "3c22.fb12.3456",
            "3c22fb123456",
            " 3c:22:fb:12:34:56 ",
        ];
        let first = pseudonymise(&key, variants[0]);
        for v in variants {
            assert_eq!(pseudonymise(&key, v), first, "{v}");
        }
        // The precomputed keyed state gives exactly HMAC-SHA256 under the key.
        assert_eq!(
            first,
            hex(&hmac_sha256(&[7; 32], b"3c22fb123456"))[..2 * PSEUDONYM_BYTES]
        );
        assert_ne!(pseudonymise(&key, "3c:22:fb:12:34:57"), first);
        assert_eq!(first.len(), 2 * PSEUDONYM_BYTES);
    }

    #[test]
    fn the_key_is_never_printed() {
        assert_eq!(format!("{:?}", Key::new([42; 32])), "Key(<secret>)");
    }

    fn arb_mac() -> impl Strategy<Value = String> {
        any::<[u8; 6]>().prop_map(|b| {
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        })
    }

    #[test]
    fn canonical_forms() {
        for (id, want) in [
            ("3C:22:FB:12:34:56", "3c22fb123456"),
            // An EUI-64, and a MAC beginning 00: the decimal digits of their value, as when they
            // are written as numbers.
            ("00-1b-63-ff-fe-84-88-b4", "7709775509096628"),
            ("00:17:88:01:02:03", "101066015235"),
            ("3c22.fb12.3456", "3c22fb123456"),
            ("  AB-1234-CD ", "ab1234cd"),
            ("ab 1234 cd", "ab1234cd"),
            ("Ärzte", "arzte"),
            ("+49 151 12345678", "04786386804e"),
            ("0049 151 12345678", "04786386804e"),
            ("", ""),
        ] {
            assert_eq!(
                identifiers::canonical(&Value::Str(id.into())),
                want,
                "{id:?}"
            );
        }
    }

    proptest! {
        /// Within an epoch (one key) a device has one pseudonym; across epochs (two random keys)
        /// its pseudonyms are unrelated: equal only by chance (2^-128), and sharing no more prefix
        /// than chance allows.
        #[test]
        fn same_key_links_different_keys_do_not(mac in arb_mac(), k1 in any::<[u8; 32]>(), k2 in any::<[u8; 32]>()) {
            prop_assume!(k1 != k2);
            let (a, b) = (Key::new(k1), Key::new(k2));
            prop_assert_eq!(pseudonymise(&a, &mac), pseudonymise(&a, &mac.to_uppercase()));
            let (p1, p2) = (pseudonymise(&a, &mac), pseudonymise(&b, &mac));
            prop_assert_ne!(&p1, &p2);
            let shared = p1.chars().zip(p2.chars()).take_while(|(x, y)| x == y).count();
            prop_assert!(shared < 8, "{} {}", p1, p2);
        }

        /// A value is hashed in its canonical form, under the key, and nothing else.
        #[test]
        fn the_pseudonym_is_the_hmac_of_the_canonical_form(id in "[ :.\\-0-9a-fA-FxX\u{e4}\u{c4}\u{130}]{0,24}", k in any::<[u8; 32]>()) {
            let want = identifiers::canonical(&Value::Str(id.as_str().into()));
            let direct = hex(&hmac_sha256(&k, want.as_bytes()));
            prop_assert_eq!(pseudonymise(&Key::new(k), &id), &direct[..2 * PSEUDONYM_BYTES]);
        }

        /// The pseudonym never equals, or is a prefix of, an unkeyed hash of the identifier (in any
        /// of its normal forms): enumerating MAC addresses through SHA-256 does not invert it.
        #[test]
        fn never_an_unkeyed_hash(mac in arb_mac(), k in any::<[u8; 32]>()) {
            let p = pseudonymise(&Key::new(k), &mac);
            for form in [mac.clone(), mac.replace(':', ""), mac.to_uppercase(), mac.replace(':', "").to_uppercase()] {
                let unkeyed = hex(&Sha256::digest(form.as_bytes()));
                prop_assert!(!unkeyed.starts_with(&p));
                prop_assert!(!unkeyed.contains(&p[..16]));
            }
        }
    }
}
