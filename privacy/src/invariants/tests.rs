use proptest::prelude::*;

use super::*;
use crate::chain::{self, Context};
use crate::pseudonym::Key;
use crate::testing::{EVERY_TREATMENT, s, stream_with};
use crate::value::Reading;

fn record(t: i64, fields: &[(&str, Value)]) -> Record {
    Record {
        event_time_ms: t,
        fields: fields
            .iter()
            .map(|(p, v)| ((*p).into(), v.clone()))
            .collect(),
    }
}

/// 2026-12-07.
const NOW: i64 = 1_796_601_600_000;

const PSEUDONYM: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn a_record_the_chain_could_make_passes() {
    let stream = stream_with("time_bucket = \"15m\"", EVERY_TREATMENT);
    let ok = record(
        1_700_000_100_000, // on the 15-minute grid
        &[
            ("counter_id", s("pc-01")),
            ("rssi", Value::Int(-60)),
            ("mac", s(PSEUDONYM)),
            ("cell", s("891f1d48177ffff")),
            ("area", s("52.37,4.89")),
        ],
    );
    assert_eq!(check(&stream, &ok, NOW), Ok(()));
}

/// Each invariant, broken on its own, is reported with the field it is about.
#[test]
fn each_broken_invariant_is_reported() {
    let stream = stream_with("time_bucket = \"15m\"", EVERY_TREATMENT);
    let t = 1_699_999_200_000;
    let cases: Vec<(Record, Violation)> = vec![
        (
            record(t, &[("mac2", s("x"))]),
            Violation::Undeclared("mac2".into()),
        ),
        (
            record(t, &[("note", s("a")), ("note", s("b"))]),
            Violation::Repeated("note".into()),
        ),
        (
            record(t, &[("cell", s("8f1f1d48177a21d"))]),
            Violation::NotACell {
                path: "cell".into(),
                resolution: 9,
            },
        ),
        (
            record(t, &[("cell", s("52.37 4.89"))]),
            Violation::NotACell {
                path: "cell".into(),
                resolution: 9,
            },
        ),
        (
            record(t, &[("cell", s("891F1D48177FFFF"))]),
            Violation::NotACell {
                path: "cell".into(),
                resolution: 9,
            },
        ),
        (
            record(t, &[("area", s("52.3712,4.8901"))]),
            Violation::NotAGridCorner {
                path: "area".into(),
                step: 0.01,
            },
        ),
        (
            record(t, &[("mac", s("000000000000000000003c22fb123456x"))]),
            Violation::NotAPseudonym("mac".into()),
        ),
        (
            record(t, &[("mac", s(&PSEUDONYM.to_uppercase()))]),
            Violation::NotAPseudonym("mac".into()),
        ),
        (
            record(t, &[("mac", Value::Int(7))]),
            Violation::NotAPseudonym("mac".into()),
        ),
        (
            record(t, &[("note", s("seen 3c:22:fb:12:34:56"))]),
            Violation::Identifier {
                path: "note".into(),
                kind: IdKind::Mac,
            },
        ),
        (
            record(t + 1, &[]),
            Violation::OffBucket { bucket_ms: 900_000 },
        ),
        (record(-900_000, &[]), Violation::TimeOutOfRange),
    ];
    for (r, want) in cases {
        assert_eq!(check(&stream, &r, NOW), Err(want.clone()), "{r:?}");
        assert!(!want.to_string().is_empty());
    }
}

#[test]
fn aggregated_records_hold_group_keys_and_numeric_measures_on_the_window() {
    let stream = stream_with(
        "",
        "counter_id = \"keep\"\nmac = \"pseudonymise\"\n\n[stream.aggregate]\nwindow = \"10m\"\n\
         group_by = [\"counter_id\"]\ncontributor = \"mac\"\n\n[stream.aggregate.measures]\n\
         devices = \"contributors\"\n",
    );
    let t = 600_000 * 2_833_333;
    assert_eq!(
        check(
            &stream,
            &record(t, &[("counter_id", s("pc-01")), ("devices", Value::Int(7))]),
            NOW
        ),
        Ok(())
    );
    assert_eq!(
        check(&stream, &record(t, &[("mac", s(PSEUDONYM))]), NOW),
        Err(Violation::Undeclared("mac".into())),
        "the contributor is not an output of an aggregated stream"
    );
    assert_eq!(
        check(&stream, &record(t, &[("devices", s("7"))]), NOW),
        Err(Violation::NotAMeasure("devices".into()))
    );
    assert_eq!(
        check(&stream, &record(t + 60_000, &[]), NOW),
        Err(Violation::OffBucket { bucket_ms: 600_000 })
    );
}

#[test]
fn policy_hashes_are_64_lowercase_hex_of_a_known_policy() {
    let known = "a".repeat(64);
    let is_known = |h: &str| h == known;
    assert_eq!(check_policy_hash(&known, is_known), Ok(()));
    for bad in [
        "b".repeat(64),
        "A".repeat(64),
        "forged-policy-hash".into(),
        "a".repeat(5000),
    ] {
        assert_eq!(
            check_policy_hash(&bad, is_known),
            Err(Violation::PolicyHash),
            "{bad}"
        );
    }
}

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,24}",
        any::<[u8; 6]>().prop_map(|b| {
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        }),
        "[0-9a-f]{32}",
        "[0-9]{15}",
        "\\PC{0,12}",
    ]
}

fn arb_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::Int),
        any::<f64>().prop_map(Value::Float),
        (-100.0..100.0f64).prop_map(Value::Float),
        arb_string().prop_map(|s| Value::Str(s.into())),
        any::<bool>().prop_map(Value::Bool),
    ]
}

proptest! {
    /// Invariant: whatever reading goes into the chain, the record that comes out satisfies the
    /// stream's output invariants.
    #[test]
    fn the_chain_only_makes_records_that_pass(
        fields in prop::collection::vec(
            (prop_oneof![
                Just("counter_id".to_owned()), Just("note".to_owned()), Just("rssi".to_owned()),
                Just("mac".to_owned()), Just("lat".to_owned()), Just("lon".to_owned()),
                Just("cell".to_owned()), Just("area".to_owned()), Just("ts".to_owned()),
                "[a-z]{1,3}",
            ], arb_value()),
            0..10,
        ),
        received_ms in 0i64..4_000_000_000_000,
        pseudonymise_hits in any::<bool>(),
    ) {
        let action = if pseudonymise_hits { "pseudonymise" } else { "drop" };
        let stream = stream_with(
            &format!("time_field = \"ts\"\ntime_bucket = \"15m\"\n[stream.identifiers]\naction = \"{action}\""),
            EVERY_TREATMENT,
        );
        let key = Key::new([9; 32]);
        // Decoders refuse a payload that repeats a field, so a reading never does.
        let mut seen = std::collections::HashSet::new();
        let reading = Reading {
            fields: fields
                .into_iter()
                .filter(|(p, _)| seen.insert(p.clone()))
                .map(|(p, v)| (p.into(), v))
                .collect(),
            unsupported: 0,
        };
        let ctx = Context { received_ms, key: Some(&key) };
        if let Ok(out) = chain::apply(&stream, reading, &ctx) {
            prop_assert_eq!(check(&stream, &out.record, received_ms), Ok(()), "{:?}", out.record);
        }
    }
}
