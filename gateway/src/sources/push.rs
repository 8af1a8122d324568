//! Receiving another gateway's records (gRPC `Push`), as an upstream hub.
//!
//! The gRPC handler validates each request and hands it to the pipeline task as a [`PushJob`]: the
//! pipeline is the store's only writer, so forwarded records are staged, de-duplicated and
//! committed like the gateway's own, in the same turns and with the same durability. The answer
//! (the acknowledged origin sequence) goes back only after the commit.
//!
//! De-duplication is by (origin, incarnation, stream, origin sequence): per origin and stream, one
//! checkpoint (`push/<origin>/<stream>`) holds the highest origin sequence kept of each of the
//! origin's latest [`MAX_INCARNATIONS`] incarnations, committed atomically with the records, so a
//! batch sent again after a crash of either side is acknowledged and not kept twice, and an origin
//! that starts over with an empty store (a new incarnation) is not mistaken for one resending. An
//! incarnation older than the latest few is dead (its store is gone): its mark is let go, so a
//! caller that invents incarnations adds nothing that lasts. Marks written by earlier versions, one
//! checkpoint per incarnation (`push/<origin>/<incarnation>/<stream>`), are still read.
//!
//! A forwarded record is admitted under this gateway's policy again
//! ([`hubgate_privacy::forwarded::admit`]): fields the stream does not declare are dropped,
//! identifiers in kept values are dropped or pseudonymised, pseudonyms are pseudonymised again
//! under this hub's key, cells and times are generalised to this hub's resolution, step and
//! bucket, and the result must satisfy the stream's output invariants. Its policy hash must be
//! this hub's, or one whose canonical document the call announced ([`announced`]). A request
//! with a record that cannot be admitted is refused whole (`INVALID_ARGUMENT`, naming the record
//! and the field), counted, and nothing of it is kept.
//!
//! Metrics: `hubgate_push_records_total{stream, outcome}` (`kept`, `duplicate`, `refused`),
//! `hubgate_fields_dropped_total{stream, stage="forwarded"}`,
//! `hubgate_identifiers_suppressed_total{stream}`.

use std::collections::HashSet;

use hubgate_proto::v1;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tonic::Status;

/// Most records in one request.
pub const MAX_BATCH: usize = 4096;

/// Most policies one call may announce.
pub const MAX_ANNOUNCED: usize = 64;

/// A validated request, for the pipeline.
#[derive(Debug)]
pub struct PushJob {
    pub origin: String,
    pub incarnation: String,
    /// The stream's index in this gateway's policy.
    pub stream: usize,
    /// Records in strictly increasing origin sequence order.
    pub records: Vec<v1::Record>,
    /// The hashes of the policies the call announced, verified: with this hub's own, the policy
    /// hashes a record may carry.
    pub announced: std::sync::Arc<HashSet<String>>,
    /// The acknowledged origin sequence, once committed; or why the request was refused.
    pub reply: oneshot::Sender<Result<u64, Status>>,
}

/// Adds the hashes of the policy documents `request` announces to those the call announced
/// before (see the `policies` field of `hubgate.v1.PushRequest`): each is the SHA-256 of the
/// document as sent, so a hash can only name a document the origin holds.
pub fn announced(announced: &mut HashSet<String>, request: &v1::PushRequest) -> Result<(), Status> {
    for document in &request.policies {
        let hash: String = Sha256::digest(document.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        announced.insert(hash);
    }
    if announced.len() > MAX_ANNOUNCED {
        return Err(Status::invalid_argument(format!(
            "a call may announce at most {MAX_ANNOUNCED} policies"
        )));
    }
    Ok(())
}

/// Incarnations of one origin whose de-duplication marks are kept, per stream.
pub const MAX_INCARNATIONS: usize = 4;

/// The name of the de-duplication checkpoint of an origin's stream.
pub fn marks_name(origin: &str, stream: &str) -> String {
    format!("push/{origin}/{stream}")
}

/// The name an earlier version gave the mark of one incarnation's stream (read, never written).
pub fn legacy_mark_name(origin: &str, incarnation: &str, stream: &str) -> String {
    format!("push/{origin}/{incarnation}/{stream}")
}

/// The highest origin sequence kept of each of an origin's latest incarnations, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Marks(Vec<(String, u64)>);

impl Marks {
    /// From a checkpoint's bytes; damaged bytes are no marks (the store checks its integrity).
    pub fn decode(bytes: &[u8]) -> Self {
        serde_json::from_slice(bytes).unwrap_or_default()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn get(&self, incarnation: &str) -> Option<u64> {
        self.0
            .iter()
            .find(|(i, _)| i == incarnation)
            .map(|&(_, seq)| seq)
    }

    /// Records `sequence` for `incarnation`, now the newest; the oldest beyond
    /// [`MAX_INCARNATIONS`] is let go.
    pub fn set(&mut self, incarnation: &str, sequence: u64) {
        self.0.retain(|(i, _)| i != incarnation);
        self.0.insert(0, (incarnation.to_owned(), sequence));
        self.0.truncate(MAX_INCARNATIONS);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Whether `incarnation` is usable: 1 to 64 ASCII letters and digits.
pub fn valid_incarnation(incarnation: &str) -> bool {
    (1..=64).contains(&incarnation.len()) && incarnation.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Checks a request against the policy; returns the stream's index.
pub fn validate(
    policy: &hubgate_privacy::Policy,
    request: &v1::PushRequest,
) -> Result<usize, Status> {
    if !crate::config::valid_origin(&request.origin) {
        return Err(Status::invalid_argument(
            "origin must be 1 to 64 letters, digits, '.', '_' or '-'",
        ));
    }
    if !valid_incarnation(&request.incarnation) {
        return Err(Status::invalid_argument(
            "incarnation must be 1 to 64 letters and digits",
        ));
    }
    let Some(index) = policy
        .streams()
        .iter()
        .position(|s| s.name == request.stream)
    else {
        return Err(Status::not_found("no such stream"));
    };
    if policy.streams()[index].aggregate.is_some() {
        return Err(Status::failed_precondition(
            "the stream is aggregated here: forwarded records cannot join its windows",
        ));
    }
    if request.records.len() > MAX_BATCH {
        return Err(Status::invalid_argument("too many records in one request"));
    }
    let ordered = request
        .records
        .windows(2)
        .all(|w| w[0].sequence < w[1].sequence);
    if !ordered || request.records.first().is_some_and(|r| r.sequence == 0) {
        return Err(Status::invalid_argument(
            "records must have increasing sequences from 1 on",
        ));
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn record(sequence: u64) -> v1::Record {
        v1::Record {
            sequence,
            ..v1::Record::default()
        }
    }

    fn request(origin: &str, stream: &str, sequences: &[u64]) -> v1::PushRequest {
        v1::PushRequest {
            origin: origin.into(),
            stream: stream.into(),
            records: sequences.iter().copied().map(record).collect(),
            incarnation: "0f3a".into(),
            policies: Vec::new(),
        }
    }

    #[test]
    fn requests_are_checked_against_the_policy() {
        let (config, _) = crate::config::parse(crate::config::DEFAULT_CONFIG).unwrap();
        let policy = config.policy;
        let air = policy
            .streams()
            .iter()
            .position(|s| s.name == "air_quality")
            .unwrap();
        assert_eq!(
            validate(&policy, &request("district-1", "air_quality", &[3, 4, 9])).unwrap(),
            air
        );
        let code = |r: v1::PushRequest| validate(&policy, &r).unwrap_err().code();
        assert_eq!(
            code(request("", "air_quality", &[1])),
            Code::InvalidArgument
        );
        assert_eq!(
            code(request("district 1", "air_quality", &[1])),
            Code::InvalidArgument
        );
        assert_eq!(code(request("d1", "weather", &[1])), Code::NotFound);
        let mut no_incarnation = request("d1", "air_quality", &[1]);
        no_incarnation.incarnation.clear();
        assert_eq!(code(no_incarnation), Code::InvalidArgument);
        assert_eq!(
            code(request("d1", "footfall", &[1])),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(request("d1", "air_quality", &[2, 2])),
            Code::InvalidArgument
        );
        assert_eq!(
            code(request("d1", "air_quality", &[0, 1])),
            Code::InvalidArgument
        );
        let too_many: Vec<u64> = (1..=MAX_BATCH as u64 + 1).collect();
        assert_eq!(
            code(request("d1", "air_quality", &too_many)),
            Code::InvalidArgument
        );
    }

    #[test]
    fn marks_keep_the_latest_incarnations_only() {
        let mut marks = Marks::default();
        for (i, incarnation) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            marks.set(incarnation, i as u64 + 1);
        }
        assert_eq!(marks.len(), MAX_INCARNATIONS);
        assert_eq!(marks.get("a"), None);
        assert_eq!(marks.get("e"), Some(5));
        // Pushing again under an older incarnation makes it the newest.
        marks.set("b", 9);
        marks.set("f", 1);
        assert_eq!(marks.get("b"), Some(9));
        assert_eq!(marks.get("c"), None);
        assert_eq!(Marks::decode(&marks.encode()), marks);
        assert!(Marks::decode(b"damaged").is_empty());
    }

    #[test]
    fn announced_policies_are_known_by_their_sha256() {
        let mut known = HashSet::new();
        let mut r = request("d1", "air_quality", &[1]);
        r.policies = vec!["{\"language_version\":1}".into()];
        announced(&mut known, &r).unwrap();
        let hash: String = Sha256::digest(b"{\"language_version\":1}")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(known.contains(&hash) && known.len() == 1);
        r.policies = (0..MAX_ANNOUNCED).map(|i| i.to_string()).collect();
        assert_eq!(
            announced(&mut known, &r).unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}
