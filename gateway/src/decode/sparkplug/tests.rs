use super::*;

fn metric(name: Option<&str>, alias: Option<u64>, datatype: u32, value: MetricValue) -> Metric {
    Metric {
        name: name.map(str::to_owned),
        alias,
        datatype: Some(datatype),
        value: Some(value),
        ..Metric::default()
    }
}

fn payload(seq: u64, metrics: Vec<Metric>) -> Vec<u8> {
    Payload {
        timestamp: Some(1_700_000_000_500),
        metrics,
        seq: Some(seq),
        ..Payload::default()
    }
    .encode_to_vec()
}

fn field<'a>(r: &'a Reading, path: &str) -> Option<&'a Value> {
    r.fields.iter().find(|(p, _)| p == path).map(|(_, v)| v)
}

/// A node and a device are born with names, aliases and datatypes; their data, by alias
/// alone, is read under the names, with signed integers and timestamps decoded.
#[test]
fn data_by_alias_is_named_from_the_births() {
    let mut state = State::default();
    let birth = state
        .decode(
            "spBv1.0/plant/NBIRTH/edge-1",
            &payload(
                0,
                vec![
                    metric(Some("bdSeq"), Some(0), 8, MetricValue::LongValue(3)),
                    metric(
                        Some("Supply/Voltage"),
                        Some(1),
                        10,
                        MetricValue::DoubleValue(229.5),
                    ),
                ],
            ),
        )
        .unwrap();
    assert_eq!(
        field(&birth[0], "Supply/Voltage"),
        Some(&Value::Float(229.5))
    );
    state
        .decode(
            "spBv1.0/plant/DBIRTH/edge-1/pump-7",
            &payload(
                1,
                vec![
                    metric(Some("Temperature"), Some(2), 1, MetricValue::IntValue(20)),
                    metric(
                        Some("Running"),
                        Some(3),
                        11,
                        MetricValue::BooleanValue(true),
                    ),
                    metric(Some("Offset"), Some(4), 4, MetricValue::LongValue(0)),
                ],
            ),
        )
        .unwrap();
    let data = state
        .decode(
            "spBv1.0/plant/DDATA/edge-1/pump-7",
            &payload(
                2,
                vec![
                    // -5 as an Int8 in two's complement.
                    metric(None, Some(2), 0, MetricValue::IntValue(0xFB)),
                    metric(None, Some(3), 0, MetricValue::BooleanValue(false)),
                    metric(None, Some(4), 0, MetricValue::LongValue(-2i64 as u64)),
                ],
            ),
        )
        .unwrap();
    let r = &data[0];
    assert_eq!(field(r, "group"), Some(&Value::Str("plant".into())));
    assert_eq!(field(r, "edge_node"), Some(&Value::Str("edge-1".into())));
    assert_eq!(field(r, "device"), Some(&Value::Str("pump-7".into())));
    assert_eq!(field(r, "timestamp"), Some(&Value::Float(1_700_000_000.5)));
    assert_eq!(field(r, "seq"), Some(&Value::Int(2)));
    assert_eq!(field(r, "Temperature"), Some(&Value::Int(-5)));
    assert_eq!(field(r, "Running"), Some(&Value::Bool(false)));
    assert_eq!(field(r, "Offset"), Some(&Value::Int(-2)));
    assert_eq!(r.unsupported, 0);
    assert_eq!(state.seen, (0, 0));
}

/// The Sparkplug 3.0 specification's own examples (chapter 6, "Payloads"), for the edge node
/// "Raspberry Pi" of the group "Sparkplug B Devices" and its device "Pibrella", in the
/// order a session sends them. The spec prints the DDATA with sequence number 0 although the
/// NDATA before it has 2: that is counted as a gap, and its values are still read.
#[test]
fn the_specifications_examples() {
    const T: u64 = 1_486_144_502_122;
    let named = |name: &str, datatype: u32, value: MetricValue| Metric {
        name: Some(name.to_owned()),
        timestamp: Some(T),
        datatype: Some(datatype),
        value: Some(value),
        ..Metric::default()
    };
    let message = |seq: Option<u64>, metrics: Vec<Metric>| {
        Payload {
            timestamp: Some(T),
            metrics,
            seq,
            ..Payload::default()
        }
        .encode_to_vec()
    };
    let (int64, uint64, float, boolean, string) = (4, 8, 9, 11, 12);
    use MetricValue::*;
    let mut state = State::default();
    let nbirth = state
        .decode(
            "spBv1.0/Sparkplug B Devices/NBIRTH/Raspberry Pi",
            &message(
                Some(0),
                vec![
                    named("bdSeq", int64, LongValue(0)),
                    named("Node Control/Reboot", boolean, BooleanValue(false)),
                    named("Node Control/Rebirth", boolean, BooleanValue(false)),
                    named("Node Control/Next Server", boolean, BooleanValue(false)),
                    named("Node Control/Scan Rate", int64, LongValue(3000)),
                    named(
                        "Properties/Hardware Make",
                        string,
                        StringValue("Raspberry Pi".into()),
                    ),
                    named(
                        "Properties/Hardware Model",
                        string,
                        StringValue("Pi 3 Model B".into()),
                    ),
                    named("Properties/OS", string, StringValue("Raspbian".into())),
                    named(
                        "Properties/OS Version",
                        string,
                        StringValue("Jessie with PIXEL/11.01.2017".into()),
                    ),
                    named("Supply Voltage", float, FloatValue(12.1)),
                ],
            ),
        )
        .unwrap();
    let r = &nbirth[0];
    assert_eq!(
        field(r, "group"),
        Some(&Value::Str("Sparkplug B Devices".into()))
    );
    assert_eq!(
        field(r, "edge_node"),
        Some(&Value::Str("Raspberry Pi".into()))
    );
    assert_eq!(
        field(r, "timestamp"),
        Some(&Value::Float(1_486_144_502.122))
    );
    assert_eq!(field(r, "Node Control/Scan Rate"), Some(&Value::Int(3000)));
    assert_eq!(
        field(r, "Properties/OS Version"),
        Some(&Value::Str("Jessie with PIXEL/11.01.2017".into()))
    );
    assert_eq!(
        field(r, "Supply Voltage"),
        Some(&Value::Float(f64::from(12.1f32)))
    );
    assert_eq!(
        r.fields.len(),
        4 + 10,
        "group, node, time and seq, and the ten metrics"
    );

    let inputs = [
        "Inputs/A",
        "Inputs/B",
        "Inputs/C",
        "Inputs/D",
        "Inputs/Button",
    ];
    let outputs = [
        "Outputs/E",
        "Outputs/F",
        "Outputs/G",
        "Outputs/H",
        "Outputs/LEDs/Green",
        "Outputs/LEDs/Red",
        "Outputs/LEDs/Yellow",
        "Outputs/Buzzer",
    ];
    let mut metrics: Vec<Metric> = inputs
        .iter()
        .chain(&outputs)
        .map(|n| named(n, boolean, BooleanValue(false)))
        .collect();
    metrics.push(named(
        "Properties/Hardware Make",
        string,
        StringValue("Pibrella".into()),
    ));
    let dbirth = state
        .decode(
            "spBv1.0/Sparkplug B Devices/DBIRTH/Raspberry Pi/Pibrella",
            &message(Some(1), metrics),
        )
        .unwrap();
    assert_eq!(
        field(&dbirth[0], "device"),
        Some(&Value::Str("Pibrella".into()))
    );
    assert_eq!(
        field(&dbirth[0], "Outputs/LEDs/Green"),
        Some(&Value::Bool(false))
    );

    let ndata = state
        .decode(
            "spBv1.0/Sparkplug B Devices/NDATA/Raspberry Pi",
            &message(
                Some(2),
                vec![named("Supply Voltage", float, FloatValue(12.3))],
            ),
        )
        .unwrap();
    assert_eq!(
        field(&ndata[0], "Supply Voltage"),
        Some(&Value::Float(f64::from(12.3f32)))
    );
    assert_eq!(state.seen, (0, 0), "births and data follow on");

    let ddata = state
        .decode(
            "spBv1.0/Sparkplug B Devices/DDATA/Raspberry Pi/Pibrella",
            &message(
                Some(0),
                vec![
                    named("Inputs/A", boolean, BooleanValue(true)),
                    named("Inputs/C", boolean, BooleanValue(true)),
                ],
            ),
        )
        .unwrap();
    assert_eq!(field(&ddata[0], "Inputs/A"), Some(&Value::Bool(true)));
    assert_eq!(field(&ddata[0], "Inputs/C"), Some(&Value::Bool(true)));
    assert_eq!(state.seen.0, 1, "sequence 0 after 2");

    let ndeath = state
        .decode(
            "spBv1.0/Sparkplug B Devices/NDEATH/Raspberry Pi",
            &message(None, vec![named("bdSeq", uint64, LongValue(0))]),
        )
        .unwrap();
    assert!(ndeath.is_empty());
    assert!(state.nodes.is_empty() && state.declarations == 0);
}

/// Data from a node whose birth the gateway never saw: named metrics are read, aliased ones
/// dropped and counted. A death forgets the aliases; a sequence gap is counted.
#[test]
fn unknown_aliases_and_sequence_gaps_are_counted() {
    let mut state = State::default();
    let data = state
        .decode(
            "spBv1.0/plant/NDATA/edge-2",
            &payload(
                17,
                vec![
                    metric(None, Some(9), 10, MetricValue::DoubleValue(1.0)),
                    metric(Some("Level"), None, 10, MetricValue::DoubleValue(0.25)),
                ],
            ),
        )
        .unwrap();
    assert_eq!(field(&data[0], "Level"), Some(&Value::Float(0.25)));
    assert_eq!(data[0].unsupported, 1);
    assert_eq!(state.seen.1, 1);
    assert!(
        state.nodes.is_empty(),
        "only a birth makes a node remembered"
    );

    let birth = vec![metric(
        Some("Level"),
        Some(9),
        10,
        MetricValue::DoubleValue(0.5),
    )];
    state
        .decode("spBv1.0/plant/NBIRTH/edge-2", &payload(0, birth))
        .unwrap();
    let by_alias = vec![metric(None, Some(9), 0, MetricValue::DoubleValue(0.75))];
    let data = state
        .decode("spBv1.0/plant/NDATA/edge-2", &payload(1, by_alias.clone()))
        .unwrap();
    assert_eq!(field(&data[0], "Level"), Some(&Value::Float(0.75)));
    assert_eq!(state.declarations, 2, "Level's name and alias");
    // Sequence 3 after 1: one gap.
    state
        .decode("spBv1.0/plant/NDATA/edge-2", &payload(3, by_alias.clone()))
        .unwrap();
    assert_eq!(state.seen.0, 1);
    // 255 wraps to 0 without a gap.
    state
        .decode("spBv1.0/plant/NBIRTH/edge-2", &payload(255, vec![]))
        .unwrap();
    state
        .decode("spBv1.0/plant/NDATA/edge-2", &payload(0, vec![]))
        .unwrap();
    assert_eq!(state.seen.0, 1);
    assert!(
        state
            .decode("spBv1.0/plant/NDEATH/edge-2", &payload(0, vec![]))
            .unwrap()
            .is_empty()
    );
    assert_eq!(state.declarations, 0);
    let data = state
        .decode("spBv1.0/plant/NDATA/edge-2", &payload(1, by_alias))
        .unwrap();
    assert_eq!(field(&data[0], "Level"), None, "forgotten at death");
}

#[test]
fn null_historical_and_unsupported_values_are_dropped() {
    let mut state = State::default();
    let mut null = metric(Some("a"), None, 10, MetricValue::DoubleValue(1.0));
    null.is_null = Some(true);
    let mut historical = metric(Some("b"), None, 10, MetricValue::DoubleValue(1.0));
    historical.is_historical = Some(true);
    let r = state
        .decode(
            "spBv1.0/g/NDATA/e",
            &payload(
                0,
                vec![
                    null,
                    historical,
                    metric(Some("c"), None, 17, MetricValue::BytesValue(vec![1, 2])),
                    metric(Some("d"), None, 9, MetricValue::FloatValue(f32::NAN)),
                    metric(Some("e"), None, 8, MetricValue::LongValue(u64::MAX)),
                    metric(Some("e"), None, 8, MetricValue::LongValue(1)),
                ],
            ),
        )
        .unwrap();
    assert_eq!(field(&r[0], "e"), Some(&Value::Float(u64::MAX as f64)));
    assert_eq!(
        r[0].unsupported, 5,
        "null, historical, bytes, NaN, and e again"
    );
}

#[test]
fn topics_outside_the_namespace_and_garbage_are_rejected() {
    let mut state = State::default();
    let ok = payload(0, vec![]);
    for topic in [
        "city/air/1",
        "spBv1.0/g/DDATA/e",
        "spBv1.0/g/NDATA/e/d",
        "spBv1.0/g/XDATA/e",
        "spBv1.0/g",
    ] {
        assert_eq!(
            state.decode(topic, &ok),
            Err(DecodeError::NotSparkplug),
            "{topic}"
        );
    }
    for topic in [
        "spBv1.0/STATE/host-1",
        "spBv1.0/g/NCMD/e",
        "spBv1.0/g/DCMD/e/d",
    ] {
        assert_eq!(state.decode(topic, &ok), Ok(Vec::new()), "{topic}");
    }
    assert_eq!(
        state.decode("spBv1.0/g/NDATA/e", b"\xff\xff\xff"),
        Err(DecodeError::Protobuf)
    );
    // Metrics are counted before they are decoded: empty ones cost two bytes each.
    let many = b"\x12\x00".repeat(MAX_FIELDS + 1);
    assert_eq!(
        state.decode("spBv1.0/g/NDATA/e", &many),
        Err(DecodeError::TooManyFields)
    );
    assert!(state.decode("spBv1.0/g/NDATA/e", &many[2..]).is_ok());
}
