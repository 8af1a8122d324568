//! Counts shared by the pipeline, the store, the exporters and the footprint meter: what each
//! stream received, dropped and kept, and the bytes the gateway sent or wrote. The same figures go
//! to the metrics; these are what `hubgate demo`, the footprint meter and tests read.

use std::sync::atomic::AtomicU64;

/// Counts of what one stream received, dropped and kept. Read by `hubgate demo` and tests; the
/// same figures go to the metrics.
#[derive(Debug, Default)]
pub struct StreamStats {
    pub messages: AtomicU64,
    pub bytes_in: AtomicU64,
    pub dropped_decode: AtomicU64,
    pub dropped_media: AtomicU64,
    pub dropped_bad_time: AtomicU64,
    pub fields_dropped: AtomicU64,
    pub identifiers_suppressed: AtomicU64,
    pub pseudonymised: AtomicU64,
    pub locations_generalised: AtomicU64,
    pub records_kept: AtomicU64,
    /// Encoded size of the records kept (protobuf), the bytes a subscriber receives per record.
    pub bytes_kept: AtomicU64,
    /// Encoded size of the field data alone in the records kept, without the envelope (stream,
    /// sequence, time, policy hash): what is left of the payload's content.
    pub field_bytes_kept: AtomicU64,
    /// Aggregated streams: readings counted in a window.
    pub readings_aggregated: AtomicU64,
    /// Aggregated streams: readings that arrived after their window closed.
    pub dropped_late: AtomicU64,
    /// Aggregated streams: readings left out for another reason (see `hubgate_privacy::window::Absorbed`).
    pub dropped_aggregate: AtomicU64,
    /// Aggregated streams: groups released as records.
    pub groups_released: AtomicU64,
    /// Aggregated streams: groups with fewer than k contributors, never released.
    pub groups_suppressed: AtomicU64,
    /// Aggregated streams: windows the privacy budget refused.
    pub windows_refused: AtomicU64,
}

/// Counts for the whole gateway.
#[derive(Debug)]
pub struct Stats {
    pub received: AtomicU64,
    pub received_bytes: AtomicU64,
    pub unrouted: AtomicU64,
    /// Per stream, in policy order.
    pub streams: Vec<StreamStats>,
}

impl Stats {
    pub fn new(streams: usize) -> Self {
        Self {
            received: AtomicU64::new(0),
            received_bytes: AtomicU64::new(0),
            unrouted: AtomicU64::new(0),
            streams: (0..streams).map(|_| StreamStats::default()).collect(),
        }
    }
}

/// Bytes the gateway sent or wrote, process-wide (as the metrics are), for the footprint's
/// snapshots; the per-stream detail is in the metrics.
#[derive(Debug)]
pub struct Traffic {
    pub grpc_sent: AtomicU64,
    pub upstream_sent: AtomicU64,
    pub nats_sent: AtomicU64,
    pub outbox_written: AtomicU64,
}

/// The process's [`Traffic`].
pub static TRAFFIC: Traffic = Traffic {
    grpc_sent: AtomicU64::new(0),
    upstream_sent: AtomicU64::new(0),
    nats_sent: AtomicU64::new(0),
    outbox_written: AtomicU64::new(0),
};
