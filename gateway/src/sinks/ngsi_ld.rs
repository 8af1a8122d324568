//! Records as NGSI-LD entities (normalised form), for FIWARE context brokers and the systems built
//! on Smart Data Models: the NATS exporter's `payload = "ngsi_ld"`.
//!
//! - `type`: the record's `type` field when the policy keeps it (an entity decoded with
//!   `format = "ngsi"` keeps its data model's type), else the stream's name.
//! - `id`: the record's `id` field when kept, as a URN (`urn:ngsi-ld:<type>:<id>` unless it is
//!   one already); else one per record, `urn:ngsi-ld:<type>:<incarnation>-<stream>-<sequence>`.
//! - Every other field is a `Property` with the record's event time as `observedAt`. Dotted paths
//!   nest: `address.streetAddress` is the `streetAddress` member of the `address` property's
//!   value. An object of just `lat` and `lon` numbers is a `GeoProperty` point (which a policy
//!   passes only if it keeps coordinates: a generalised cell is a plain text property).
//! - `@context`: the NGSI-LD core context.

use std::collections::BTreeMap;

use hubgate_proto::v1;
use serde_json::{Map, Value as Json, json};

/// 9999-12-31T23:59:59Z.
const LAST_RFC3339_SECOND: i64 = 253_402_300_799;

/// The NGSI-LD core context.
pub const CORE_CONTEXT: &str = "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.8.jsonld";

/// The NGSI-LD entity of `record`; `incarnation` makes per-record ids unique across gateways.
pub fn entity(record: &v1::Record, incarnation: &str) -> Json {
    let text = |name: &str| match record.fields.get(name).and_then(|v| v.kind.as_ref()) {
        Some(v1::value::Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    let kind = text("type").unwrap_or_else(|| record.stream.clone());
    let id = match text("id") {
        Some(id) if id.starts_with("urn:") => id,
        Some(id) => format!("urn:ngsi-ld:{kind}:{id}"),
        None => format!(
            "urn:ngsi-ld:{kind}:{incarnation}-{}-{}",
            record.stream, record.sequence
        ),
    };
    // RFC 3339 has four-digit years: a time outside them (a forwarded record may carry any) is
    // left out rather than written wrong.
    let observed_at = record
        .event_time
        .as_ref()
        .filter(|t| (0..=LAST_RFC3339_SECOND).contains(&t.seconds))
        .map(|t| {
            let nanos = t.nanos.clamp(0, 999_999_999).unsigned_abs();
            let time =
                std::time::UNIX_EPOCH + std::time::Duration::new(t.seconds.unsigned_abs(), nanos);
            humantime::format_rfc3339_millis(time).to_string()
        });

    // Fields by their first path segment, nested by the rest, in name order.
    let mut tree: BTreeMap<&str, Json> = BTreeMap::new();
    let mut paths: Vec<(&String, &v1::Value)> = record
        .fields
        .iter()
        .filter(|(path, _)| !matches!(path.as_str(), "id" | "type"))
        .collect();
    paths.sort_by(|a, b| a.0.cmp(b.0));
    for (path, value) in paths {
        let value = json_value(value);
        match path.split_once('.') {
            None => {
                tree.insert(path, value);
            }
            // A plain value already holds the name: this one keeps its whole path.
            Some((head, _)) if tree.get(head).is_some_and(|v| !v.is_object()) => {
                tree.insert(path, value);
            }
            Some((head, rest)) => {
                let slot = tree.entry(head).or_insert_with(|| Json::Object(Map::new()));
                if let Json::Object(object) = slot {
                    insert(object, rest, value);
                }
            }
        }
    }

    let mut entity = Map::new();
    entity.insert("id".into(), Json::String(id));
    entity.insert("type".into(), Json::String(kind));
    for (name, value) in tree {
        let mut attribute = match point(&value) {
            Some(coordinates) => json!({
                "type": "GeoProperty",
                "value": {"type": "Point", "coordinates": coordinates},
            }),
            None => json!({"type": "Property", "value": value}),
        };
        if let (Some(at), Json::Object(a)) = (&observed_at, &mut attribute) {
            a.insert("observedAt".into(), Json::String(at.clone()));
        }
        entity.insert(name.to_owned(), attribute);
    }
    entity.insert("@context".into(), Json::String(CORE_CONTEXT.into()));
    Json::Object(entity)
}

/// Puts `value` at the dotted `path` inside `object`.
fn insert(object: &mut Map<String, Json>, path: &str, value: Json) {
    match path.split_once('.') {
        None => {
            object.insert(path.to_owned(), value);
        }
        Some((head, _)) if object.get(head).is_some_and(|v| !v.is_object()) => {
            object.insert(path.to_owned(), value);
        }
        Some((head, rest)) => {
            let slot = object
                .entry(head.to_owned())
                .or_insert_with(|| Json::Object(Map::new()));
            if let Json::Object(inner) = slot {
                insert(inner, rest, value);
            }
        }
    }
}

/// `[lon, lat]` when `value` is an object of exactly `lat` and `lon` numbers.
fn point(value: &Json) -> Option<[f64; 2]> {
    let object = value.as_object()?;
    if object.len() != 2 {
        return None;
    }
    Some([object.get("lon")?.as_f64()?, object.get("lat")?.as_f64()?])
}

fn json_value(value: &v1::Value) -> Json {
    use v1::value::Kind;
    match &value.kind {
        Some(Kind::IntValue(i)) => (*i).into(),
        Some(Kind::DoubleValue(f)) => (*f).into(),
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::BoolValue(b)) => (*b).into(),
        None => Json::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(fields: &[(&str, v1::value::Kind)]) -> v1::Record {
        v1::Record {
            stream: "air_quality".into(),
            sequence: 42,
            event_time: Some(prost_types::Timestamp {
                seconds: 1_704_067_200,
                nanos: 0,
            }),
            policy_hash: "ab".into(),
            fields: fields
                .iter()
                .map(|(k, v)| {
                    (
                        (*k).to_owned(),
                        v1::Value {
                            kind: Some(v.clone()),
                        },
                    )
                })
                .collect(),
            ..v1::Record::default()
        }
    }

    #[test]
    fn a_record_becomes_a_normalised_entity() {
        use v1::value::Kind::*;
        let e = entity(
            &record(&[
                ("type", StringValue("AirQualityObserved".into())),
                ("temperature", DoubleValue(12.2)),
                ("address.streetAddress", StringValue("Plaza".into())),
                ("address.addressLocality", StringValue("Madrid".into())),
                ("cell", StringValue("89390cb1b4bffff".into())),
                ("station.lat", DoubleValue(40.4)),
                ("station.lon", DoubleValue(-3.7)),
            ]),
            "c0ffee",
        );
        assert_eq!(e["type"], "AirQualityObserved");
        assert_eq!(
            e["id"],
            "urn:ngsi-ld:AirQualityObserved:c0ffee-air_quality-42"
        );
        assert_eq!(
            e["temperature"],
            json!({"type": "Property", "value": 12.2, "observedAt": "2024-01-01T00:00:00.000Z"})
        );
        assert_eq!(e["address"]["value"]["addressLocality"], "Madrid");
        assert_eq!(e["cell"]["type"], "Property");
        assert_eq!(
            e["station"]["value"],
            json!({"type": "Point", "coordinates": [-3.7, 40.4]})
        );
        assert_eq!(e["station"]["type"], "GeoProperty");
        assert_eq!(e["@context"], CORE_CONTEXT);
        assert!(e.get("policy_hash").is_none());
    }

    /// A name that is both a value and the prefix of another path loses neither; a time
    /// RFC 3339 cannot write is left out.
    #[test]
    fn nothing_is_lost_to_a_clash_or_to_a_far_time() {
        use v1::value::Kind::*;
        let mut r = record(&[
            ("a", IntValue(1)),
            ("a.b", IntValue(2)),
            ("c.d", IntValue(3)),
            ("c.d.e", IntValue(4)),
        ]);
        r.event_time = Some(prost_types::Timestamp {
            seconds: LAST_RFC3339_SECOND + 1,
            nanos: 0,
        });
        let e = entity(&r, "c0ffee");
        assert_eq!(e["a"]["value"], 1);
        assert_eq!(e["a.b"]["value"], 2);
        assert_eq!(e["c"]["value"], json!({"d": 3, "d.e": 4}));
        assert!(e["a"].get("observedAt").is_none());
    }

    #[test]
    fn a_kept_id_names_the_entity() {
        use v1::value::Kind::*;
        let spot = entity(
            &record(&[
                ("id", StringValue("santander:daoiz_velarde_1_5:3".into())),
                ("status", StringValue("free".into())),
            ]),
            "c0ffee",
        );
        assert_eq!(
            spot["id"],
            "urn:ngsi-ld:air_quality:santander:daoiz_velarde_1_5:3"
        );
        let urn = entity(
            &record(&[("id", StringValue("urn:ngsi-ld:ParkingSpot:3".into()))]),
            "c0ffee",
        );
        assert_eq!(urn["id"], "urn:ngsi-ld:ParkingSpot:3");
    }
}
