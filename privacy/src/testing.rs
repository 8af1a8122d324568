//! Helpers shared by the crate's tests.

use crate::policy::{self, StreamPolicy};
use crate::value::Value;

/// A one-stream policy with extra stream settings, `[stream.fields]` lines, and anything after
/// them (an `[stream.aggregate]` table).
pub fn stream_with(extra: &str, fields: &str) -> StreamPolicy {
    let src = format!(
        "[[stream]]\nname = \"s\"\ntopics = [\"t\"]\npurpose = \"p\"\nlegal_basis = \"b\"\n\
         principles = [\"shared_prosperity\"]\nretention = \"1d\"\n{extra}\n[stream.fields]\n{fields}"
    );
    match policy::from_toml(&src) {
        Ok((p, _)) => p.streams()[0].clone(),
        Err(d) => panic!("{:?}\n{src}", d.0),
    }
}

pub fn s(v: &str) -> Value {
    Value::Str(v.into())
}

/// The fields of a stream with every treatment: kept, pseudonymised, an H3 cell at resolution 9,
/// a grid cell of 0.01°.
pub const EVERY_TREATMENT: &str = "counter_id = \"keep\"\nnote = \"keep\"\nrssi = \"keep\"\n\
    mac = \"pseudonymise\"\n\
    cell = { h3 = { resolution = 9, lat = \"lat\", lon = \"lon\" } }\n\
    area = { grid = { step = 0.01, lat = \"lat\", lon = \"lon\" } }\n";
