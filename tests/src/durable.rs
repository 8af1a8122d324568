//! Helpers of the durability and fault tests: a gateway whose state outlives its process, and a
//! subscriber that reads a numbered stream from its oldest record.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use hubgate_proto::v1::{self, start_position::Position, subscribe_response::Event};
use tokio_stream::StreamExt;

use crate::{Gateway, config, fields, subscribe_request};

/// A configuration whose state lives in `data` (so it outlives each gateway process), with a
/// `[store]` section of `store` lines.
pub fn durable_config(
    port: u16,
    client_id: &str,
    data: &Path,
    store: &str,
    streams: &str,
) -> String {
    config(port, client_id, streams).replace(
        "[grpc]",
        &format!("[store]\ndata_dir = {:?}\n{store}\n\n[grpc]", data),
    )
}

/// What a subscriber reading one stream from the oldest record saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// How many times each published number arrived.
    pub numbers: BTreeMap<u64, u32>,
    pub sequences: Vec<u64>,
    /// The number each sequence carried (the last one, should a sequence come twice).
    pub by_sequence: BTreeMap<u64, u64>,
    pub gaps: Vec<(u64, u64)>,
}

impl Seen {
    /// The highest sequence a record or a Gap covered; 0 before any.
    pub fn reached(&self) -> u64 {
        let records = self.sequences.iter().max().copied().unwrap_or(0);
        let gaps = self.gaps.iter().map(|g| g.1).max().unwrap_or(0);
        records.max(gaps)
    }
}

/// The token [`replay`] presents (gateways without tokens ignore it).
pub const READER_TOKEN: &str = "hg_test_reader_token";

/// Reads `stream` from the oldest record until `done` holds for what was seen, or nothing new
/// arrives for `quiet`.
pub async fn replay(
    gw: &Gateway,
    stream: &str,
    quiet: Duration,
    done: impl Fn(&Seen) -> bool,
) -> Seen {
    let mut client = gw.client().await;
    let mut request = tonic::Request::new(subscribe_request(
        &[stream],
        Position::Oldest(v1::Oldest {}),
    ));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {READER_TOKEN}").parse().expect("header"),
    );
    let mut events = client
        .subscribe(request)
        .await
        .expect("subscribe")
        .into_inner();
    let mut seen = Seen::default();
    while !done(&seen) {
        let Ok(Some(message)) = tokio::time::timeout(quiet, events.next()).await else {
            break;
        };
        match message.expect("no error").event {
            Some(Event::Record(r)) => {
                let n: u64 = fields(&r)["n"].parse().expect("n is a number");
                *seen.numbers.entry(n).or_default() += 1;
                seen.sequences.push(r.sequence);
                seen.by_sequence.insert(r.sequence, n);
            }
            Some(Event::Gap(g)) => seen.gaps.push((g.first_sequence, g.last_sequence)),
            None => {}
        }
    }
    seen
}
