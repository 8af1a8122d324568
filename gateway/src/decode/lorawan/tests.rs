use proptest::prelude::*;
use serde_json::json;

use super::*;

/// A network server's documented example payload (tests/data/lorawan, with its source).
fn example(name: &str) -> Vec<u8> {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::read(manifest.join("../tests/data/lorawan").join(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn example_json(name: &str) -> Json {
    serde_json::from_slice(&example(name)).expect("the example is JSON")
}

fn field<'a>(r: &'a Reading, path: &str) -> Option<&'a Value> {
    r.fields.iter().find(|(p, _)| p == path).map(|(_, v)| v)
}

fn str_field<'a>(r: &'a Reading, path: &str) -> Option<&'a str> {
    match field(r, path) {
        Some(Value::Str(s)) => Some(s.as_str()),
        _ => None,
    }
}

#[test]
fn chirpstack_documented_uplink() {
    let r = uplink(Server::ChirpStack, &example("chirpstack-v4-up.json")).unwrap();
    assert_eq!(str_field(&r, lorawan::DEV_EUI), Some("0101010101010101"));
    assert_eq!(str_field(&r, lorawan::DEV_ADDR), Some("00189440"));
    assert_eq!(str_field(&r, lorawan::DEVICE_NAME), Some("Test device"));
    assert_eq!(
        str_field(&r, lorawan::APPLICATION),
        Some("Test application")
    );
    assert_eq!(field(&r, lorawan::F_PORT), Some(&Value::Int(1)));
    // "2022-07-18T09:34:15.775023242+00:00", to the millisecond.
    assert_eq!(
        field(&r, lorawan::TIME),
        Some(&Value::Float(1_658_136_855.775))
    );
    assert_eq!(field(&r, lorawan::GATEWAYS), Some(&Value::Int(1)));
    assert_eq!(field(&r, lorawan::RSSI), Some(&Value::Int(-36)));
    assert_eq!(field(&r, lorawan::SNR), Some(&Value::Float(10.5)));
    assert_eq!(str_field(&r, lorawan::GATEWAY_ID), Some("0016c001f153a14c"));
    assert_eq!(
        field(&r, lorawan::FREQUENCY),
        Some(&Value::Int(867_100_000))
    );
    assert_eq!(field(&r, lorawan::SPREADING_FACTOR), Some(&Value::Int(11)));
    // The raw payload and the one tag are dropped and counted; the example has no codec output.
    assert_eq!(r.unsupported, 2);
    assert!(field(&r, lorawan::F_CNT).is_none());
    assert!(r.fields.iter().all(|(p, _)| p.starts_with("lorawan.")));
}

/// The documented event with what a codec and located gateways add (`object`, `fCnt`,
/// `rxInfo[].location`, as `integration.proto` and `gw.proto` define them): the payload's fields
/// keep their names, and the radio fields come from the gateway that heard the uplink best.
#[test]
fn chirpstack_uplink_with_decoded_object_and_located_gateways() {
    let mut event = example_json("chirpstack-v4-up.json");
    event["fCnt"] = json!(12);
    event["object"] = json!({"temperature": 21.5, "battery": {"level": 90}, "readings": [1, 2]});
    let weak = json!({"gatewayId": "aa55aa55aa55aa55", "rssi": -110, "snr": -7.0,
                      "location": {"latitude": 52.0, "longitude": 4.0}});
    event["rxInfo"].as_array_mut().unwrap().insert(0, weak);
    event["rxInfo"][1]["location"] =
        json!({"latitude": 52.3731, "longitude": 4.8926, "altitude": 2.0});
    let r = uplink(Server::ChirpStack, &serde_json::to_vec(&event).unwrap()).unwrap();
    assert_eq!(field(&r, "temperature"), Some(&Value::Float(21.5)));
    assert_eq!(field(&r, "battery.level"), Some(&Value::Int(90)));
    assert_eq!(field(&r, lorawan::F_CNT), Some(&Value::Int(12)));
    assert_eq!(field(&r, lorawan::GATEWAYS), Some(&Value::Int(2)));
    assert_eq!(field(&r, lorawan::RSSI), Some(&Value::Int(-36)));
    assert_eq!(str_field(&r, lorawan::GATEWAY_ID), Some("0016c001f153a14c"));
    assert_eq!(
        field(&r, lorawan::GATEWAY_LAT),
        Some(&Value::Float(52.3731))
    );
    assert_eq!(field(&r, lorawan::GATEWAY_LON), Some(&Value::Float(4.8926)));
    // data, the tag and the array in the payload.
    assert_eq!(r.unsupported, 3);
}

#[test]
fn the_things_stack_documented_uplink() {
    let r = uplink(Server::TheThingsStack, &example("ttn-v3-up.json")).unwrap();
    assert_eq!(str_field(&r, lorawan::DEV_EUI), Some("0004A30B001C0530"));
    assert_eq!(str_field(&r, lorawan::DEV_ADDR), Some("00BCB929"));
    assert_eq!(str_field(&r, lorawan::JOIN_EUI), Some("800000000000000C"));
    assert_eq!(str_field(&r, lorawan::DEVICE_ID), Some("dev1"));
    assert_eq!(str_field(&r, lorawan::APPLICATION), Some("app1"));
    assert_eq!(field(&r, lorawan::F_CNT), Some(&Value::Int(1)));
    // The network server's time (uplink_message.received_at), not the application server's.
    assert_eq!(
        field(&r, lorawan::TIME),
        Some(&Value::Float(1_581_520_545.789))
    );
    assert_eq!(field(&r, "temperature"), Some(&Value::Float(1.0)));
    assert_eq!(field(&r, "luminosity"), Some(&Value::Float(0.64)));
    assert_eq!(
        field(&r, lorawan::FREQUENCY),
        Some(&Value::Int(868_300_000))
    );
    assert_eq!(field(&r, lorawan::SPREADING_FACTOR), Some(&Value::Int(7)));
    assert_eq!(str_field(&r, lorawan::GATEWAY_ID), Some("gtw1"));
    assert_eq!(field(&r, lorawan::RSSI), Some(&Value::Int(-35)));
    assert_eq!(
        field(&r, lorawan::LOCATION_LAT),
        Some(&Value::Float(37.97155556731436))
    );
    assert_eq!(
        field(&r, lorawan::LOCATION_LON),
        Some(&Value::Float(23.72678801175413))
    );
    // frm_payload.
    assert_eq!(r.unsupported, 1);
}

#[test]
fn the_things_stacks_other_documented_uplinks_decode() {
    let mqtt = uplink(Server::TheThingsStack, &example("ttn-v3-up-mqtt.json")).unwrap();
    assert_eq!(field(&mqtt, lorawan::F_PORT), Some(&Value::Int(15)));
    assert_eq!(str_field(&mqtt, lorawan::DEV_EUI), Some("4200000000000000"));
    let attributes = uplink(
        Server::TheThingsStack,
        &example("ttn-v3-up-attributes.json"),
    )
    .unwrap();
    assert_eq!(str_field(&attributes, lorawan::DEVICE_ID), Some("dev1"));
    // The device's attributes (free text its owner set) never become fields.
    assert!(attributes.unsupported >= 1);
    assert!(
        attributes
            .fields
            .iter()
            .all(|(p, _)| !p.contains("attribute"))
    );
}

/// Payloads of one server are not taken for the other's, nor other events for uplinks.
#[test]
fn what_is_not_an_uplink_is_rejected_whole() {
    let chirpstack = example("chirpstack-v4-up.json");
    let ttn = example("ttn-v3-up.json");
    assert_eq!(
        uplink(Server::TheThingsStack, &chirpstack),
        Err(DecodeError::NotAnUplink)
    );
    assert_eq!(
        uplink(Server::ChirpStack, &ttn),
        Err(DecodeError::NotAnUplink)
    );
    let mut join = example_json("ttn-v3-up.json");
    join.as_object_mut().unwrap().remove("uplink_message");
    join["join_accept"] = json!({"session_key_id": "AXA50tHUGUucuzS/bCGMNw=="});
    assert_eq!(
        uplink(Server::TheThingsStack, &serde_json::to_vec(&join).unwrap()),
        Err(DecodeError::NotAnUplink)
    );
    assert_eq!(
        uplink(Server::ChirpStack, b"[1,2]"),
        Err(DecodeError::NotAnObject)
    );
    assert!(matches!(
        uplink(Server::ChirpStack, b"{\"deviceInfo\":"),
        Err(DecodeError::Syntax { .. })
    ));
}

/// A decoded payload member named like a network server's field cannot pass for it.
#[test]
fn a_payload_member_cannot_shadow_a_network_servers_field() {
    let mut event = example_json("chirpstack-v4-up.json");
    event["object"] = json!({"lorawan": {"dev_eui": "ffffffffffffffff"}});
    assert_eq!(
        uplink(Server::ChirpStack, &serde_json::to_vec(&event).unwrap()),
        Err(DecodeError::DuplicateField)
    );
}

#[test]
fn times_with_offsets_are_read_in_utc() {
    let z = rfc3339_secs("2022-07-18T09:34:15.775Z").unwrap();
    assert_eq!(rfc3339_secs("2022-07-18T11:34:15.775+02:00"), Some(z));
    assert_eq!(rfc3339_secs("2022-07-18T05:04:15.775-04:30"), Some(z));
    assert_eq!(rfc3339_secs("2022-07-18T09:34:15.775023242+00:00"), Some(z));
    for bad in [
        "",
        "2022-07-18",
        "2022-07-18T09:34:15+25:00",
        "2022-07-18T09:34:15+0200",
        "now",
    ] {
        assert_eq!(rfc3339_secs(bad), None, "{bad}");
    }
}

proptest! {
    /// Any bytes: the decoders return, and what they return has unique paths.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        for server in [Server::ChirpStack, Server::TheThingsStack] {
            if let Ok(r) = uplink(server, &bytes) {
                prop_assert!(!super::super::has_duplicates(&r.fields));
            }
        }
    }

    /// The documented uplinks with any member replaced by any JSON value: the decoder returns,
    /// never panics, and a device identity it gives is a string from the payload.
    #[test]
    fn documented_uplinks_with_members_replaced(
        which in 0usize..2,
        path in prop::sample::select(vec![
            "/time", "/deviceInfo", "/deviceInfo/devEui", "/rxInfo", "/rxInfo/0", "/rxInfo/0/rssi",
            "/txInfo/frequency", "/object", "/fCnt", "/end_device_ids", "/uplink_message",
            "/uplink_message/rx_metadata", "/uplink_message/decoded_payload",
            "/uplink_message/locations", "/uplink_message/received_at",
            "/uplink_message/settings/frequency",
        ]),
        value in prop_oneof![
            Just(json!(null)), Just(json!([])), Just(json!({})), Just(json!("x")),
            any::<i64>().prop_map(|n| json!(n)), any::<f64>().prop_map(|f| json!(f)),
            Just(json!([{"rssi": "loud"}, 7, {"location": {"latitude": 1e300}}])),
        ],
    ) {
        let (server, name) = [
            (Server::ChirpStack, "chirpstack-v4-up.json"),
            (Server::TheThingsStack, "ttn-v3-up.json"),
        ][which];
        let mut event = example_json(name);
        if let Some(slot) = event.pointer_mut(path) {
            *slot = value;
        }
        if let Ok(r) = uplink(server, &serde_json::to_vec(&event).unwrap()) {
            prop_assert!(!super::super::has_duplicates(&r.fields));
            if let Some(v) = field(&r, lorawan::DEV_EUI) {
                prop_assert!(matches!(v, Value::Str(_)));
            }
        }
    }
}
