use super::*;
use proptest::prelude::*;

/// When the examples are received: 2010-06-08T18:01:16Z plus a little.
const NOW_MS: i64 = 1_276_020_100_000;
const NOW: f64 = NOW_MS as f64 / 1000.0;

fn field<'a>(r: &'a Reading, path: &str) -> Option<&'a Value> {
    r.fields.iter().find(|(p, _)| p == path).map(|(_, v)| v)
}

fn t(r: &Reading) -> f64 {
    match field(r, "t") {
        Some(Value::Int(i)) => *i as f64,
        Some(Value::Float(f)) => *f,
        other => panic!("no time: {other:?}"),
    }
}

/// RFC 8428 §4.6 resolved records from readings: (name, time, value label and value, unit).
fn resolved(readings: &[Reading]) -> Vec<(String, f64, String, Value, Option<String>)> {
    let mut out = Vec::new();
    for r in readings {
        let bn = match field(r, "bn") {
            Some(Value::Str(s)) => s.to_string(),
            _ => String::new(),
        };
        for (path, value) in &r.fields {
            let (name, label) = path.rsplit_once('.').unwrap_or(("", path));
            if !["v", "vs", "vb", "vd"].contains(&label) {
                continue;
            }
            let unit_path = if name.is_empty() {
                "u".to_owned()
            } else {
                format!("{name}.u")
            };
            let unit = match field(r, &unit_path) {
                Some(Value::Str(u)) => Some(u.to_string()),
                _ => None,
            };
            out.push((
                format!("{bn}{name}"),
                t(r),
                label.to_owned(),
                value.clone(),
                unit,
            ));
        }
    }
    out
}

/// RFC 8428 §5.1.1: a name with no base name, at "now".
#[test]
fn rfc_single_data_point() {
    let r = json(
        br#"[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]"#,
        NOW_MS,
    )
    .unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(field(&r[0], "bn"), None);
    assert_eq!(t(&r[0]), NOW, "time zero is when it was received");
    assert_eq!(
        field(&r[0], "urn:dev:ow:10e2073a01080063.v"),
        Some(&Value::Float(23.1))
    );
    assert_eq!(
        field(&r[0], "urn:dev:ow:10e2073a01080063.u"),
        Some(&Value::Str("Cel".into()))
    );
}

/// RFC 8428 §5.1.2, first example: one device, two measurements, one reading.
#[test]
fn rfc_multiple_data_points_now() {
    let r = json(
        br#"[
  {"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},
  {"n":"current","u":"A","v":1.2}
]"#,
        NOW_MS,
    )
    .unwrap();
    assert_eq!(r.len(), 1);
    let paths: Vec<&str> = r[0].fields.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "bn",
            "t",
            "voltage.v",
            "voltage.u",
            "current.v",
            "current.u"
        ]
    );
    assert_eq!(
        field(&r[0], "bn"),
        Some(&Value::Str("urn:dev:ow:10e2073a01080063:".into()))
    );
    assert_eq!(field(&r[0], "current.v"), Some(&Value::Float(1.2)));
}

const RFC_5_1_2_TIMED: &[u8] = br#"[
 {"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,
  "bu":"A","bver":5,
  "n":"voltage","u":"V","v":120.1},
 {"n":"current","t":-5,"v":1.2},
 {"n":"current","t":-4,"v":1.3},
 {"n":"current","t":-3,"v":1.4},
 {"n":"current","t":-2,"v":1.5},
 {"n":"current","t":-1,"v":1.6},
 {"n":"current","v":1.7}
   ]"#;

/// RFC 8428 §5.1.2, second example: base time, base unit overridden by a unit, and times
/// relative to the base time.
#[test]
fn rfc_multiple_data_points_with_base_time() {
    let r = json(RFC_5_1_2_TIMED, NOW_MS).unwrap();
    let want: Vec<(String, f64, String, Value, Option<String>)> = [
        ("voltage", 0.0, 120.1, "V"),
        ("current", -5.0, 1.2, "A"),
        ("current", -4.0, 1.3, "A"),
        ("current", -3.0, 1.4, "A"),
        ("current", -2.0, 1.5, "A"),
        ("current", -1.0, 1.6, "A"),
        ("current", 0.0, 1.7, "A"),
    ]
    .into_iter()
    .map(|(n, dt, v, u)| {
        (
            format!("urn:dev:ow:10e2073a0108006:{n}"),
            1.276020076001e9 + dt,
            "v".to_owned(),
            Value::Float(v),
            Some(u.to_owned()),
        )
    })
    .collect();
    assert_eq!(resolved(&r), want);
    assert_eq!(
        r.len(),
        7,
        "a reading per time, and the last is not the first's"
    );
}

/// RFC 8428 §6: the CBOR example, the §5.1.2 pack above, gives the same readings (it writes
/// 1.5 as a half-precision float and the last time as an explicit 0).
#[test]
fn rfc_cbor_example_equals_its_json() {
    let bytes = super::super::from_hex(
        "87a721781b75726e3a6465763a6f773a3130653230373361303130383030363a22fb41d303a15b
         00106223614120050067766f6c7461676501615602fb405e066666666666a3006763757272656e
         74062402fb3ff3333333333333a3006763757272656e74062302fb3ff4cccccccccccda3006763
         757272656e74062202fb3ff6666666666666a3006763757272656e74062102f93e00a300676375
         7272656e74062002fb3ff999999999999aa3006763757272656e74060002fb3ffb333333333333",
    )
    .expect("the RFC's hex dump");
    assert_eq!(bytes.len(), 0xc3);
    assert_eq!(
        cbor(&bytes, NOW_MS).unwrap(),
        json(RFC_5_1_2_TIMED, NOW_MS).unwrap()
    );
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert_eq!(cbor(&trailing, NOW_MS), Err(DecodeError::Cbor));
    assert_eq!(cbor(&bytes[..100], NOW_MS), Err(DecodeError::Cbor));
}

/// RFC 8428 §5.1.3 resolves to exactly the records of §5.1.4.
#[test]
fn rfc_multiple_measurements_resolve_to_the_rfc_resolved_data() {
    let packed = json(
        br#"[
 {"bn":"urn:dev:ow:10e2073a01080063","bt":1.320067464e+09,
  "bu":"%RH","v":20},
 {"u":"lon","v":24.30621},
 {"u":"lat","v":60.07965},
 {"t":60,"v":20.3},
 {"u":"lon","t":60,"v":24.30622},
 {"u":"lat","t":60,"v":60.07965},
 {"t":120,"v":20.7},
 {"u":"lon","t":120,"v":24.30623},
 {"u":"lat","t":120,"v":60.07966},
 {"u":"%EL","t":150,"v":98},
 {"t":180,"v":21.2},
 {"u":"lon","t":180,"v":24.30628},
 {"u":"lat","t":180,"v":60.07967}
   ]"#,
        NOW_MS,
    )
    .unwrap();
    let rfc_resolved = json(
        br#"[
 {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067464e+09,
  "v":20},
 {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067464e+09,
  "v":24.30621},
 {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067464e+09,
  "v":60.07965},
 {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067524e+09,
  "v":20.3},
 {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067524e+09,
  "v":24.30622},
 {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067524e+09,
  "v":60.07965},
 {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067584e+09,
  "v":20.7},
 {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067584e+09,
  "v":24.30623},
 {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067584e+09,
  "v":60.07966},
 {"n":"urn:dev:ow:10e2073a01080063","u":"%EL","t":1.320067614e+09,
  "v":98},
 {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067644e+09,
  "v":21.2},
 {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067644e+09,
  "v":24.30628},
 {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067644e+09,
  "v":60.07967}
   ]"#,
        NOW_MS,
    )
    .unwrap();
    assert_eq!(resolved(&packed).len(), 13);
    assert_eq!(resolved(&packed), resolved(&rfc_resolved));
    assert_eq!(field(&packed[0], "v"), Some(&Value::Int(20)));
}

/// RFC 8428 §5.1.5: string, boolean and data values.
#[test]
fn rfc_multiple_data_types() {
    let r = json(
        br#"[
{"bn":"urn:dev:ow:10e2073a01080063:","n":"temp","u":"Cel","v":23.1},
{"n":"label","vs":"Machine Room"},
{"n":"open","vb":false},
{"n":"nfc-reader","vd":"aGkgCg"}
  ]"#,
        NOW_MS,
    )
    .unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(
        field(&r[0], "label.vs"),
        Some(&Value::Str("Machine Room".into()))
    );
    assert_eq!(field(&r[0], "open.vb"), Some(&Value::Bool(false)));
    assert_eq!(
        field(&r[0], "nfc-reader.vd"),
        Some(&Value::Str("aGkgCg".into()))
    );
    // The same data in CBOR is a byte string, written as the same base64url text.
    use ciborium::Value as C;
    let pack = C::Array(vec![C::Map(vec![
        (C::from(0), C::from("nfc-reader")),
        (C::from(8), C::Bytes(b"hi \n".to_vec())),
    ])]);
    let mut bytes = Vec::new();
    ciborium::into_writer(&pack, &mut bytes).unwrap();
    let r = cbor(&bytes, NOW_MS).unwrap();
    assert_eq!(
        field(&r[0], "nfc-reader.vd"),
        Some(&Value::Str("aGkgCg".into()))
    );
}

/// RFC 8428 §5.1.6: a second base name starts another reading; the base time carries over.
#[test]
fn rfc_collection_of_resources() {
    let r = json(
        br#"[
 {"bn":"2001:db8::2/","bt":1.320078429e+09,
  "n":"temperature","u":"Cel","v":25.2},
 {"n":"humidity","u":"%RH","v":30},
 {"bn":"2001:db8::1/","n":"temperature","u":"Cel","v":12.3},
 {"n":"humidity","u":"%RH","v":67}
   ]"#,
        NOW_MS,
    )
    .unwrap();
    assert_eq!(r.len(), 2);
    for (reading, (bn, temperature, humidity)) in r
        .iter()
        .zip([("2001:db8::2/", 25.2, 30), ("2001:db8::1/", 12.3, 67)])
    {
        assert_eq!(field(reading, "bn"), Some(&Value::Str(bn.into())));
        assert_eq!(field(reading, "t"), Some(&Value::Int(1_320_078_429)));
        assert_eq!(
            field(reading, "temperature.v"),
            Some(&Value::Float(temperature))
        );
        assert_eq!(field(reading, "humidity.v"), Some(&Value::Int(humidity)));
    }
}

/// RFC 8428 §5.1.7: a record of base fields alone, and times a fraction of a second apart.
#[test]
fn rfc_setting_an_actuator() {
    let r = json(
        br#"[
 {"bn":"urn:dev:ow:10e2073a01080063:"},
 {"n":"temp","u":"Cel","v":23.1},
 {"n":"heat","u":"/","v":1},
 {"n":"fan","u":"/","v":0}
   ]"#,
        NOW_MS,
    )
    .unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(field(&r[0], "heat.v"), Some(&Value::Int(1)));
    assert_eq!(field(&r[0], "fan.u"), Some(&Value::Str("/".into())));
    let r = json(
        br#"[
 {"bt":1.320078429e+09,"bu":"/","n":"2001:db8::3","v":0.5},
 {"n":"2001:db8::4","v":0.5},
 {"n":"2001:db8::3","t":0.1,"v":0},
 {"n":"2001:db8::4","t":0.1,"v":0}
   ]"#,
        NOW_MS,
    )
    .unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(t(&r[1]), 1.320078429e9 + 0.1);
    assert_eq!(field(&r[1], "2001:db8::4.v"), Some(&Value::Int(0)));
    assert_eq!(field(&r[1], "2001:db8::4.u"), Some(&Value::Str("/".into())));
}

#[test]
fn base_value_and_base_sum_are_added() {
    let r = json(
        br#"[{"bn":"meter-1:","bv":1000,"bs":50,"n":"energy","v":5,"s":2,"u":"Wh"},
             {"n":"power","v":0.5}]"#,
        NOW_MS,
    )
    .unwrap();
    assert_eq!(field(&r[0], "energy.v"), Some(&Value::Int(1005)));
    assert_eq!(field(&r[0], "energy.s"), Some(&Value::Int(52)));
    assert_eq!(field(&r[0], "power.v"), Some(&Value::Float(1000.5)));
    assert_eq!(
        field(&r[0], "power.s"),
        Some(&Value::Int(50)),
        "a base sum alone is the sum"
    );
}

#[test]
fn malformed_packs_are_rejected_without_quoting_them() {
    let bad: &[(&str, DecodeError)] = &[
        (r#"{"n":"a","v":1}"#, DecodeError::NotAPack),
        (
            r#"[{"n":"a","v":1}"#,
            DecodeError::Syntax {
                line: 1,
                column: 16,
            },
        ),
        ("[]", DecodeError::Senml("the pack has no records")),
        ("[1]", DecodeError::NotAPack),
        (
            r#"[{"n":"a","v":1,"vs":"x"}]"#,
            DecodeError::Senml("a record has more than one value"),
        ),
        (
            r#"[{"n":"a","u":"Cel"}]"#,
            DecodeError::Senml("a record has neither a value nor a sum"),
        ),
        (
            r#"[{"n":"secret name","v":1}]"#,
            DecodeError::Senml("a record's resolved name is not a valid SenML name"),
        ),
        (
            r#"[{"n":"-a","v":1}]"#,
            DecodeError::Senml("a record's resolved name is not a valid SenML name"),
        ),
        (
            r#"[{"v":1}]"#,
            DecodeError::Senml("a record's resolved name is not a valid SenML name"),
        ),
        (
            r#"[{"n":"a","v":1,"crit_":1}]"#,
            DecodeError::Senml("a field that must be understood is not known"),
        ),
        (
            r#"[{"bver":11,"n":"a","v":1}]"#,
            DecodeError::Senml("the pack's SenML version is newer than 10"),
        ),
        (
            r#"[{"bver":5,"n":"a","v":1},{"bver":10,"n":"b","v":1}]"#,
            DecodeError::Senml("records of one pack give different versions"),
        ),
        (
            r#"[{"n":"a","v":1},{"bver":5,"n":"b","v":1}]"#,
            DecodeError::Senml("records of one pack give different versions"),
        ),
        (
            r#"[{"n":"a","v":"1"}]"#,
            DecodeError::Senml("v must be a number"),
        ),
        (
            r#"[{"n":"a","vb":1}]"#,
            DecodeError::Senml("vb must be a boolean"),
        ),
        (
            r#"[{"n":"a","vd":"not base64!"}]"#,
            DecodeError::Senml("vd must be base64url data"),
        ),
        (r#"[{"n":"a","v":1,"v":2}]"#, DecodeError::DuplicateField),
    ];
    for (payload, want) in bad {
        let got = json(payload.as_bytes(), NOW_MS);
        assert_eq!(got.as_ref(), Err(want), "{payload}");
        assert!(!got.unwrap_err().to_string().contains("secret"));
    }
    let many = format!("[{}]", vec![r#"{"n":"a","v":1}"#; MAX_FIELDS + 1].join(","));
    assert!(json(many.as_bytes(), NOW_MS).is_err());
    // Unknown fields without the '_' suffix are ignored and counted, also in a record of
    // base fields.
    let r = json(br#"[{"n":"a","v":1,"extra":{"x":1}}]"#, NOW_MS).unwrap();
    assert_eq!(r[0].unsupported, 1);
    assert!(json(br#"[{"bn":"d:","x":1},{"n":"a","v":1}]"#, NOW_MS).is_ok());
    assert_eq!(cbor(b"\xa1\x00\x61a", NOW_MS), Err(DecodeError::NotAPack));
}

/// Records without names of their own, with a base unit: each gives its own reading rather
/// than a second `u` in one.
#[test]
fn unnamed_records_never_share_a_path() {
    let r = json(
        br#"[{"bn":"dev-1","bu":"Cel","v":1},{"vs":"ok"},{"vb":true,"u":"/"}]"#,
        NOW_MS,
    )
    .unwrap();
    assert_eq!(r.len(), 3);
    for reading in &r {
        assert!(
            !super::super::has_duplicates(&reading.fields),
            "{reading:?}"
        );
    }
}

/// A time below 2^28 is relative to the time of receipt.
#[test]
fn relative_times_count_from_receipt() {
    let r = json(br#"[{"n":"a","t":-5,"v":1}]"#, NOW_MS).unwrap();
    assert_eq!(t(&r[0]), NOW - 5.0);
}

proptest! {
    /// Any bytes, as JSON or as CBOR: the decoder returns, and every reading has a time and
    /// unique paths.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        for readings in [json(&bytes, NOW_MS), cbor(&bytes, NOW_MS)].into_iter().flatten() {
            for r in readings {
                prop_assert!(field(&r, "t").is_some());
                prop_assert!(!super::super::has_duplicates(&r.fields));
            }
        }
    }

    /// Packs of well-formed records always decode, one value each.
    #[test]
    fn well_formed_packs_decode(values in prop::collection::vec((0u8..4, any::<i32>(), -100i32..100), 1..40)) {
        let records: Vec<String> = values
            .iter()
            .map(|(n, v, t)| format!(r#"{{"n":"m{n}","v":{v},"t":{t}}}"#))
            .collect();
        let payload = format!(r#"[{{"bn":"dev:","bt":1.7e9}},{}]"#, records.join(","));
        let readings = json(payload.as_bytes(), NOW_MS).unwrap();
        let count: usize = readings
            .iter()
            .map(|r| r.fields.iter().filter(|(p, _)| p.ends_with(".v")).count())
            .sum();
        prop_assert_eq!(count, values.len());
    }
}
