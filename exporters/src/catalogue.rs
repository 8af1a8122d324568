//! The names of every metric hubgate emits, with their descriptions.

use metrics::{Unit, describe_counter, describe_gauge};

/// MQTT messages received, before routing.
pub const MQTT_MESSAGES_RECEIVED: &str = "hubgate_mqtt_messages_received_total";
/// Payload bytes of MQTT messages received.
pub const MQTT_RECEIVED_BYTES: &str = "hubgate_mqtt_received_bytes_total";
/// QoS 1 messages acknowledged to the broker, each after the commit that made its effect
/// durable. Where every message is QoS 1, received less acknowledged is what waits for a commit.
pub const MQTT_ACKNOWLEDGED: &str = "hubgate_mqtt_messages_acknowledged_total";
/// QoS 1 messages received on the current connection and not yet acknowledged: in the pipeline,
/// waiting for their commit, or for their ack to be written. It stays high while commits fail
/// (a full outbox with `on_full = "stop_acking"`, a failing disk); 0 after a connection loss,
/// when the broker takes them back to deliver again. For a while after a reconnect it can read
/// low, by the acks of messages the pipeline held across it (never below 0).
pub const MQTT_AWAITING_ACK: &str = "hubgate_mqtt_messages_awaiting_ack";
/// 1 while the MQTT connection is up, 0 otherwise.
pub const MQTT_CONNECTED: &str = "hubgate_mqtt_connected";
/// MQTT connection failures and losses (each followed by a reconnect with backoff).
pub const MQTT_CONNECTION_ERRORS: &str = "hubgate_mqtt_connection_errors_total";
/// MQTT messages larger than `mqtt.max_packet_bytes`, dropped on arrival (acknowledged, never
/// decoded).
pub const MQTT_OVERSIZED: &str = "hubgate_mqtt_messages_oversized_total";
/// MQTT messages over their topic's or device's rate limit, dropped before any stream sees them.
/// Label: `by` (`topic`, `device`).
pub const MQTT_RATE_LIMITED: &str = "hubgate_mqtt_messages_rate_limited_total";
/// Messages whose topic no stream declares; dropped.
pub const UNROUTED_MESSAGES: &str = "hubgate_unrouted_messages_total";
/// Messages routed to a stream. Label: `stream`.
pub const STREAM_MESSAGES: &str = "hubgate_stream_messages_total";
/// Messages dropped whole. Labels: `stream`, `reason` (`decode`, `media`, `bad_time`).
pub const MESSAGES_DROPPED: &str = "hubgate_messages_dropped_total";
/// Fields removed by a privacy stage. Labels: `stream`, `stage` (`allow_list`).
pub const FIELDS_DROPPED: &str = "hubgate_fields_dropped_total";
/// String values in which a direct identifier was found (dropped or pseudonymised). Label: `stream`.
pub const IDENTIFIERS_SUPPRESSED: &str = "hubgate_identifiers_suppressed_total";
/// Values replaced by a keyed pseudonym. Label: `stream`.
pub const FIELDS_PSEUDONYMISED: &str = "hubgate_fields_pseudonymised_total";
/// Locations generalised to an H3 cell. Labels: `stream`, `outcome` (`cell`, `invalid`).
pub const LOCATIONS_GENERALISED: &str = "hubgate_locations_generalised_total";
/// New pseudonymisation keys made (one per stream and key epoch). Label: `stream`.
pub const KEY_ROTATIONS: &str = "hubgate_key_rotations_total";
/// Pseudonymisation keys destroyed at the end of their epoch. Label: `stream`.
pub const KEYS_DESTROYED: &str = "hubgate_keys_destroyed_total";
/// Filtered records kept in the store, counted as each is staged for the next commit (a record
/// is durable, and readable, once its commit is done). Label: `stream`.
pub const RECORDS_KEPT: &str = "hubgate_records_kept_total";
/// Records removed from the store. Labels: `stream`, `reason` (`retention`, `capacity`).
pub const RECORDS_PURGED: &str = "hubgate_store_records_purged_total";
/// Records lost to a damaged outbox batch (checksum mismatch), found on read. Label: `stream`.
pub const OUTBOX_RECORDS_DAMAGED: &str = "hubgate_outbox_records_damaged_total";
/// Outbox data keys destroyed once every record they sealed was purged. Label: `stream`.
pub const OUTBOX_KEYS_DESTROYED: &str = "hubgate_outbox_keys_destroyed_total";
/// Bytes of records held in the outbox, over all streams.
pub const OUTBOX_BYTES: &str = "hubgate_outbox_bytes";
/// Outbox commits that failed (disk error, or full with `on_full = "stop_acking"`); the turn is
/// retried and its messages are not acknowledged meanwhile. Label: `reason` (`error`, `full`).
pub const OUTBOX_COMMIT_FAILURES: &str = "hubgate_outbox_commit_failures_total";
/// Records other gateways forwarded (gRPC Push). Labels: `stream`, `outcome` (`kept`,
/// `duplicate`).
pub const PUSH_RECORDS: &str = "hubgate_push_records_total";
/// Push calls open to the upstream hub (one per forwarded stream).
pub const UPSTREAM_CONNECTED: &str = "hubgate_upstream_connected";
/// Failed connections and broken Push calls to the upstream hub.
pub const UPSTREAM_ERRORS: &str = "hubgate_upstream_errors_total";
/// Records sent to the upstream hub, resends included. Label: `stream`.
pub const UPSTREAM_RECORDS_SENT: &str = "hubgate_upstream_records_sent_total";
/// Records the upstream hub acknowledged. Label: `stream`.
pub const UPSTREAM_RECORDS_ACKED: &str = "hubgate_upstream_records_acked_total";
/// Records purged here before they could be sent upstream. Label: `stream`.
pub const UPSTREAM_RECORDS_LOST: &str = "hubgate_upstream_records_lost_total";
/// Records kept and not yet acknowledged by the upstream hub. Label: `stream`.
pub const UPSTREAM_LAG: &str = "hubgate_upstream_lag_records";
/// Sparkplug B messages whose sequence number did not follow the edge node's previous one.
pub const SPARKPLUG_SEQUENCE_GAPS: &str = "hubgate_sparkplug_sequence_gaps_total";
/// Sparkplug B metrics named by an alias no birth certificate seen declared (dropped).
pub const SPARKPLUG_UNKNOWN_ALIASES: &str = "hubgate_sparkplug_unknown_aliases_total";
/// 1 while the NATS JetStream exporter is connected, 0 otherwise.
pub const NATS_CONNECTED: &str = "hubgate_nats_connected";
/// Failed publishes and unavailable JetStream, by attempt.
pub const NATS_ERRORS: &str = "hubgate_nats_errors_total";
/// Records published to NATS JetStream, publishes again included. Label: `stream`.
pub const NATS_RECORDS_PUBLISHED: &str = "hubgate_nats_records_published_total";
/// Records JetStream acknowledged as stored. Label: `stream`.
pub const NATS_RECORDS_ACKED: &str = "hubgate_nats_records_acked_total";
/// Records JetStream acknowledged as duplicates of ones it already held. Label: `stream`.
pub const NATS_RECORDS_DUPLICATE: &str = "hubgate_nats_records_duplicate_total";
/// Records purged here before they could be published to NATS. Label: `stream`.
pub const NATS_RECORDS_LOST: &str = "hubgate_nats_records_lost_total";
/// Records kept and not yet acknowledged by JetStream. Label: `stream`.
pub const NATS_LAG: &str = "hubgate_nats_lag_records";
/// Bytes of records published to NATS JetStream (message payloads). Label: `stream`.
pub const NATS_SENT_BYTES: &str = "hubgate_nats_sent_bytes_total";
/// Energy attributed to the gateway process (floating point; see [`crate::energy`]).
pub const ENERGY_JOULES: &str = "hubgate_energy_joules_total";
/// Always 1; labels `method` (`rapl`, `hwmon` or `model`), `zones` (the counters read) or the
/// model's coefficients (`idle_watts_per_vcpu`, `max_watts_per_vcpu`, `memory_watts_per_gb`,
/// `vcpus`).
pub const FOOTPRINT_INFO: &str = "hubgate_footprint_info";
/// Bytes of records sent to gRPC subscribers (encoded). Label: `stream`.
pub const GRPC_SENT_BYTES: &str = "hubgate_grpc_sent_bytes_total";
/// Bytes of Push requests sent to the upstream hub (encoded). Label: `stream`.
pub const UPSTREAM_SENT_BYTES: &str = "hubgate_upstream_sent_bytes_total";
/// Bytes of record batches written to the outbox (sealed, with headers).
pub const OUTBOX_WRITTEN_BYTES: &str = "hubgate_outbox_written_bytes_total";
/// Durable commits of the outbox (each one fsync): with `store.commit_interval`, at most one per
/// interval.
pub const OUTBOX_COMMITS: &str = "hubgate_outbox_commits_total";
/// Writes of the redb outbox's write-ahead log into the database (a fold of half the log on the
/// outbox's own thread, or a commit or purge writing through). Label: `outcome` (`written`,
/// `failed`: retried with the next commit).
pub const OUTBOX_LOG_FOLDS: &str = "hubgate_outbox_log_folds_total";
/// Bytes committed through the redb outbox's write-ahead log and not yet folded into the
/// database (held in memory until then): at most about the log's size, 8 MiB. A value that stays
/// high while folds fail means the database cannot be written.
pub const OUTBOX_LOG_WAITING_BYTES: &str = "hubgate_outbox_log_waiting_bytes";
/// Bytes the policy kept from leaving: MQTT payload bytes received minus the encoded field content
/// of the records kept (their envelope is counted in the bytes sent, not here).
pub const BYTES_AVOIDED: &str = "hubgate_bytes_avoided_total";
/// Attributional network energy of the bytes avoided (kWh per GB configured), floating point;
/// reported apart from SCI, which it never lowers.
pub const NETWORK_ENERGY_AVOIDED_JOULES: &str = "hubgate_network_energy_avoided_joules_total";
/// Operational emissions of the gateway (energy × grid intensity), floating point.
pub const CARBON_OPERATIONAL_GRAMS: &str = "hubgate_carbon_operational_grams_total";
/// Embodied emissions of the hardware attributed to the gateway's running, floating point.
pub const CARBON_EMBODIED_GRAMS: &str = "hubgate_carbon_embodied_grams_total";
/// Software Carbon Intensity since the start: gCO2e per 1,000 readings kept.
pub const SCI: &str = "hubgate_sci_grams_per_1000_readings";
/// The grid carbon intensity used at the latest sample, gCO2e per kWh (absent until one is known).
pub const GRID_INTENSITY: &str = "hubgate_grid_intensity_grams_per_kwh";
/// Seconds for which no grid intensity was known (no operational carbon counted for them);
/// floating point.
pub const INTENSITY_MISSING_SECONDS: &str = "hubgate_grid_intensity_missing_seconds_total";
/// Always 1; labels name the carbon figures' inputs (`grid_intensity_g_per_kwh`,
/// `grid_intensity_file`, `grid_zone`, `embodied_kg`, `lifetime_years`, `hardware_share`).
pub const CARBON_INFO: &str = "hubgate_carbon_info";
/// Audit log entries that could not be written.
pub const AUDIT_WRITE_ERRORS: &str = "hubgate_audit_write_errors_total";
/// Reconnects at which the broker had no session for the gateway although it had one before:
/// what the broker held for the gateway (QoS 1 messages not yet delivered) may be lost.
pub const MQTT_SESSIONS_LOST: &str = "hubgate_mqtt_sessions_lost_total";
/// Outbox log entries found torn or damaged at start (not replayed; the store's sequence marks
/// tell what that loses).
pub const OUTBOX_LOG_DAMAGED: &str = "hubgate_outbox_log_entries_damaged_total";
/// Times the outbox's redb was closed and opened again after an I/O error (a full disk).
pub const OUTBOX_REOPENS: &str = "hubgate_outbox_reopens_total";
/// 1 while outbox commits are failing (a full disk, an I/O error), else 0.
pub const OUTBOX_FAILING: &str = "hubgate_outbox_failing";
/// Starts at which the audit log did not hold the entry its anchor names (cut or rewritten).
pub const AUDIT_ANCHOR_MISMATCHES: &str = "hubgate_audit_anchor_mismatches_total";
/// Sequence of the audit log's last entry (its head, also anchored in the outbox).
pub const AUDIT_HEAD_SEQ: &str = "hubgate_audit_head_seq";
/// gRPC calls refused for want of a valid token, of scope, or of room. Label: `reason`
/// (`missing`, `unknown`, `scope`, `capacity`, `token`, `streams`).
pub const GRPC_REFUSED: &str = "hubgate_grpc_refused_total";
/// Records sent to gRPC subscribers. Label: `stream`.
pub const GRPC_RECORDS_SENT: &str = "hubgate_grpc_records_sent_total";
/// gRPC Subscribe and WatchFootprint calls open now.
pub const GRPC_SUBSCRIBERS: &str = "hubgate_grpc_subscribers";
/// gRPC Push calls (from origin gateways) open now.
pub const GRPC_PUSH_CALLS: &str = "hubgate_grpc_push_calls";
/// Groups of closed windows released as records. Labels: `stream`, `outcome` (`released`).
/// Nothing about what an aggregated stream takes in is published (readings, suppressed groups,
/// windows): a single reading of a suppressed group would move it.
pub const AGGREGATE_GROUPS: &str = "hubgate_aggregate_groups_total";
/// Window releases refused by the privacy-budget ledger. Label: `stream`.
pub const PRIVACY_BUDGET_REFUSALS: &str = "hubgate_privacy_budget_refusals_total";
/// Epsilon spent on the current UTC day. Label: `stream`.
pub const PRIVACY_BUDGET_SPENT_TODAY: &str = "hubgate_privacy_budget_spent_today_epsilon";
/// Always 1; label `policy_hash` names the running policy.
pub const POLICY_INFO: &str = "hubgate_policy_info";
/// Always 1; label `version` names the build.
pub const BUILD_INFO: &str = "hubgate_build_info";

/// Registers the description and unit of every metric with the installed recorder.
pub fn describe() {
    describe_counter!(
        MQTT_MESSAGES_RECEIVED,
        "MQTT messages received, before routing"
    );
    describe_counter!(
        MQTT_RECEIVED_BYTES,
        Unit::Bytes,
        "payload bytes of MQTT messages received"
    );
    describe_counter!(
        MQTT_ACKNOWLEDGED,
        "QoS 1 MQTT messages acknowledged to the broker, each after the commit that made it durable"
    );
    describe_gauge!(
        MQTT_AWAITING_ACK,
        "QoS 1 MQTT messages received on the current connection and not yet acknowledged"
    );
    describe_gauge!(MQTT_CONNECTED, "1 while the MQTT connection is up");
    describe_counter!(
        MQTT_RATE_LIMITED,
        "MQTT messages over their topic's (by=topic) or device's (by=device) rate limit, dropped before any stream sees them"
    );
    describe_counter!(
        MQTT_OVERSIZED,
        "MQTT messages larger than mqtt.max_packet_bytes, dropped on arrival"
    );
    describe_counter!(
        MQTT_CONNECTION_ERRORS,
        "MQTT connection failures and losses"
    );
    describe_counter!(
        UNROUTED_MESSAGES,
        "messages whose topic no stream declares (dropped)"
    );
    describe_counter!(STREAM_MESSAGES, "messages routed to each stream");
    describe_counter!(
        MESSAGES_DROPPED,
        "messages dropped whole, by stream and reason"
    );
    describe_counter!(
        FIELDS_DROPPED,
        "fields removed by a privacy stage, by stream and stage"
    );
    describe_counter!(
        IDENTIFIERS_SUPPRESSED,
        "string values holding a direct identifier, dropped or pseudonymised"
    );
    describe_counter!(FIELDS_PSEUDONYMISED, "values replaced by a keyed pseudonym");
    describe_counter!(
        AGGREGATE_GROUPS,
        "groups of closed windows released as records"
    );
    describe_counter!(
        PRIVACY_BUDGET_REFUSALS,
        "window releases refused by the privacy-budget ledger"
    );
    describe_gauge!(
        PRIVACY_BUDGET_SPENT_TODAY,
        "differential-privacy epsilon spent on the current UTC day"
    );
    describe_counter!(
        LOCATIONS_GENERALISED,
        "locations generalised to an H3 cell, by outcome"
    );
    describe_counter!(
        KEY_ROTATIONS,
        "new pseudonymisation keys (one per stream and epoch)"
    );
    describe_counter!(
        KEYS_DESTROYED,
        "pseudonymisation keys destroyed at the end of their epoch"
    );
    describe_counter!(
        RECORDS_KEPT,
        "filtered records kept in the store, counted when staged for the next commit"
    );
    describe_counter!(
        RECORDS_PURGED,
        "records removed from the store, by stream and reason"
    );
    describe_counter!(
        OUTBOX_RECORDS_DAMAGED,
        "records lost to a damaged outbox batch, found on read"
    );
    describe_counter!(
        OUTBOX_KEYS_DESTROYED,
        "outbox data keys destroyed after the records they sealed were purged"
    );
    describe_gauge!(
        OUTBOX_BYTES,
        Unit::Bytes,
        "bytes of records held in the outbox"
    );
    describe_counter!(
        OUTBOX_COMMIT_FAILURES,
        "outbox commits that failed and are retried, by reason"
    );
    describe_counter!(
        PUSH_RECORDS,
        "records other gateways forwarded, kept or duplicate"
    );
    describe_gauge!(
        UPSTREAM_CONNECTED,
        "Push calls open to the upstream hub, one per forwarded stream"
    );
    describe_counter!(
        UPSTREAM_ERRORS,
        "failed connections and broken Push calls to the upstream hub"
    );
    describe_counter!(
        UPSTREAM_RECORDS_SENT,
        "records sent to the upstream hub, resends included"
    );
    describe_counter!(
        UPSTREAM_RECORDS_ACKED,
        "records the upstream hub acknowledged"
    );
    describe_counter!(
        UPSTREAM_RECORDS_LOST,
        "records purged before they could be sent upstream"
    );
    describe_gauge!(
        UPSTREAM_LAG,
        "records kept and not yet acknowledged by the upstream hub"
    );
    describe_counter!(
        SPARKPLUG_SEQUENCE_GAPS,
        "Sparkplug B messages whose sequence number did not follow the previous one"
    );
    describe_counter!(
        SPARKPLUG_UNKNOWN_ALIASES,
        "Sparkplug B metrics named by an alias no birth declared, dropped"
    );
    describe_gauge!(
        NATS_CONNECTED,
        "1 while the NATS JetStream exporter is connected"
    );
    describe_counter!(
        NATS_ERRORS,
        "failed publishes to NATS JetStream, and attempts to reach it"
    );
    describe_counter!(
        NATS_RECORDS_PUBLISHED,
        "records published to NATS JetStream, publishes again included"
    );
    describe_counter!(
        NATS_RECORDS_ACKED,
        "records NATS JetStream acknowledged as stored"
    );
    describe_counter!(
        NATS_RECORDS_DUPLICATE,
        "records NATS JetStream acknowledged as duplicates"
    );
    describe_counter!(
        NATS_RECORDS_LOST,
        "records purged before they could be published to NATS"
    );
    describe_gauge!(
        NATS_LAG,
        "records kept and not yet acknowledged by NATS JetStream"
    );
    describe_counter!(
        NATS_SENT_BYTES,
        Unit::Bytes,
        "bytes of records published to NATS JetStream"
    );
    describe_counter!(
        GRPC_SENT_BYTES,
        Unit::Bytes,
        "bytes of records sent to gRPC subscribers"
    );
    describe_counter!(
        UPSTREAM_SENT_BYTES,
        Unit::Bytes,
        "bytes of Push requests sent to the upstream hub"
    );
    describe_counter!(
        OUTBOX_WRITTEN_BYTES,
        Unit::Bytes,
        "bytes of record batches written to the outbox"
    );
    describe_counter!(OUTBOX_COMMITS, "durable commits of the outbox");
    describe_counter!(
        OUTBOX_LOG_FOLDS,
        "writes of the outbox's write-ahead log into its database, by outcome"
    );
    describe_gauge!(
        OUTBOX_LOG_WAITING_BYTES,
        Unit::Bytes,
        "bytes committed through the outbox's write-ahead log, not yet folded into its database"
    );
    describe_counter!(
        BYTES_AVOIDED,
        Unit::Bytes,
        "payload bytes received minus the field content kept: what minimisation kept from leaving"
    );
    describe_gauge!(
        SCI,
        "software carbon intensity since the start, gCO2e per 1,000 readings kept"
    );
    describe_gauge!(CARBON_INFO, "the inputs of the carbon figures");
    describe_gauge!(
        GRID_INTENSITY,
        "grid carbon intensity used at the latest sample, gCO2e per kWh"
    );
    describe_gauge!(
        FOOTPRINT_INFO,
        "how the energy figures are obtained: method and coefficients"
    );
    describe_counter!(
        GRPC_REFUSED,
        "gRPC calls refused: no token, an unknown token, out of the token's scope, no room (capacity), the token's own limit of open calls (token), or too many streams in one subscription"
    );
    describe_counter!(
        AUDIT_WRITE_ERRORS,
        "audit log entries that could not be written"
    );
    describe_counter!(
        OUTBOX_LOG_DAMAGED,
        "outbox log entries found torn or damaged at start, and not replayed"
    );
    describe_counter!(
        OUTBOX_REOPENS,
        "times the outbox's redb was closed and opened again after an I/O error (a full disk)"
    );
    describe_gauge!(
        OUTBOX_FAILING,
        "1 while outbox commits are failing (a full disk, an I/O error): messages stay unacknowledged"
    );
    describe_counter!(
        MQTT_SESSIONS_LOST,
        "reconnects at which the broker had lost the gateway's session (messages it held may be lost)"
    );
    describe_counter!(
        AUDIT_ANCHOR_MISMATCHES,
        "starts at which the audit log did not hold the entry its anchor names (cut or rewritten)"
    );
    describe_gauge!(
        AUDIT_HEAD_SEQ,
        "sequence of the audit log's last entry (its head, anchored in the outbox)"
    );
    describe_counter!(GRPC_RECORDS_SENT, "records sent to gRPC subscribers");
    describe_gauge!(
        GRPC_SUBSCRIBERS,
        "gRPC Subscribe and WatchFootprint calls open now"
    );
    describe_gauge!(
        GRPC_PUSH_CALLS,
        "gRPC Push calls (from origin gateways) open now"
    );
    describe_gauge!(POLICY_INFO, "the running policy, by content hash");
    describe_gauge!(BUILD_INFO, "the running build, by version");
}
