//! The fields the LoRaWAN decoders (`format = "chirpstack"` and `"ttn"`) add to a reading beside
//! the decoded payload, and what a policy may do with the ones that identify, link or locate a
//! device. The decoders and the policy checks share these names.

/// The device's EUI-64, its network address, its join server's EUI, and the names a network
/// server gives it: they identify the device.
pub const DEV_EUI: &str = "lorawan.dev_eui";
pub const DEV_ADDR: &str = "lorawan.dev_addr";
pub const JOIN_EUI: &str = "lorawan.join_eui";
pub const DEVICE_NAME: &str = "lorawan.device_name";
pub const DEVICE_ID: &str = "lorawan.device_id";
/// The frame counter: consecutive values link one device's messages.
pub const F_CNT: &str = "lorawan.f_cnt";
pub const F_PORT: &str = "lorawan.f_port";
/// The application's name (ChirpStack) or id (The Things Stack).
pub const APPLICATION: &str = "lorawan.application";
/// The network server's time of the uplink, in seconds since the Unix epoch.
pub const TIME: &str = "lorawan.time";
/// How many gateways heard the uplink.
pub const GATEWAYS: &str = "lorawan.gateways";
/// Of the gateway that heard the uplink best.
pub const RSSI: &str = "lorawan.rssi";
pub const SNR: &str = "lorawan.snr";
pub const GATEWAY_ID: &str = "lorawan.gateway_id";
pub const GATEWAY_LAT: &str = "lorawan.gateway.lat";
pub const GATEWAY_LON: &str = "lorawan.gateway.lon";
/// The device's own position, where the network server has one.
pub const LOCATION_LAT: &str = "lorawan.location.lat";
pub const LOCATION_LON: &str = "lorawan.location.lon";
pub const FREQUENCY: &str = "lorawan.frequency";
pub const SPREADING_FACTOR: &str = "lorawan.spreading_factor";

/// Why a field may not be declared `keep`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protected {
    /// It identifies the device: pseudonymise it or leave it out.
    Identity,
    /// It links the device's messages: leave it out.
    Linking,
    /// It locates the device: only as the `lat`/`lon` of an `h3` or `grid` cell.
    Position,
}

/// What protects `path`, if it is one of the fields that identify, link or locate a device.
pub fn protected(path: &str) -> Option<Protected> {
    match path {
        DEV_EUI | DEV_ADDR | JOIN_EUI | DEVICE_NAME | DEVICE_ID => Some(Protected::Identity),
        F_CNT => Some(Protected::Linking),
        GATEWAY_LAT | GATEWAY_LON | LOCATION_LAT | LOCATION_LON => Some(Protected::Position),
        _ => None,
    }
}

impl Protected {
    /// The treatments a field so protected may have: `pseudonymise` for an identity, none for
    /// the others (a position passes only through a cell computed from it).
    pub fn allows(self, treatment: &crate::policy::Treatment) -> bool {
        matches!(
            (self, treatment),
            (Protected::Identity, crate::policy::Treatment::Pseudonymise)
        )
    }

    /// Why, in a `check` error about `path`.
    pub fn explain(self, path: &str) -> String {
        match self {
            Protected::Identity => {
                format!("'{path}' identifies the LoRaWAN device: pseudonymise it, or leave it out")
            }
            Protected::Linking => {
                format!("'{path}' (the frame counter) links the device's messages: leave it out")
            }
            Protected::Position => format!(
                "'{path}' locates the device: pass it only as the lat/lon of an h3 or grid cell"
            ),
        }
    }
}
