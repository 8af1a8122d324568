use proptest::prelude::*;

use super::*;

/// 2026-12-07, for the times near now that are not identifiers.
const NOW: i64 = 1_796_601_600_000;

fn all() -> Detector {
    let plate = plate_pattern(r"\b[A-Z]{2}-[0-9]{3}-[A-Z]{2}\b").unwrap();
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
        assert_eq!(d.find(text, NOW), Some(kind), "{text}");
    }
}

/// The spellings an attack on an earlier detector got through, each found.
#[test]
fn finds_the_spellings_that_once_passed() {
    let d = all();
    for text in [
        "3c 22 fb 12 34 56",
        "3c_22_fb_12_34_56",
        "3c.22.fb.12.34.56",
        "3c:22-fb.12_34 56",
        "3c22-fb12-3456",
        "3c22 fb12 3456",
        "MAC3C22FB123456",
        "3c22fb123456abc",
        "0x3c22fb123456",
        "3c%3A22%3Afb%3A12%3A34%3A56",
        "3c%253A22%253Afb%253A12%253A34%253A56",
        "M2M6MjI6ZmI6MTI6MzQ6NTY=",
        "PCL7EjRW",
        "3с:22:fb:12:34:56",
        "3c:2\u{200b}2:fb:12:34:56",
        "３ｃ：２２：ｆｂ：１２：３４：５６",
        "49-015420-323751-8",
        "490154 203237 518",
        "ana.silva@exämple.org",
        "ana.silva (at) example (dot) org",
        "ana.silva [at] example.org",
        "ana at example dot org",
        "212-555-0123",
        "(212) 555-0123",
        "212.555.0123",
        "06-12345678",
        "22 33 44 55",
        "call 41-23-45-67",
        "AB 123 CD",
        "ab123cd",
        "AB.123.CD",
    ] {
        assert!(d.find(text, NOW).is_some(), "{text:?} passed");
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
        "52.3702165",
        "4.89522",
        "52.3702, 4.8952",
        "firmware 2.4.1",
        "12345",
        "a@b",
        "pm25 high",
        "car",
        "Category",
        "moderate",
        "temperature",
        "1796601600",
        "1796601600000",
        "urn:ngsi-ld:AirQualityObserved:RZ:Obsv4567",
        "Calle Acacias 4, Madrid",
        "10.12.01.23",
        "12 34 56",
        "2024-12-07 10 20",
    ] {
        assert_eq!(d.find(text, NOW), None, "{text}");
    }
}

/// Numbers are scanned too: an IMEI, an IMSI, a phone number or a MAC written as a JSON number is
/// an identifier; a time near now, a count or a measurement is not.
#[test]
fn numbers_that_are_identifiers() {
    let d = all();
    let mac = i64::from_str_radix("3c22fb123456", 16).unwrap();
    for n in [
        490_154_203_237_518i64,
        204_081_234_567_890,
        31_205_550_123,
        3_545_123_456,
        4_915_123_456_789,
        mac,
    ] {
        assert!(d.find_value(&Value::Int(n), NOW).is_some(), "{n}");
        assert!(
            d.find_value(&Value::Float(n as f64), NOW).is_some(),
            "{n}.0"
        );
    }
    // Counts, codes, and times in any unit from 2005 on, past ones included (replayed samples).
    for n in [
        0i64,
        1_440,
        65,
        -3,
        9_999_999,
        28_079_004,
        123_456_789,
        NOW / 1000,
        NOW,
        NOW * 1000,
        1_451_606_400,
        1_704_067_200_000,
        1_704_067_200_000_000,
    ] {
        assert_eq!(d.find_value(&Value::Int(n), NOW), None, "{n}");
    }
    assert_eq!(d.find_value(&Value::Float(52.370_216_5), NOW), None);
    assert_eq!(d.find_value(&Value::Bool(true), NOW), None);
}

/// Every spelling of one MAC has one canonical form, so one pseudonym.
#[test]
fn spellings_of_a_mac_share_one_canonical_form() {
    let mac = i64::from_str_radix("3c22fb123456", 16).unwrap();
    let spellings = [
        Value::Str("3C:22:FB:12:34:56".into()),
        Value::Str("3c-22-fb-12-34-56".into()),
        Value::Str("3c22.fb12.3456".into()),
        Value::Str("0x3c22fb123456".into()),
        Value::Str("3c%3A22%3Afb%3A12%3A34%3A56".into()),
        Value::Str("3с:22:fb:12:34:56".into()),
        Value::Str("PCL7EjRW".into()),
        Value::Str("seen 3c 22 fb 12 34 56 at gate".into()),
        Value::Int(mac),
    ];
    for v in &spellings {
        assert_eq!(canonical(v), "3c22fb123456", "{v:?}");
    }
}

#[test]
fn turned_off_detectors_do_not_fire() {
    let d = Detector::new(vec![IdKind::Email], Vec::new());
    assert_eq!(d.find("3c:22:fb:12:34:56", NOW), None);
    assert_eq!(d.find("x@example.org", NOW), Some(IdKind::Email));
}

#[test]
fn luhn_checks_imei() {
    assert!(luhn(b"490154203237518"));
    assert!(!luhn(b"490154203237519"));
}

#[test]
fn plate_patterns_match_any_case_and_spacing() {
    let re = plate_pattern(r"\b[A-Z]{2}-[0-9]{3}-[A-Z]{2}\b").unwrap();
    for plate in [
        "AB-123-CD",
        "AB 123 CD",
        "AB123CD",
        "ab-123-cd",
        "Ab.123_cD",
    ] {
        assert!(re.is_match(plate), "{plate}");
    }
    assert!(!re.is_match("AB-1234-CD"));
    assert!(plate_pattern("[A-Z").is_err());
}

#[test]
fn media_payloads_are_recognised_by_magic_bytes() {
    assert!(is_media_payload(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0]));
    assert!(is_media_payload(b"\x89PNG\r\n\x1a\nrest"));
    assert!(is_media_payload(b"\0\0\0\x18ftypmp42"));
    assert!(!is_media_payload(b"{\"pm25\": 3}"));
}

/// How one MAC may be written: its octets in either case, grouped in twos, threes, fours or
/// sixes or not at all, with separators of any kind (mixed or not, with spaces around), after
/// `0x` or not, percent-, HTML- or base64-encoded, with a zero-width character, a combining mark
/// or a look-alike letter, in full-width forms.
fn spelling(octets: [u8; 6]) -> impl Strategy<Value = String> {
    let hex: String = octets.iter().map(|o| format!("{o:02x}")).collect();
    let separators = prop::collection::vec(
        prop_oneof![
            Just(":"),
            Just("-"),
            Just("."),
            Just("_"),
            Just(" "),
            Just("|"),
            Just(","),
            Just(": "),
            Just(" - "),
            Just("\u{2014}"),
            Just("\u{2022}"),
            Just("\t"),
        ],
        7,
    );
    (
        separators,
        prop_oneof![Just(2usize), Just(3), Just(4), Just(6), Just(12)],
        any::<bool>(),
        0u8..11,
    )
        .prop_map(move |(seps, size, upper, encoding)| {
            let hex = if upper {
                hex.to_uppercase()
            } else {
                hex.clone()
            };
            let chunks: Vec<&str> = hex
                .as_bytes()
                .chunks(size)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect();
            // Octets that are all decimal digits, written as a decimal number (two groups around a
            // point) or as a list (commas), are a number or a list, not a MAC: not spelled so.
            let digits_only = hex.bytes().all(|b| b.is_ascii_digit());
            let mut grouped = String::new();
            for (i, c) in chunks.iter().enumerate() {
                if i > 0 {
                    let ambiguous =
                        seps[i] == "," || chunks.len() == 2 && matches!(seps[i], "." | "\u{2022}");
                    grouped.push_str(if digits_only && ambiguous {
                        ":"
                    } else {
                        seps[i]
                    });
                }
                grouped.push_str(c);
            }
            match encoding {
                0 => format!("0x{}", hex),
                1 => grouped.replace(':', "%3A").replace(' ', "%20"),
                2 => {
                    use base64::Engine as _;
                    base64::engine::general_purpose::STANDARD.encode(grouped.as_bytes())
                }
                3 => {
                    let mut s = grouped.clone();
                    s.insert(2, '\u{200b}');
                    s
                }
                4 => grouped
                    .chars()
                    .map(|c| match c {
                        '0'..='9' => char::from_u32(u32::from(c) - 0x30 + 0xFF10).unwrap_or(c),
                        _ => c,
                    })
                    .collect(),
                5 => grouped.replace('c', "\u{0441}").replace('a', "\u{0430}"),
                6 => grouped.replace(':', "&#58;").replace('-', "&#x2d;"),
                7 => grouped.replace(':', "\u{ff05}3A"),
                8 => grouped.replace('b', "b\u{0332}"),
                _ => grouped,
            }
        })
}

proptest! {
    /// Invariant: every spelling of a MAC is found, alone or with text around it, and every
    /// spelling has the MAC's one canonical form (so one pseudonym).
    #[test]
    fn every_spelling_of_a_mac_is_found_with_one_canonical_form(
        (octets, spelled) in any::<[u8; 6]>().prop_flat_map(|o| (Just(o), spelling(o))),
        before in prop_oneof![Just(""), Just("seen "), Just("mac="), Just("id:"), Just("mac")],
        after in prop_oneof![Just(""), Just(" at gate"), Just(";")],
    ) {
        let d = all();
        let text = format!("{before}{spelled}{after}");
        let hex: String = octets.iter().map(|o| format!("{o:02x}")).collect();
        prop_assert!(d.find(&text, NOW).is_some(), "{:?} passed", text);
        // Every spelling has the canonical form of the MAC written as a number.
        let n = u64::from_str_radix(&hex, 16).unwrap();
        let number = canonical(&Value::Int(n as i64));
        let got = canonical(&Value::Str(text.as_str().into()));
        prop_assert_eq!(got, number, "{:?}", text);
    }

    /// Invariant: an IMEI or IMSI with any separators, or as a number, is found.
    #[test]
    fn imei_and_imsi_in_any_grouping_are_found(
        digits in "[1-9][0-9]{14}",
        sep in prop_oneof![Just(""), Just(" "), Just("-"), Just(".")],
        cut in 2usize..13,
    ) {
        let d = all();
        let spelled = format!("{}{sep}{}", &digits[..cut], &digits[cut..]);
        prop_assert!(d.find(&spelled, NOW).is_some(), "{}", spelled);
        let n: i64 = digits.parse().unwrap();
        prop_assert!(d.find_value(&Value::Int(n), NOW).is_some(), "{}", n);
    }
}

/// Words run together are not taken for bytes in base64, whatever their length; random bytes in
/// base64 still are.
#[test]
fn camel_case_words_are_not_base64_identifiers() {
    let d = Detector::new(IdKind::ALL.to_vec(), Vec::new());
    for word in [
        "HomeNetwork",
        "DeviceId",
        "TrafficFlow",
        "parkingSpot",
        "GuestWiFi",
        "SensorId12",
        "OffStreetParking",
        "Category",
    ] {
        assert_eq!(d.identify(word, None), None, "{word}");
    }
    // 3c:22:fb:12:34:56 and 00:24:be:ff:fe:80:4f:f1 as bytes in base64.
    for (token, kind) in [("PCL7EjRW", IdKind::Mac), ("ACS+//6AT/E", IdKind::Eui64)] {
        assert_eq!(
            d.identify(token, None).map(|f| f.kind),
            Some(kind),
            "{token}"
        );
    }
}

/// A sensor reading as a payload writes it: a measurement, a coordinate pair, a time in ISO 8601
/// (an instant, with an offset, or an interval), a firmware version, a count or code below ten
/// digits, or a time since the epoch in any unit from 2005 on.
fn sensor_value() -> impl Strategy<Value = Value> {
    let instant = (
        2005i64..2030,
        1i64..=12,
        1i64..=28,
        0i64..24,
        0i64..60,
        0i64..60,
        0u16..1000,
    )
        .prop_map(|(y, mo, d, h, mi, s, ms)| {
            format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}")
        });
    prop_oneof![
        (-1e6f64..1e6, 0usize..7).prop_map(|(x, p)| Value::Str(format!("{x:.p$}").into())),
        (-1e9f64..1e9).prop_map(Value::Float),
        any::<f64>()
            .prop_filter("a negative number", |x| *x < 0.0)
            .prop_map(Value::Float),
        (-90f64..90.0, -180f64..180.0)
            .prop_map(|(a, b)| Value::Str(format!("{a:.6},{b:.6}").into())),
        (
            instant.clone(),
            prop_oneof![Just("Z"), Just("+01:00"), Just("-05:30"), Just("")]
        )
            .prop_map(|(t, z)| Value::Str(format!("{t}{z}").into())),
        (instant.clone(), instant).prop_map(|(a, b)| Value::Str(format!("{a}Z/{b}Z").into())),
        (0u8..20, 0u8..50, 0u16..300)
            .prop_map(|(a, b, c)| Value::Str(format!("v{a}.{b}.{c}").into())),
        (-999_999_999i64..1_000_000_000).prop_map(Value::Int),
        (1_104_537_600i64..1_796_601_600, 0usize..4)
            .prop_map(|(s, unit)| Value::Int(s * 1000i64.pow(unit as u32))),
    ]
}

proptest! {
    /// Invariant: no sensor value is taken for an identifier.
    #[test]
    fn sensor_values_are_not_identifiers(value in sensor_value()) {
        prop_assert_eq!(all().identify_value(&value, Some(NOW)), None, "{:?}", value);
    }
}

proptest! {
    /// The shortcut for the usual spellings of a MAC or an EUI-64 gives what the full scan gives.
    #[test]
    fn usual_hex_spellings_are_found_as_the_full_scan_finds_them(
        bytes in prop::collection::vec(any::<u8>(), 6..=8),
        separator in prop::sample::select(vec!["", ":", "-"]),
        upper in any::<bool>(),
    ) {
        let d = all();
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut s = hex.join(separator);
        if upper {
            s = s.to_ascii_uppercase();
        }
        let full = d.scan(&fold(&s), None, true);
        prop_assert_eq!(d.plain_hex_id(&s), if bytes.len() == 7 { None } else { full });
    }
}

/// Spellings a review of the detectors found passing, each now found.
#[test]
fn spellings_found_in_review_are_found() {
    let d = all();
    let cases = [
        ("3c,22,fb,12,34,56", IdKind::Mac),
        ("3c|22|fb|12|34|56", IdKind::Mac),
        (
            "3c\u{2022}22\u{2022}fb\u{2022}12\u{2022}34\u{2022}56",
            IdKind::Mac,
        ),
        (
            "3c\u{2014}22\u{2014}fb\u{2014}12\u{2014}34\u{2014}56",
            IdKind::Mac,
        ),
        ("3c: 22: fb: 12: 34: 56", IdKind::Mac),
        ("3c - 22 - fb - 12 - 34 - 56", IdKind::Mac),
        ("mac3c:22:fb:12:34:56", IdKind::Mac),
        ("3c:22:fb:12:34:56ab", IdKind::Mac),
        ("3c:22:fb:\u{0406}2:34:56", IdKind::Mac),
        ("3c%3\u{200b}A22%3\u{200b}Afb%3A12%3A34%3A56", IdKind::Mac),
        (
            "3c\u{ff05}3A22\u{ff05}3Afb\u{ff05}3A12\u{ff05}3A34\u{ff05}3A56",
            IdKind::Mac,
        ),
        ("3c&#58;22&#58;fb&#58;12&#58;34&#58;56", IdKind::Mac),
        ("\\x33\\x63:22:fb:12:34:56", IdKind::Mac),
        ("3\u{0107}:22:fb:12:34:56", IdKind::Mac),
        ("macPCL7EjRW", IdKind::Mac),
        ("imei490154203237518", IdKind::Imei),
        ("imsi204080123456789", IdKind::Imsi),
        ("49-015420 323751-8", IdKind::Imei),
        ("tel0612345678", IdKind::Phone),
        ("+1.7035555555", IdKind::Phone),
        ("06 - 12345678", IdKind::Phone),
        ("ana @ example.org", IdKind::Email),
        ("ana@ example.org", IdKind::Email),
        ("ana[@]example.org", IdKind::Email),
        ("ana@example[.]org", IdKind::Email),
        ("ana@example(.)org", IdKind::Email),
        ("ana@example . org", IdKind::Email),
        ("ana (at) example (dot) org", IdKind::Email),
        ("ana@example.xn--p1ai", IdKind::Email),
        ("AB/123/CD", IdKind::Plate),
    ];
    for (text, kind) in cases {
        assert_eq!(d.find(text, NOW), Some(kind), "{text}");
    }
    assert!(
        d.find_value(&Value::Int(-490_154_203_237_518), NOW)
            .is_some()
    );
    // A plate pattern written without separators matches plates written with them.
    let tight = Detector::new(
        vec![IdKind::Plate],
        vec![plate_pattern(r"\b[A-Z]{2}[0-9]{3}[A-Z]{2}\b").unwrap()],
    );
    for plate in ["AB 123 CD", "ab-123-cd", "AB123CD"] {
        assert_eq!(tight.find(plate, NOW), Some(IdKind::Plate), "{plate}");
    }
    // Ordinary text around these spellings is left alone.
    for text in [
        "at 12:30 the gate opened",
        "readings 12, 34, 56, 78, 90, 12",
        "01-12-26 12:34:56",
        "Ole and Ilse",
        "temperature 21.5 \u{2013} 22.0 \u{00b0}C",
    ] {
        assert_eq!(d.find(text, NOW), None, "{text}");
    }
}

/// Every spelling of one identifier has one canonical form: MACs beginning 00 and EUI-64s as
/// numbers, phone numbers after `+` or `00`, labels glued to a MAC, plates in any spacing.
#[test]
fn one_identifier_has_one_canonical_form_in_review_cases() {
    let same = |a: Value, b: Value| assert_eq!(canonical(&a), canonical(&b), "{a:?} {b:?}");
    let s = |t: &str| Value::Str(t.into());
    same(s("00:17:88:01:02:03"), Value::Int(0x0017_8801_0203));
    same(
        s("00-12-4b-00-01-23-45-67"),
        Value::Int(0x0012_4b00_0123_4567),
    );
    same(s("+49 151 12345678"), s("0049 151 12345678"));
    same(s("+49 151 12345678"), Value::Int(4_915_112_345_678));
    same(s("MAC3C22FB123456"), s("3c:22:fb:12:34:56"));
    same(s("PCL7EjRW"), s("3C-22-FB-12-34-56"));
    same(s("AB-123-CD"), s("ab 123 cd"));
    same(
        s("Ana.Silva@Example.org"),
        s("ana.silva (at) example (dot) org"),
    );
}
