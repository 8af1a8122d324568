//! LoRaWAN uplinks as network servers publish them over MQTT: ChirpStack v4 (`format =
//! "chirpstack"`, JSON events on `application/<id>/device/<devEui>/event/up`) and The Things
//! Stack v3 (`format = "ttn"`, on `v3/<application>@<tenant>/devices/<device>/up`).
//!
//! The decoded payload (ChirpStack's `object`, The Things Stack's
//! `uplink_message.decoded_payload`) gives the reading's fields, flattened as the JSON decoder
//! does. What the network server adds becomes fields under `lorawan.` (the names are in
//! [`hubgate_privacy::lorawan`], which the policy checks use too):
//!
//! | field | from |
//! |---|---|
//! | `lorawan.dev_eui`, `lorawan.dev_addr`, `lorawan.join_eui`, `lorawan.device_name`, `lorawan.device_id` | the device's identity: a policy may only pseudonymise or drop them |
//! | `lorawan.f_cnt` | the frame counter, which links a device's messages: a policy may only drop it |
//! | `lorawan.f_port`, `lorawan.application` | the port, and the application's name or id |
//! | `lorawan.time` | the network server's time of the uplink, in seconds since the Unix epoch; the stream's event time unless it declares another `time_field` |
//! | `lorawan.gateways` | how many gateways heard the uplink |
//! | `lorawan.rssi`, `lorawan.snr`, `lorawan.gateway_id` | of the gateway that heard it best (highest RSSI) |
//! | `lorawan.gateway.lat`, `lorawan.gateway.lon` | that gateway's position, when the network server gives it |
//! | `lorawan.location.lat`, `lorawan.location.lon` | the device's position (The Things Stack's `locations`), when given |
//! | `lorawan.frequency`, `lorawan.spreading_factor` | the radio settings |
//!
//! Positions locate a device: a policy may pass them only as the `lat`/`lon` of an `h3` or
//! `grid` cell. Like every field, none passes unless the stream declares it. The raw payload
//! (`data`, `frm_payload`), device tags and attributes are dropped and counted as unsupported;
//! the network servers' other metadata (ids of the tenant, profile, correlation) is dropped.
//!
//! The JSON decoder's checks run first, with its limits; a payload over them, or one that is not
//! an uplink event of the format (no device identity), is rejected whole.

use hubgate_privacy::lorawan;
use hubgate_privacy::{Reading, Value};
use serde_json::{Map, Value as Json};

use super::DecodeError;

/// Which network server's JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// ChirpStack v4: camelCase, `deviceInfo`, `object`, `rxInfo`, `txInfo`.
    ChirpStack,
    /// The Things Stack v3: snake_case, `end_device_ids`, `uplink_message`.
    TheThingsStack,
}

/// Decodes one uplink event.
pub fn uplink(server: Server, payload: &[u8]) -> Result<Reading, DecodeError> {
    // Syntax, depth, size and duplicate members, as for plain JSON.
    super::json(payload)?;
    let Ok(Json::Object(event)) = serde_json::from_slice::<Json>(payload) else {
        return Err(DecodeError::NotAnObject);
    };
    let mut reading = Reading::default();
    match server {
        Server::ChirpStack => chirpstack(&event, &mut reading)?,
        Server::TheThingsStack => the_things_stack(&event, &mut reading)?,
    }
    if super::has_duplicates(&reading.fields) {
        return Err(DecodeError::DuplicateField);
    }
    Ok(reading)
}

fn chirpstack(event: &Map<String, Json>, out: &mut Reading) -> Result<(), DecodeError> {
    let info = event
        .get("deviceInfo")
        .and_then(Json::as_object)
        .filter(|info| info.get("devEui").is_some_and(Json::is_string))
        .ok_or(DecodeError::NotAnUplink)?;
    text(out, lorawan::DEV_EUI, info.get("devEui"));
    text(out, lorawan::DEV_ADDR, event.get("devAddr"));
    text(out, lorawan::DEVICE_NAME, info.get("deviceName"));
    text(out, lorawan::APPLICATION, info.get("applicationName"));
    integer(out, lorawan::F_CNT, event.get("fCnt"));
    integer(out, lorawan::F_PORT, event.get("fPort"));
    time(out, event.get("time"));
    let gateways = event.get("rxInfo").and_then(Json::as_array);
    radio(out, gateways, |g| g.get("gatewayId"));
    let tx = event.get("txInfo");
    integer(out, lorawan::FREQUENCY, tx.and_then(|t| t.get("frequency")));
    integer(
        out,
        lorawan::SPREADING_FACTOR,
        tx.and_then(|t| t.pointer("/modulation/lora/spreadingFactor")),
    );
    dropped(out, event.get("data"));
    dropped(out, info.get("tags"));
    decoded(out, event.get("object"));
    Ok(())
}

fn the_things_stack(event: &Map<String, Json>, out: &mut Reading) -> Result<(), DecodeError> {
    let ids = event
        .get("end_device_ids")
        .and_then(Json::as_object)
        .filter(|ids| ids.get("device_id").is_some_and(Json::is_string))
        .ok_or(DecodeError::NotAnUplink)?;
    let Some(Json::Object(up)) = event.get("uplink_message") else {
        return Err(DecodeError::NotAnUplink);
    };
    text(out, lorawan::DEV_EUI, ids.get("dev_eui"));
    text(out, lorawan::DEV_ADDR, ids.get("dev_addr"));
    text(out, lorawan::JOIN_EUI, ids.get("join_eui"));
    text(out, lorawan::DEVICE_ID, ids.get("device_id"));
    text(
        out,
        lorawan::APPLICATION,
        ids.get("application_ids")
            .and_then(|a| a.get("application_id")),
    );
    integer(out, lorawan::F_CNT, up.get("f_cnt"));
    integer(out, lorawan::F_PORT, up.get("f_port"));
    // The network server's time; the application server's when that is all there is.
    time(
        out,
        up.get("received_at").or_else(|| event.get("received_at")),
    );
    let gateways = up.get("rx_metadata").and_then(Json::as_array);
    radio(out, gateways, |g| {
        g.get("gateway_ids").and_then(|ids| ids.get("gateway_id"))
    });
    let settings = up.get("settings");
    // Protobuf's JSON writes 64-bit integers as strings: "868300000".
    integer(
        out,
        lorawan::FREQUENCY,
        settings.and_then(|s| s.get("frequency")),
    );
    integer(
        out,
        lorawan::SPREADING_FACTOR,
        settings.and_then(|s| s.pointer("/data_rate/lora/spreading_factor")),
    );
    if let Some(Json::Object(locations)) = up.get("locations") {
        // The location the device reports or was registered at: `user` first, else any.
        let location = locations
            .get("user")
            .or_else(|| locations.values().next())
            .and_then(Json::as_object);
        if let Some((lat, lon)) = location.and_then(position) {
            point(out, lorawan::LOCATION_LAT, lorawan::LOCATION_LON, lat, lon);
        }
    }
    dropped(out, up.get("frm_payload"));
    dropped(out, event.get("attributes"));
    dropped(out, up.get("attributes"));
    decoded(out, up.get("decoded_payload"));
    Ok(())
}

/// The radio fields from the gateways that heard the uplink: how many, and the RSSI, SNR, id and
/// position of the one that heard it best.
fn radio<'a>(
    out: &mut Reading,
    gateways: Option<&'a Vec<Json>>,
    id: impl Fn(&'a Json) -> Option<&'a Json>,
) {
    let Some(gateways) = gateways else {
        return;
    };
    out.fields.push((
        lorawan::GATEWAYS.into(),
        Value::Int(i64::try_from(gateways.len()).unwrap_or(i64::MAX)),
    ));
    let best = gateways.iter().filter(|g| g.is_object()).max_by(|a, b| {
        let rssi = |g: &Json| g.get("rssi").and_then(Json::as_f64).unwrap_or(f64::MIN);
        rssi(a).total_cmp(&rssi(b))
    });
    let Some(best) = best else {
        return;
    };
    number(out, lorawan::RSSI, best.get("rssi"));
    number(out, lorawan::SNR, best.get("snr"));
    text(out, lorawan::GATEWAY_ID, id(best));
    if let Some((lat, lon)) = best
        .get("location")
        .and_then(Json::as_object)
        .and_then(position)
    {
        point(out, lorawan::GATEWAY_LAT, lorawan::GATEWAY_LON, lat, lon);
    }
}

/// `latitude` and `longitude` of a location object, when both are numbers in range.
fn position(location: &Map<String, Json>) -> Option<(f64, f64)> {
    let lat = location.get("latitude")?.as_f64()?;
    let lon = location.get("longitude")?.as_f64()?;
    ((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon)).then_some((lat, lon))
}

fn point(out: &mut Reading, lat_path: &str, lon_path: &str, lat: f64, lon: f64) {
    out.fields.push((lat_path.into(), Value::Float(lat)));
    out.fields.push((lon_path.into(), Value::Float(lon)));
}

fn text(out: &mut Reading, path: &str, value: Option<&Json>) {
    if let Some(Json::String(s)) = value {
        out.fields.push((path.into(), Value::Str(s.into())));
    }
}

/// An integer, or a string that holds one (protobuf's JSON for 64-bit integers).
fn integer(out: &mut Reading, path: &str, value: Option<&Json>) {
    let n = match value {
        Some(Json::Number(n)) => n.as_i64(),
        Some(Json::String(s)) => s.parse::<i64>().ok(),
        _ => None,
    };
    if let Some(n) = n {
        out.fields.push((path.into(), Value::Int(n)));
    }
}

fn number(out: &mut Reading, path: &str, value: Option<&Json>) {
    let Some(Json::Number(n)) = value else {
        return;
    };
    match (n.as_i64(), n.as_f64()) {
        (Some(i), _) => out.fields.push((path.into(), Value::Int(i))),
        (None, Some(f)) => out.fields.push((path.into(), Value::Float(f))),
        (None, None) => {}
    }
}

/// The network server's time (RFC 3339, any offset) as seconds since the Unix epoch.
fn time(out: &mut Reading, value: Option<&Json>) {
    if let Some(secs) = value.and_then(Json::as_str).and_then(rfc3339_secs) {
        out.fields.push((lorawan::TIME.into(), Value::Float(secs)));
    }
}

/// Seconds since the Unix epoch of an RFC 3339 time with `Z` or a `±hh:mm` offset, to the
/// millisecond, as the chain reads a `time_field`.
fn rfc3339_secs(s: &str) -> Option<f64> {
    hubgate_privacy::chain::rfc3339_ms(s).map(|ms| ms as f64 / 1000.0)
}

/// The decoded payload's members, as fields of their own names.
fn decoded(out: &mut Reading, object: Option<&Json>) {
    match object {
        Some(Json::Object(members)) => {
            for (name, value) in members {
                super::ngsi::flatten(out, name, value);
            }
        }
        Some(Json::Null) | None => {}
        Some(_) => out.unsupported += 1,
    }
}

/// A member that is dropped: counted, once per value it holds.
fn dropped(out: &mut Reading, value: Option<&Json>) {
    let n = match value {
        None | Some(Json::Null) => 0,
        Some(Json::Object(members)) => members.len(),
        Some(Json::Array(items)) => items.len(),
        Some(_) => 1,
    };
    out.unsupported += u32::try_from(n).unwrap_or(u32::MAX);
}

#[cfg(test)]
mod tests;
