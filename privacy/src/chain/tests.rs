use super::*;
use crate::policy;
use proptest::prelude::*;

/// A one-stream policy with extra stream settings and `[stream.fields]` lines.
fn stream_with(extra: &str, fields: &str) -> StreamPolicy {
    let src = format!(
        "[[stream]]\nname = \"s\"\ntopics = [\"t\"]\npurpose = \"p\"\nlegal_basis = \"b\"\n\
         principles = [\"shared_prosperity\"]\nretention = \"1d\"\n{extra}\n[stream.fields]\n{fields}"
    );
    match policy::from_toml(&src) {
        Ok((p, _)) => p.streams()[0].clone(),
        Err(d) => panic!("{:?}\n{src}", d.0),
    }
}

fn stream(time_field: Option<&str>, fields: &[&str]) -> StreamPolicy {
    let extra = time_field
        .map(|t| format!("time_field = \"{t}\""))
        .unwrap_or_default();
    let fields: String = fields
        .iter()
        .map(|f| format!("\"{f}\" = \"keep\"\n"))
        .collect();
    stream_with(&extra, &fields)
}

fn reading(fields: &[(&str, Value)]) -> Reading {
    Reading {
        fields: fields
            .iter()
            .map(|(p, v)| ((*p).into(), v.clone()))
            .collect(),
        unsupported: 0,
    }
}

const CTX: Context<'static> = Context {
    received_ms: 1_700_000_000_000,
    key: None,
};

fn s(v: &str) -> Value {
    Value::Str(v.into())
}

#[test]
fn undeclared_fields_are_dropped_and_counted() {
    let policy = stream(None, &["pm25", "location.district"]);
    let mut r = reading(&[
        ("pm25", Value::Float(12.5)),
        ("mac", s("aa:bb:cc:dd:ee:ff")),
        ("location.district", s("north")),
        ("location.lat", Value::Float(51.5)),
    ]);
    r.unsupported = 1;
    let out = apply(&policy, r, &CTX).unwrap();
    assert_eq!(out.fields_dropped, 3);
    assert_eq!(
        out.record.fields,
        vec![
            ("pm25".into(), Value::Float(12.5)),
            ("location.district".into(), s("north"))
        ]
    );
    assert_eq!(out.record.event_time_ms, CTX.received_ms);
}

#[test]
fn event_time_comes_from_the_declared_field() {
    let policy = stream(Some("ts"), &["v"]);
    let r = reading(&[("ts", Value::Int(1_600_000_000)), ("v", Value::Int(1))]);
    let out = apply(&policy, r, &CTX).unwrap();
    assert_eq!(out.record.event_time_ms, 1_600_000_000_000);
    assert_eq!(
        out.fields_dropped, 0,
        "the time field is consumed, not dropped"
    );

    let r = reading(&[("ts", s("2024-03-01T12:00:00Z"))]);
    assert_eq!(
        apply(&policy, r, &CTX).unwrap().record.event_time_ms,
        1_709_294_400_000
    );

    // Any offset: the same instant.
    for offset in ["2024-03-01T14:00:00+02:00", "2024-03-01T07:30:00.000-04:30"] {
        let r = reading(&[("ts", s(offset))]);
        assert_eq!(
            apply(&policy, r, &CTX).unwrap().record.event_time_ms,
            1_709_294_400_000,
            "{offset}"
        );
    }

    let r = reading(&[("ts", Value::Float(1.5))]);
    assert_eq!(apply(&policy, r, &CTX).unwrap().record.event_time_ms, 1500);

    for bad in [
        s("yesterday"),
        s("2024-03-01T12:00:00+25:00"),
        s("2024-03-01T12:00:00+0200"),
        Value::Bool(true),
        Value::Int(-5),
        Value::Int(i64::MAX),
    ] {
        let r = reading(&[("ts", bad.clone())]);
        assert_eq!(apply(&policy, r, &CTX), Err(Rejection::BadTime), "{bad:?}");
    }

    let r = reading(&[("v", Value::Int(1))]);
    assert_eq!(
        apply(&policy, r, &CTX).unwrap().record.event_time_ms,
        CTX.received_ms
    );
}

#[test]
fn pseudonymise_needs_a_key_and_never_passes_the_raw_value() {
    let policy = stream_with("", "mac = \"pseudonymise\"\nrssi = \"keep\"\n");
    assert!(policy.needs_key());
    let r = || reading(&[("mac", s("3C:22:FB:12:34:56")), ("rssi", Value::Int(-60))]);
    let key = Key::new([9; 32]);
    let out = apply(
        &policy,
        r(),
        &Context {
            key: Some(&key),
            ..CTX
        },
    )
    .unwrap();
    assert_eq!(out.pseudonymised, 1);
    assert_eq!(
        out.record.fields[0],
        (
            "mac".into(),
            s(&crate::pseudonym::pseudonymise(&key, "3c:22:fb:12:34:56"))
        )
    );
    // Fail closed: without a key the field is dropped, not passed.
    let out = apply(&policy, r(), &CTX).unwrap();
    assert_eq!(out.record.fields, vec![("rssi".into(), Value::Int(-60))]);
    assert_eq!(out.fields_dropped, 1);
}

#[test]
fn identifiers_in_kept_strings_are_dropped_or_pseudonymised() {
    let fields = "note = \"keep\"\nzone = \"keep\"\n";
    let drop = stream_with("", fields);
    let r = || {
        reading(&[
            ("note", s("seen 3c:22:fb:12:34:56 at gate")),
            ("zone", s("north")),
        ])
    };
    let out = apply(&drop, r(), &CTX).unwrap();
    assert_eq!(out.record.fields, vec![("zone".into(), s("north"))]);
    assert_eq!(
        (out.identifiers_suppressed, out.last_identifier),
        (1, Some(IdKind::Mac))
    );

    let pseudo = stream_with("[stream.identifiers]\naction = \"pseudonymise\"", fields);
    let key = Key::new([1; 32]);
    let out = apply(
        &pseudo,
        r(),
        &Context {
            key: Some(&key),
            ..CTX
        },
    )
    .unwrap();
    assert_eq!(
        out.record.fields[0].1,
        s(&crate::pseudonym::pseudonymise(&key, "3c:22:fb:12:34:56"))
    );
    assert_eq!(out.pseudonymised, 1);
}

#[test]
fn plates_follow_the_configured_patterns() {
    let policy = stream_with(
        "[stream.identifiers]\nplate_patterns = ['\\b[A-Z]{2}-[0-9]{3}-[A-Z]{2}\\b']",
        "vehicle = \"keep\"\n",
    );
    let out = apply(&policy, reading(&[("vehicle", s("car AB-123-CD"))]), &CTX).unwrap();
    assert_eq!(out.last_identifier, Some(IdKind::Plate));
    assert!(out.record.fields.is_empty());
    let out = apply(&policy, reading(&[("vehicle", s("car"))]), &CTX).unwrap();
    assert_eq!(out.record.fields.len(), 1);
}

#[test]
fn an_input_field_at_a_cell_path_is_not_passed() {
    let policy = stream_with(
        "",
        "cell = { h3 = { resolution = 8, lat = \"lat\", lon = \"lon\" } }\n",
    );
    // A device cannot choose its own cell: without coordinates there is no cell at all.
    let out = apply(&policy, reading(&[("cell", s("8928308280fffff"))]), &CTX).unwrap();
    assert!(out.record.fields.is_empty());
    assert_eq!(out.fields_dropped, 1);
    let out = apply(
        &policy,
        reading(&[("lat", Value::Float(f64::NAN)), ("lon", Value::Int(4))]),
        &CTX,
    )
    .unwrap();
    assert!(out.record.fields.is_empty());
    assert_eq!(out.locations_invalid, 1);
    let out = apply(
        &policy,
        reading(&[("lat", Value::Float(95.0)), ("lon", Value::Int(4))]),
        &CTX,
    )
    .unwrap();
    assert_eq!(out.locations_invalid, 1);
}

fn arb_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::Int),
        any::<f64>().prop_map(Value::Float),
        "[ -~]{0,12}".prop_map(|s| Value::Str(s.into())),
        any::<bool>().prop_map(Value::Bool),
    ]
}

fn arb_path() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-c]{1,2}", 1..4).prop_map(|segs| segs.join("."))
}

/// Direct identifiers of every kind the detectors know, in their common notations.
fn arb_identifier() -> impl Strategy<Value = String> {
    let mac = any::<[u8; 6]>().prop_flat_map(|b| {
        prop_oneof![
            Just(
                b.iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            ),
            Just(
                b.iter()
                    .map(|x| format!("{x:02X}"))
                    .collect::<Vec<_>>()
                    .join("-")
            ),
            Just(b.iter().map(|x| format!("{x:02x}")).collect::<String>()),
        ]
    });
    let eui64 = any::<[u8; 8]>().prop_map(|b| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    });
    let imsi_or_imei = "[0-9]{15}";
    let email = "[a-z]{1,8}\\.[a-z]{1,8}@[a-z]{2,8}\\.(org|com|nl)";
    let phone = prop_oneof![
        "\\+[1-9][0-9]{9,12}",
        "\\+31 6 [0-9]{4} [0-9]{4}",
        "0[1-9][0-9]{8}"
    ];
    prop_oneof![
        mac,
        eui64,
        imsi_or_imei.prop_map(String::from),
        email.prop_map(String::from),
        phone.prop_map(String::from)
    ]
}

proptest! {
    /// Invariant: the output's field paths are a subset of the declared paths, and every input
    /// field is either passed unchanged or counted as dropped, for any input (identifier-free
    /// values: short strings cannot hold one).
    #[test]
    fn output_paths_are_declared_paths(
        declared in prop::collection::btree_set("[a-c]{1,2}", 0..5),
        input in prop::collection::vec((arb_path(), arb_value()), 0..20),
    ) {
        let declared: Vec<&str> = declared.iter().map(String::as_str).collect();
        let policy = stream(None, &declared);
        let fields = input.iter().map(|(p, v)| (p.into(), v.clone())).collect();
        let r = Reading { fields, unsupported: 0 };
        let out = apply(&policy, r, &CTX).unwrap();
        for (path, _) in &out.record.fields {
            prop_assert!(declared.contains(&path.as_str()), "undeclared path {path} passed");
        }
        let kept = out.record.fields.len() as u32;
        prop_assert_eq!(kept + out.fields_dropped + out.identifiers_suppressed, input.len() as u32);
    }

    /// Invariant: an identifier injected into any kept string, at any depth and with any text
    /// around it, never reaches the output, under either action.
    #[test]
    fn injected_identifiers_never_reach_the_output(
        id in arb_identifier(),
        depth in 0usize..6,
        before in "[a-z ]{0,6}",
        after in "[ ,;][a-z ]{0,6}",
        pseudonymise_hits in any::<bool>(),
    ) {
        let path: String = (0..=depth).map(|i| format!("l{i}")).collect::<Vec<_>>().join(".");
        let extra = if pseudonymise_hits { "[stream.identifiers]\naction = \"pseudonymise\"" } else { "" };
        let policy = stream_with(extra, &format!("\"{path}\" = \"keep\"\nother = \"keep\"\n"));
        let value = format!("{before} {id}{after}");
        let r = reading(&[(path.as_str(), Value::Str(value.as_str().into())), ("other", s("ok"))]);
        let key = Key::new([3; 32]);
        let out = apply(&policy, r, &Context { key: Some(&key), ..CTX }).unwrap();
        prop_assert_eq!(out.identifiers_suppressed, 1, "{} not detected", value);
        let printed = format!("{:?}", out.record);
        prop_assert!(!printed.contains(&id), "{} leaked", id);
    }

    /// Invariant: every event time out of the coarsening stage is a multiple of the bucket, and
    /// the output of a batch does not depend on the order readings arrive in.
    #[test]
    fn coarsened_times_are_bucket_multiples_and_order_free(
        times in prop::collection::vec(0i64..4_000_000_000, 1..30),
        bucket_min in 1u64..120,
        seed in any::<u64>(),
    ) {
        let policy = stream_with(&format!("time_field = \"ts\"\ntime_bucket = \"{bucket_min}m\""), "v = \"keep\"\n");
        let bucket_ms = bucket_min as i64 * 60_000;
        let run = |ts: &[i64]| -> Vec<Record> {
            let mut out: Vec<Record> = ts
                .iter()
                .map(|t| apply(&policy, reading(&[("ts", Value::Int(*t)), ("v", Value::Int(*t % 7))]), &CTX).unwrap().record)
                .collect();
            out.sort_by(|a, b| (a.event_time_ms, format!("{:?}", a.fields)).cmp(&(b.event_time_ms, format!("{:?}", b.fields))));
            out
        };
        let in_order = run(&times);
        for r in &in_order {
            prop_assert_eq!(r.event_time_ms % bucket_ms, 0);
        }
        let mut shuffled = times.clone();
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        prop_assert_eq!(in_order, run(&shuffled));
    }

    /// Invariant: a generalised location is a valid H3 cell of the configured resolution, and no
    /// output field carries the raw coordinates.
    #[test]
    fn locations_become_cells_of_the_configured_resolution(
        lat in -89.9f64..89.9,
        lon in -179.9f64..179.9,
        resolution in 0u8..=10,
    ) {
        let policy = stream_with(
            "",
            &format!("cell = {{ h3 = {{ resolution = {resolution}, lat = \"geo.lat\", lon = \"geo.lon\" }} }}\nzone = \"keep\"\n"),
        );
        let r = reading(&[("geo.lat", Value::Float(lat)), ("geo.lon", Value::Float(lon)), ("zone", s("n"))]);
        let out = apply(&policy, r, &CTX).unwrap();
        prop_assert_eq!(out.locations_generalised, 1);
        let Some((_, Value::Str(cell))) = out.record.fields.iter().find(|(p, _)| p == "cell") else {
            return Err(TestCaseError::fail("no cell"));
        };
        let parsed: h3o::CellIndex = cell.parse().map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        prop_assert_eq!(u8::from(parsed.resolution()), resolution);
        for (_, v) in &out.record.fields {
            prop_assert!(!matches!(v, Value::Float(_)), "a coordinate passed");
            if let Value::Str(text) = v {
                prop_assert!(!text.contains(&lat.to_string()) && !text.contains(&lon.to_string()));
            }
        }
    }

    /// Invariant: a grid location is the south-west corner of the cell holding the point, a
    /// multiple of the step, written with no more decimals than the step has.
    #[test]
    fn grid_locations_are_multiples_of_the_step(
        lat in -89.9f64..89.9,
        lon in -179.9f64..179.9,
        step in prop::sample::select(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 1.0]),
    ) {
        let policy = stream_with(
            "",
            &format!("area = {{ grid = {{ step = {step}, lat = \"lat\", lon = \"lon\" }} }}\n"),
        );
        let r = reading(&[("lat", Value::Float(lat)), ("lon", Value::Float(lon))]);
        let out = apply(&policy, r, &CTX).unwrap();
        prop_assert_eq!(out.record.fields.len(), 1);
        let Value::Str(area) = &out.record.fields[0].1 else {
            return Err(TestCaseError::fail("not a string"));
        };
        let (a, b) = area.split_once(',').ok_or_else(|| TestCaseError::fail("no comma"))?;
        let decimals = if step >= 1.0 { 0 } else { step.to_string().split('.').nth(1).map_or(0, str::len) };
        for (text, x) in [(a, lat), (b, lon)] {
            prop_assert_eq!(text.split('.').nth(1).map_or(0, str::len), decimals, "{}", area);
            let corner: f64 = text.parse().unwrap();
            let cells = corner / step;
            prop_assert!((cells - cells.round()).abs() < 1e-6, "{} is not a multiple of {}", corner, step);
            prop_assert!(corner <= x + 1e-9 && x < corner + step + 1e-9, "{} not in the cell at {}", x, corner);
        }
    }
}
