use super::*;

#[test]
fn fold_takes_spellings_to_plain_text() {
    for (text, want) in [
        ("plain ascii", "plain ascii"),
        ("3c%3A22%3Afb", "3c:22:fb"),
        ("3c%253A22", "3c:22"),
        ("100%", "100%"),
        ("3c:2\u{200b}2:f\u{00ad}b", "3c:22:fb"),
        ("\u{feff}abc\u{2060}", "abc"),
        ("３ｃ：２２", "3c:22"),
        ("\u{1d7ce}\u{1d7cf}", "01"),
        ("\u{0663}\u{0664}", "34"),
        ("\u{0967}\u{0968}", "12"),
        ("3\u{0441}:22", "3c:22"),
        ("ana@example\u{3002}org", "ana@example.org"),
        ("ana@example\u{ff61}org", "ana@example.org"),
        ("\u{0430}\u{0435}", "ae"),
        ("Ärzte", "Arzte"),
        ("3c&#58;22&#x3A;fb&colon;12", "3c:22:fb:12"),
        ("ana&commat;example&period;org", "ana@example.org"),
        ("\\x33\\x63\\u003a22\\u{3a}fb", "3c:22:fb"),
        ("3c\u{ff05}3A22", "3c:22"),
        ("3c%3\u{200b}A22", "3c:22"),
        ("3c%25253A22", "3c:22"),
        (
            "3c\u{2014}22\u{2013}fb\u{2022}12\u{30fb}34",
            "3c-22-fb.12.34",
        ),
        ("3\u{0107}:2\u{0332}2", "3c:22"),
        ("100%", "100%"),
        ("&amp;", "&"),
        ("a & b \\ c", "a & b \\ c"),
        ("北京", "北京"),
    ] {
        assert_eq!(fold(text), want, "{text:?}");
    }
}

#[test]
fn ascii_is_never_remapped() {
    for c in (0u8..128).map(char::from) {
        let s = c.to_string();
        if c != '%' {
            assert_eq!(fold(&s), s.as_str(), "{c:?}");
        }
    }
}

#[test]
fn digits_of_every_script_have_their_value() {
    // The zero of each script's run: its ten digits read 0 to 9.
    for zero in [
        0x0660u32, 0x06F0, 0x0966, 0x09E6, 0x0E50, 0xFF10, 0x1040, 0x11066,
    ] {
        let digits: String = (0..10).filter_map(|d| char::from_u32(zero + d)).collect();
        assert_eq!(fold(&digits), "0123456789", "{zero:x}");
    }
}

#[test]
fn plain_is_folded_trimmed_and_lowercase() {
    assert_eq!(plain("  Ab\u{200b}C "), "abc");
}

#[test]
fn base64_in_either_alphabet_with_or_without_padding() {
    assert_eq!(decode_base64("aGVsbG8="), Some(b"hello".to_vec()));
    assert_eq!(decode_base64("aGVsbG8"), Some(b"hello".to_vec()));
    assert_eq!(decode_base64("-_-_"), Some(vec![0xfb, 0xff, 0xbf]));
    assert_eq!(decode_base64("a b"), None);
    assert_eq!(decode_base64("abc"), None);
}
