use h3o::{LatLng, Resolution};
use proptest::prelude::*;

use super::*;
use crate::invariants::check;
use crate::testing::{EVERY_TREATMENT, s, stream_with};

fn record(t: i64, fields: &[(&str, Value)]) -> Record {
    Record {
        event_time_ms: t,
        fields: fields
            .iter()
            .map(|(p, v)| ((*p).into(), v.clone()))
            .collect(),
    }
}

fn cell_at(lat: f64, lon: f64, resolution: u8) -> String {
    LatLng::new(lat, lon)
        .unwrap()
        .to_cell(Resolution::try_from(resolution).unwrap())
        .to_string()
}

/// 2026-12-07.
const NOW: i64 = 1_796_601_600_000;

const PSEUDONYM: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn forwarded_records_are_filtered_again_and_generalised_to_this_hubs_policy() {
    let stream = stream_with("time_bucket = \"15m\"", EVERY_TREATMENT);
    let key = Key::new([3; 32]);
    let fine = cell_at(52.3731, 4.8922, 15);
    let out = admit(
        &stream,
        record(
            1_700_000_123_456,
            &[
                ("counter_id", s("pc-01")),
                ("rssi", Value::Int(-60)),
                ("mac", s(PSEUDONYM)),
                ("cell", s(&fine)),
                ("area", s("52.3712345,4.8954321")),
                ("undeclared", s("x")),
            ],
        ),
        Some(&key),
        NOW,
    )
    .unwrap();
    let r = &out.record;
    assert_eq!(r.event_time_ms % 900_000, 0, "floored to this hub's bucket");
    assert!(r.event_time_ms <= 1_700_000_123_456);
    let field = |p: &str| {
        r.fields
            .iter()
            .find(|(q, _)| q == p)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(field("counter_id"), Some(s("pc-01")));
    assert_eq!(
        field("cell"),
        Some(s(&cell_at(52.3731, 4.8922, 9))),
        "generalised to resolution 9"
    );
    assert_eq!(field("area"), Some(s("52.37,4.89")));
    let Some(Value::Str(mac)) = field("mac") else {
        panic!("{r:?}")
    };
    assert_ne!(
        mac.as_str(),
        PSEUDONYM,
        "pseudonymised again under this hub's key"
    );
    assert_eq!(mac.as_str(), pseudonymise(&key, PSEUDONYM));
    assert_eq!(field("undeclared"), None);
    assert_eq!((out.fields_dropped, out.pseudonymised), (1, 1));
    assert_eq!(check(&stream, r, NOW), Ok(()));
}

/// What the origin cannot make fit refuses the record, with the field it is about.
#[test]
fn values_that_cannot_fit_the_policy_refuse_the_record() {
    let stream = stream_with("time_bucket = \"15m\"", EVERY_TREATMENT);
    let key = Key::new([3; 32]);
    let t = 1_700_000_000_000;
    let cases = [
        (
            record(t, &[("mac", s("3c:22:fb:12:34:56"))]),
            Violation::NotAPseudonym("mac".into()),
        ),
        (
            record(t, &[("mac", s("0123456789ABCDEF0123456789ABCDEF"))]),
            Violation::NotAPseudonym("mac".into()),
        ),
        (
            record(t, &[("cell", s("52.3731,4.8922"))]),
            Violation::NotACell {
                path: "cell".into(),
                resolution: 9,
            },
        ),
        (
            record(t, &[("cell", s("3c:22:fb:12:34:56"))]),
            Violation::NotACell {
                path: "cell".into(),
                resolution: 9,
            },
        ),
        (
            record(t, &[("cell", s(&cell_at(52.37, 4.89, 5)))]),
            Violation::NotACell {
                path: "cell".into(),
                resolution: 9,
            },
        ),
        (
            record(t, &[("area", s("free text"))]),
            Violation::NotAGridCorner {
                path: "area".into(),
                step: 0.01,
            },
        ),
        (record(-1, &[]), Violation::TimeOutOfRange),
        (
            record(t, &[("note", s("a")), ("note", s("b"))]),
            Violation::Repeated("note".into()),
        ),
    ];
    for (r, want) in cases {
        assert_eq!(
            admit(&stream, r.clone(), Some(&key), NOW),
            Err(want),
            "{r:?}"
        );
    }
}

#[test]
fn identifiers_in_kept_fields_are_dropped_or_pseudonymised_as_the_stream_says() {
    let key = Key::new([3; 32]);
    let r = record(
        0,
        &[
            ("note", s("from 3c:22:fb:12:34:56")),
            ("counter_id", s("pc")),
        ],
    );
    let dropping = stream_with("", EVERY_TREATMENT);
    let out = admit(&dropping, r.clone(), Some(&key), NOW).unwrap();
    assert_eq!(out.record.fields, vec![("counter_id".into(), s("pc"))]);
    assert_eq!((out.fields_dropped, out.identifiers_suppressed), (1, 1));
    let pseudonymising = stream_with(
        "[stream.identifiers]\naction = \"pseudonymise\"",
        EVERY_TREATMENT,
    );
    let out = admit(&pseudonymising, r, Some(&key), NOW).unwrap();
    let Value::Str(note) = &out.record.fields[0].1 else {
        panic!()
    };
    assert!(is_pseudonym(note), "{note}");
}

/// Values a hostile origin could send: anything, and things shaped like what the policy expects.
fn hostile_value() -> impl Strategy<Value = Value> {
    let mac = any::<[u8; 6]>().prop_map(|b| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    });
    let padded = any::<[u8; 6]>().prop_map(|b| {
        format!(
            "{:0>32}",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        )
    });
    let cell =
        (-89.0..89.0f64, -179.0..179.0f64, 0u8..16).prop_map(|(lat, lon, r)| cell_at(lat, lon, r));
    let corner = (-95.0..95.0f64, -185.0..185.0f64, 0usize..8)
        .prop_map(|(lat, lon, d)| format!("{lat:.d$},{lon:.d$}"));
    prop_oneof![
        any::<i64>().prop_map(Value::Int),
        any::<f64>().prop_map(Value::Float),
        any::<bool>().prop_map(Value::Bool),
        "\\PC{0,40}".prop_map(|s| Value::Str(s.into())),
        mac.prop_map(|s| Value::Str(s.into())),
        padded.prop_map(|s| Value::Str(s.into())),
        "[0-9a-f]{32}".prop_map(|s| Value::Str(s.into())),
        cell.prop_map(|s| Value::Str(s.into())),
        corner.prop_map(|s| Value::Str(s.into())),
    ]
}

proptest! {
    /// Invariant: whatever a hostile origin pushes, what is admitted satisfies the stream's output
    /// invariants, and no pseudonymised value leaves as it came.
    #[test]
    fn whatever_is_admitted_satisfies_the_invariants(
        fields in prop::collection::vec(
            (prop_oneof![
                Just("counter_id".to_owned()), Just("note".to_owned()), Just("rssi".to_owned()),
                Just("mac".to_owned()), Just("cell".to_owned()), Just("area".to_owned()),
                "[a-z]{1,3}",
            ], hostile_value()),
            0..8,
        ),
        event_time_ms in prop_oneof![any::<i64>(), 0i64..4_000_000_000_000],
        bucket in prop_oneof![Just(""), Just("time_bucket = \"15m\""), Just("time_bucket = \"7s\"")],
        pseudonymise_hits in any::<bool>(),
    ) {
        let action = if pseudonymise_hits { "pseudonymise" } else { "drop" };
        let stream = stream_with(&format!("{bucket}\n[stream.identifiers]\naction = \"{action}\""), EVERY_TREATMENT);
        let key = Key::new([5; 32]);
        let sent = Record {
            event_time_ms,
            fields: fields.into_iter().map(|(p, v)| (p.into(), v)).collect(),
        };
        if let Ok(out) = admit(&stream, sent.clone(), Some(&key), NOW) {
            prop_assert_eq!(check(&stream, &out.record, NOW), Ok(()), "{:?}", out.record);
            for (path, value) in &out.record.fields {
                if path == "mac" {
                    let came = sent.fields.iter().find(|(p, _)| p == path).map(|(_, v)| v);
                    prop_assert_ne!(Some(value), came, "a pseudonym passed as it came");
                }
            }
        }
    }
}
