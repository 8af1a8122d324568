//! FIWARE NGSI entities (Smart Data Models), in any of their JSON forms: key-values, NGSI v2
//! normalised, and NGSI-LD normalised (`format = "ngsi"`).
//!
//! The payload is one entity: a JSON object with string `id` and `type`. Each other attribute
//! (in name order) becomes fields the way the plain JSON decoder makes them, from the attribute's
//! value, whatever the form, so that one policy reads both forms of a data model alike:
//!
//! - a key-values attribute is its own value (`"temperature": 12.2`);
//! - a normalised attribute is an object with a string `type` and a `value` (NGSI v2, NGSI-LD
//!   `Property`) or an `object` (NGSI-LD `Relationship`): the field is that value, and its
//!   metadata (`metadata`, `unitCode`, `observedAt`, …) is dropped and counted as unsupported;
//!   an NGSI-LD typed value `{"@type": "DateTime", "@value": "…"}` gives its `@value`;
//! - a GeoJSON geometry (`{"type": "Point", "coordinates": [lon, lat]}`, bare or as the value of
//!   a `GeoProperty` or `geo:json` attribute) gives `<name>.lat` and `<name>.lon`: the point, or
//!   for a `LineString`, `Polygon` or `MultiPoint` the mean of its positions. Declare them as the
//!   `lat`/`lon` of an `h3` or `grid` treatment, so that the coordinates never pass;
//! - objects (`StructuredValue`, `address`) are flattened into dotted paths; arrays and nulls are
//!   dropped and counted, as for JSON.
//!
//! `id` and `type` are fields like any other: an entity id often names a device or a place, so
//! keep it only when the policy means to. `@context` is dropped without being counted.
//!
//! The JSON decoder's checks run first, with its limits ([`MAX_DEPTH`](super::MAX_DEPTH),
//! [`MAX_FIELDS`](super::MAX_FIELDS)); a payload over them, or not an entity, is rejected whole.

use compact_str::format_compact;
use hubgate_privacy::{Reading, Value};
use serde_json::{Map, Value as Json};

use super::DecodeError;

/// GeoJSON geometry types whose positions give a representative point.
const GEOMETRIES: &[&str] = &["Point", "MultiPoint", "LineString", "Polygon"];

/// Decodes one NGSI entity.
pub fn entity(payload: &[u8]) -> Result<Reading, DecodeError> {
    // The JSON decoder's checks first: syntax (with line and column), depth, size, and fields
    // given twice, which a parsed map would hide. What passes them parses, and the walk below
    // stays within their limits (it makes no more fields, nor deeper ones, than they counted).
    super::json(payload)?;
    let Ok(Json::Object(entity)) = serde_json::from_slice::<Json>(payload) else {
        return Err(DecodeError::NotAnObject);
    };
    let mut reading = Reading::default();
    for key in ["id", "type"] {
        match entity.get(key) {
            Some(Json::String(s)) => reading.fields.push((key.into(), Value::Str(s.into()))),
            _ => return Err(DecodeError::NotAnEntity),
        }
    }
    for (name, value) in &entity {
        if !matches!(name.as_str(), "id" | "type" | "@context") {
            attribute(&mut reading, name, value);
        }
    }
    if super::has_duplicates(&reading.fields) {
        return Err(DecodeError::DuplicateField);
    }
    Ok(reading)
}

/// One top-level attribute, in whichever form it comes.
fn attribute(out: &mut Reading, name: &str, value: &Json) {
    let Json::Object(object) = value else {
        return flatten(out, name, value);
    };
    if let Some(point) = geometry(object) {
        return push_point(out, name, point);
    }
    let normalised = object.get("type").is_some_and(Json::is_string)
        && (object.contains_key("value") || object.contains_key("object"));
    if !normalised {
        return flatten(out, name, value);
    }
    // Everything beside the type and the value is metadata: dropped, and counted.
    let metadata = object
        .keys()
        .filter(|key| !matches!(key.as_str(), "type" | "value" | "object"))
        .count();
    out.unsupported += u32::try_from(metadata).unwrap_or(u32::MAX);
    match object.get("value").or_else(|| object.get("object")) {
        Some(Json::Object(v)) => match (geometry(v), v.get("@value")) {
            (Some(point), _) => push_point(out, name, point),
            (None, Some(typed)) => flatten(out, name, typed),
            (None, None) => flatten(out, name, &Json::Object(v.clone())),
        },
        Some(inner) => flatten(out, name, inner),
        None => out.unsupported += 1,
    }
}

fn push_point(out: &mut Reading, name: &str, (lat, lon): (f64, f64)) {
    out.fields
        .push((format_compact!("{name}.lat"), Value::Float(lat)));
    out.fields
        .push((format_compact!("{name}.lon"), Value::Float(lon)));
}

/// A plain JSON value at `path`, flattened as the JSON decoder does.
pub(super) fn flatten(out: &mut Reading, path: &str, value: &Json) {
    let scalar = match value {
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(f)) => Value::Float(f),
            (None, None) => return out.unsupported += 1,
        },
        Json::String(s) => Value::Str(s.into()),
        Json::Null | Json::Array(_) => return out.unsupported += 1,
        Json::Object(object) => {
            for (key, inner) in object {
                flatten(out, &format!("{path}.{key}"), inner);
            }
            return;
        }
    };
    out.fields.push((path.into(), scalar));
}

/// The representative point `(lat, lon)` of a GeoJSON geometry: the point itself, or the mean of
/// the positions of a line, polygon or set of points. `None` when `object` is not one.
fn geometry(object: &Map<String, Json>) -> Option<(f64, f64)> {
    let kind = object.get("type")?.as_str()?;
    if !GEOMETRIES.contains(&kind) {
        return None;
    }
    let mut positions = Vec::new();
    collect_positions(object.get("coordinates")?, &mut positions, 0);
    if positions.is_empty() {
        return None;
    }
    let n = positions.len() as f64;
    let (lon, lat) = positions
        .iter()
        .fold((0.0, 0.0), |(x, y), (lon, lat)| (x + lon, y + lat));
    Some((lat / n, lon / n))
}

/// The `[lon, lat]` positions nested in GeoJSON coordinates, at most three levels down.
fn collect_positions(coordinates: &Json, out: &mut Vec<(f64, f64)>, depth: usize) {
    let Json::Array(items) = coordinates else {
        return;
    };
    match items.as_slice() {
        [Json::Number(lon), Json::Number(lat), ..] => {
            if let (Some(lon), Some(lat)) = (lon.as_f64(), lat.as_f64()) {
                out.push((lon, lat));
            }
        }
        _ if depth < 3 => {
            for item in items {
                collect_positions(item, out, depth + 1);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::MAX_FIELDS;

    fn example(name: &str) -> Vec<u8> {
        // The Smart Data Models initiative's own examples (tests/data/smart-data-models).
        let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        std::fs::read(manifest.join("../tests/data/smart-data-models").join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn field<'a>(r: &'a Reading, path: &str) -> Option<&'a Value> {
        r.fields.iter().find(|(p, _)| p == path).map(|(_, v)| v)
    }

    /// The key-values and normalised forms of one entity give the same fields and values.
    #[test]
    fn both_forms_of_air_quality_observed_read_alike() {
        let kv = entity(&example("AirQualityObserved.keyvalues.json")).unwrap();
        let normalised = entity(&example("AirQualityObserved.normalized.json")).unwrap();
        for path in [
            "id",
            "type",
            "temperature",
            "co",
            "nox",
            "airQualityLevel",
            "address.streetAddress",
            "location.lat",
            "location.lon",
        ] {
            assert!(field(&kv, path).is_some(), "{path}");
            assert_eq!(field(&kv, path), field(&normalised, path), "{path}");
        }
        assert_eq!(field(&kv, "temperature"), Some(&Value::Float(12.2)));
        assert_eq!(field(&kv, "co"), Some(&Value::Int(500)));
        assert_eq!(
            field(&kv, "location.lat"),
            Some(&Value::Float(40.423852777777775))
        );
        assert_eq!(
            field(&kv, "location.lon"),
            Some(&Value::Float(-3.712247222222222))
        );
        // The units of the normalised form are metadata: dropped and counted.
        assert_eq!(normalised.unsupported, 5);
        assert!(
            normalised
                .fields
                .iter()
                .all(|(p, _)| !p.contains("unitCode"))
        );
    }

    #[test]
    fn noise_parking_and_traffic_examples_decode() {
        let noise = entity(&example("NoiseLevelObserved.keyvalues.json")).unwrap();
        assert_eq!(field(&noise, "LAeq"), Some(&Value::Float(67.8)));
        assert_eq!(
            field(&noise, "dateObservedFrom"),
            Some(&Value::Str("2016-12-28T11:00:00.00Z".into()))
        );
        let parking = entity(&example("ParkingSpot.keyvalues.json")).unwrap();
        assert_eq!(field(&parking, "status"), Some(&Value::Str("free".into())));
        assert_eq!(parking.unsupported, 1, "the category array");
        // A LineString gives the mean of its positions.
        let traffic = entity(&example("TrafficFlowObserved.keyvalues.json")).unwrap();
        let Some(Value::Float(lat)) = field(&traffic, "location.lat") else {
            panic!("no latitude");
        };
        let want = (41.6538181849672 + 41.6600594193478 + 41.659585195093) / 3.0;
        assert!((lat - want).abs() < 1e-12);
        assert_eq!(field(&traffic, "intensity"), Some(&Value::Int(197)));
        assert_eq!(field(&traffic, "reversedLane"), Some(&Value::Bool(false)));
    }

    /// NGSI-LD normalised: Property, GeoProperty, Relationship, typed values, and the context.
    #[test]
    fn ngsi_ld_normalised_entities_decode() {
        let r = entity(
            br#"{
  "id": "urn:ngsi-ld:NoiseLevelObserved:vitoria-1",
  "type": "NoiseLevelObserved",
  "LAeq": {"type": "Property", "value": 67.8, "unitCode": "2N", "observedAt": "2016-12-28T11:00:00Z"},
  "dateObservedFrom": {"type": "Property", "value": {"@type": "DateTime", "@value": "2016-12-28T11:00:00Z"}},
  "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [-2.698, 42.8491]}},
  "refDevice": {"type": "Relationship", "object": "urn:ngsi-ld:Device:sonometer-7"},
  "@context": ["https://smartdatamodels.org/context.jsonld"]
}"#,
        )
        .unwrap();
        assert_eq!(field(&r, "LAeq"), Some(&Value::Float(67.8)));
        assert_eq!(
            field(&r, "dateObservedFrom"),
            Some(&Value::Str("2016-12-28T11:00:00Z".into()))
        );
        assert_eq!(field(&r, "location.lat"), Some(&Value::Float(42.8491)));
        assert_eq!(
            field(&r, "refDevice"),
            Some(&Value::Str("urn:ngsi-ld:Device:sonometer-7".into()))
        );
        assert_eq!(r.unsupported, 2, "unitCode and observedAt");
        assert!(field(&r, "@context").is_none());
    }

    #[test]
    fn payloads_that_are_not_entities_are_rejected() {
        assert_eq!(entity(b"[1]"), Err(DecodeError::NotAnObject));
        assert_eq!(entity(br#"{"type": "X"}"#), Err(DecodeError::NotAnEntity));
        assert_eq!(
            entity(br#"{"id": 7, "type": "X"}"#),
            Err(DecodeError::NotAnEntity)
        );
        assert!(matches!(
            entity(b"{\"id\":"),
            Err(DecodeError::Syntax { .. })
        ));
        assert_eq!(
            entity(br#"{"id": "a", "type": "X", "a.b": 1, "a": {"b": 2}}"#),
            Err(DecodeError::DuplicateField)
        );
        assert_eq!(
            entity(br#"{"id": "a", "type": "X", "t": 1, "t": 2}"#),
            Err(DecodeError::DuplicateField)
        );
        let deep = format!(
            r#"{{"id": "a", "type": "X", "x": {}1{}}}"#,
            "{\"a\":".repeat(20),
            "}".repeat(20)
        );
        assert_eq!(entity(deep.as_bytes()), Err(DecodeError::TooDeep));
        let many: Vec<String> = (0..MAX_FIELDS).map(|i| format!("\"f{i}\": 1")).collect();
        let wide = format!(r#"{{"id": "a", "type": "X", {}}}"#, many.join(","));
        assert_eq!(entity(wide.as_bytes()), Err(DecodeError::TooManyFields));
    }
}
