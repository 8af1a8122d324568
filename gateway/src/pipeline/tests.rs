use std::time::Duration;

use hubgate_proto::v1;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::push::MAX_CACHED_PUSH_MARKS;
use super::windows::{CHANGES_MAGIC, CHECKPOINT_MAGIC, Checkpoint, changes_name, checkpoint_name};
use super::*;
use crate::outbox::SledOutbox;
use crate::sources::mqtt::Acker;
use crate::sources::push::PushJob;
use crate::telemetry::clock::now_ms;
use hubgate_privacy::window::{Absorbed, WindowState};
use hubgate_privacy::{Record, Value};
use rumqttc::Publish;

#[test]
fn window_checkpoints_are_binary_and_those_written_as_json_still_resume() {
    let (policy, _) = hubgate_privacy::policy::from_toml(
        r#"
[[stream]]
name = "counts"
topics = ["c/+"]
purpose = "test"
legal_basis = "public task"
principles = ["community_participation"]
retention = "1d"

[stream.fields]
zone = "keep"
device = "keep"

[stream.aggregate]
window = "1m"
group_by = ["zone"]
contributor = "device"
min_group_size = 2

[stream.aggregate.measures]
readings = "count"
"#,
    )
    .unwrap();
    let spec = policy.streams()[0].aggregate.as_ref().unwrap();
    let mut state = WindowState::default();
    for i in 0..10 {
        let record = Record {
            event_time_ms: 60_000,
            fields: vec![
                (
                    "zone".into(),
                    Value::Str(compact_str::format_compact!("z{}", i % 3)),
                ),
                ("device".into(), Value::Int(i)),
            ],
        };
        assert_eq!(state.absorb(spec, &record, 60_000), Absorbed::Counted);
    }
    let binary = Checkpoint::encode(7, 1, &state);
    assert!(binary.starts_with(CHECKPOINT_MAGIC));
    let read = Checkpoint::decode(&binary).unwrap();
    assert_eq!((read.spec, &read.state), (7, &state));
    let json = serde_json::to_vec(&serde_json::json!({ "spec": 7, "state": state })).unwrap();
    assert!(json.len() > binary.len());
    let read = Checkpoint::decode(&json).unwrap();
    assert_eq!((read.spec, &read.state), (7, &state));
    for damaged in [
        &binary[..binary.len() - 1],
        &binary[..6],
        &json[..json.len() - 1],
    ] {
        assert!(Checkpoint::decode(damaged).is_err());
    }
}

const POLICY: &str = r#"
[[stream]]
name = "s"
topics = ["city/s/+"]
purpose = "test"
legal_basis = "public task"
principles = ["sustainability_resilience"]
retention = "1d"

[stream.fields]
v = "keep"
"#;

/// The hash of a policy an origin announced.
const ANNOUNCED: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

fn push(origin: &str, sequence: u64) -> PushJob {
    let record = v1::Record {
        sequence,
        policy_hash: ANNOUNCED.to_owned(),
        event_time: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        fields: [(
            "v".to_owned(),
            v1::Value {
                kind: Some(v1::value::Kind::IntValue(1)),
            },
        )]
        .into(),
        ..v1::Record::default()
    };
    PushJob {
        origin: origin.to_owned(),
        incarnation: "a".to_owned(),
        stream: 0,
        records: vec![record],
        announced: Arc::new([ANNOUNCED.to_owned()].into()),
        reply: tokio::sync::oneshot::channel().0,
    }
}

/// Commits are spaced by 1 ms per 20,000 messages a second, within the interval and the
/// maximum, and never closer than the interval, even when the maximum is less.
#[test]
fn commits_are_spaced_by_the_rate_of_messages_within_the_interval_and_the_maximum() {
    let ms = Duration::from_millis;
    let spacing = Spacing {
        interval: ms(1),
        max: ms(5),
    };
    assert_eq!(spacing.at(0.0), ms(1));
    assert_eq!(spacing.at(10_000.0), ms(1));
    assert_eq!(spacing.at(50_000.0), Duration::from_micros(2_500));
    assert_eq!(spacing.at(100_000.0), ms(5));
    assert_eq!(spacing.at(1e9), ms(5));
    let spacing = Spacing {
        interval: ms(10),
        max: ms(5),
    };
    assert_eq!(spacing.at(1e9), ms(10));
    let spacing = Spacing {
        interval: Duration::ZERO,
        max: Duration::ZERO,
    };
    assert_eq!(spacing.at(1e9), Duration::ZERO);
}

/// The values of field `v` of stream 0's records, in sequence order.
fn values(store: &Store) -> Vec<i64> {
    store
        .read(0, 1, 1_000, now_ms())
        .records
        .iter()
        .filter_map(|r| match r.record().ok()?.fields.get("v")?.kind {
            Some(v1::value::Kind::IntValue(v)) => Some(v),
            _ => None,
        })
        .collect()
}

/// `run` acknowledges QoS 1 messages in the order they came, each only once its record is
/// committed (readable), the last of a burst that nothing follows included; QoS 0 messages
/// are committed and never acknowledged. A stop commits what was taken, and the commit
/// thread lets go of the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_acknowledges_in_order_once_committed_and_commits_what_it_took_before_a_stop() {
    let dir = tempfile::tempdir().unwrap();
    let (pipeline, store) = pipeline_for(POLICY, dir.path());
    let (queue_tx, queue_rx) = mpsc::channel(64);
    let (_push_tx, push_rx) = mpsc::channel(1);
    let acks = crate::sources::mqtt::AckQueue::default();
    let (acker, woke) = Acker::noting(acks.clone());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(
        pipeline,
        queue_rx,
        push_rx,
        acker,
        Spacing {
            interval: Duration::from_millis(20),
            max: Duration::from_millis(20),
        },
        shutdown.clone(),
    ));
    let message = |v: u16| {
        // Every third message is QoS 0.
        let qos = if v.is_multiple_of(3) {
            rumqttc::QoS::AtMostOnce
        } else {
            rumqttc::QoS::AtLeastOnce
        };
        let payload = format!(r#"{{"v":{v}}}"#);
        let mut publish = Publish::new("city/s/x", qos, payload.clone());
        publish.pkid = v;
        Inbound {
            bytes: payload.len(),
            publish,
            oversized: false,
        }
    };
    let mut acked: Vec<u16> = Vec::new();
    let wait_for_acks = async |acked: &mut Vec<u16>, want: &[u16]| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while acked.as_slice() != want {
            let written = acks.written(&woke);
            // Nothing is acknowledged before its record is readable.
            let readable = values(&store);
            for pkid in &written {
                assert!(
                    readable.contains(&i64::from(*pkid)),
                    "{pkid} acknowledged before it was committed"
                );
            }
            acked.extend(written);
            assert!(
                want.starts_with(acked),
                "acknowledged {acked:?}, expected {want:?}"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "acknowledged {acked:?}, expected {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    // A burst in several sends, closer together than the commit interval: more than one turn.
    for v in 1..=12 {
        queue_tx.send(message(v)).await.unwrap();
        if v % 4 == 0 {
            tokio::time::sleep(Duration::from_millis(7)).await;
        }
    }
    let qos1: Vec<u16> = (1..=12u16).filter(|v| !v.is_multiple_of(3)).collect();
    wait_for_acks(&mut acked, &qos1).await;
    assert_eq!(values(&store), (1..=12).collect::<Vec<i64>>());
    // One message after a quiet spell, which nothing follows.
    tokio::time::sleep(Duration::from_millis(50)).await;
    queue_tx.send(message(13)).await.unwrap();
    let mut want = qos1.clone();
    want.push(13);
    wait_for_acks(&mut acked, &want).await;
    // Two more, right before a stop. What the pipeline took by then is committed and
    // acknowledged; what it did not take stays unacknowledged, for the broker to deliver
    // again.
    queue_tx.send(message(14)).await.unwrap();
    queue_tx.send(message(16)).await.unwrap();
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let committed = values(&store);
    assert!(
        matches!(committed[12..], [13] | [13, 14] | [13, 14, 16]),
        "{committed:?}"
    );
    want.extend(
        [14, 16]
            .into_iter()
            .filter(|v| committed.contains(&i64::from(*v))),
    );
    wait_for_acks(&mut acked, &want).await;
    assert_eq!(
        Arc::strong_count(&store),
        1,
        "the commit thread holds the store"
    );
}

const AGGREGATED: &str = r#"
[[stream]]
name = "counts"
topics = ["city/footfall/+/probe"]
purpose = "test"
legal_basis = "public task"
principles = ["community_participation"]
retention = "1d"

[stream.fields]
counter_id = "keep"
mac = "pseudonymise"

[stream.aggregate]
window = "1h"
group_by = ["counter_id"]
contributor = "mac"
min_group_size = 1

[stream.aggregate.measures]
readings = "count"
"#;

fn pipeline_for(policy: &str, dir: &std::path::Path) -> (Pipeline, Arc<Store>) {
    let (policy, _) = hubgate_privacy::policy::from_toml(policy).unwrap();
    let policy = Arc::new(policy);
    let audit = Arc::new(AuditLog::open(&dir.join("audit.jsonl")).unwrap());
    let outbox = Arc::new(SledOutbox::open(&dir.join("outbox")).unwrap());
    let streams: Vec<(&str, Duration)> = policy
        .streams()
        .iter()
        .map(|s| (s.name.as_str(), s.retention))
        .collect();
    let store = Arc::new(
        Store::open_holding(
            outbox,
            streams,
            &held_streams(&policy),
            &crate::config::StoreConfig::default(),
            Arc::clone(&audit),
        )
        .unwrap(),
    );
    let stats = Arc::new(Stats::new(policy.streams().len()));
    let pipeline =
        Pipeline::new(Arc::clone(&policy), Arc::clone(&store), stats, None, audit).unwrap();
    (pipeline, store)
}

fn probe(qos: rumqttc::QoS, mac: &str) -> Inbound {
    let payload = format!(r#"{{"counter_id":"pc-1","mac":"{mac}"}}"#);
    Inbound {
        bytes: payload.len(),
        publish: Publish::new("city/footfall/pc-1/probe", qos, payload),
        oversized: false,
    }
}

const SENML: &str = r#"
[[stream]]
name = "climate"
topics = ["city/climate/+"]
format = "senml_cbor"
purpose = "test"
legal_basis = "public task"
principles = ["sustainability_resilience"]
retention = "1d"
time_field = "t"

[stream.fields]
bn = "pseudonymise"
"temperature.v" = "keep"
"#;

/// A SenML pack gives one record per time it reports; a payload that is not SenML is
/// dropped and counted, and costs nothing else.
#[test]
fn a_senml_pack_gives_a_record_per_time_and_a_bad_pack_is_counted() {
    use ciborium::Value as C;
    let dir = tempfile::tempdir().unwrap();
    let (mut pipeline, store) = pipeline_for(SENML, dir.path());
    let record =
        |fields: Vec<(i64, C)>| C::Map(fields.into_iter().map(|(k, v)| (C::from(k), v)).collect());
    let pack = C::Array(vec![
        record(vec![
            (-2, C::from("urn:dev:ow:10e2073a01080063:")),
            (-3, C::from(1_700_000_000)),
            (0, C::from("temperature")),
            (1, C::from("Cel")),
            (2, C::Float(21.5)),
        ]),
        record(vec![
            (0, C::from("temperature")),
            (6, C::from(60)),
            (2, C::Float(21.75)),
        ]),
    ]);
    let mut payload = Vec::new();
    ciborium::into_writer(&pack, &mut payload).unwrap();
    let message = |payload: Vec<u8>| Inbound {
        bytes: payload.len(),
        publish: Publish::new("city/climate/7", rumqttc::QoS::AtLeastOnce, payload),
        oversized: false,
    };
    let now = now_ms();
    let mut garbage = payload.clone();
    garbage.truncate(payload.len() - 3);
    pipeline.process(&[message(payload), message(garbage)], now);
    pipeline.commit(now).unwrap();
    let records: Vec<v1::Record> = (store.read(0, 1, 10, now).records.iter())
        .map(|r| r.record().unwrap())
        .collect();
    let times: Vec<i64> = records
        .iter()
        .map(|r| r.event_time.unwrap().seconds)
        .collect();
    assert_eq!(times, [1_700_000_000, 1_700_000_060]);
    for (r, want) in records.iter().zip([21.5, 21.75]) {
        let mut names: Vec<&str> = r.fields.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["bn", "temperature.v"]);
        assert_eq!(
            r.fields["temperature.v"].kind,
            Some(v1::value::Kind::DoubleValue(want))
        );
        let Some(v1::value::Kind::StringValue(bn)) = &r.fields["bn"].kind else {
            panic!("bn is a pseudonym");
        };
        assert!(!bn.contains("10e2073a01080063"));
    }
    assert_eq!(
        pipeline.stats.streams[0]
            .dropped_decode
            .load(Ordering::Relaxed),
        1
    );
}

/// Streams of one topic each get the message's readings, whatever their order and formats:
/// the last stream of a format takes them by value, the others copies, and a format that
/// cannot read the payload is counted for its stream alone.
#[test]
fn every_stream_of_a_topic_gets_the_readings() {
    let stream = |name: &str, format: &str, fields: &str| {
        format!(
            r#"
[[stream]]
name = "{name}"
topics = ["city/footfall/+/probe"]
format = "{format}"
purpose = "test"
legal_basis = "public task"
principles = ["community_participation"]
retention = "1d"

[stream.fields]
{fields}
"#
        )
    };
    let policy = [
        stream("ids", "json", r#"counter_id = "keep""#),
        stream("pack", "senml_json", r#"n = "keep""#),
        stream(
            "both",
            "json",
            "counter_id = \"keep\"\nmac = \"pseudonymise\"",
        ),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let (mut pipeline, store) = pipeline_for(&policy, dir.path());
    let mut garbage = probe(rumqttc::QoS::AtMostOnce, "3c:22:fb:12:34:56");
    garbage.publish.payload = bytes::Bytes::from_static(b"{\"counter_id\":");
    let now = now_ms();
    let messages = [
        probe(rumqttc::QoS::AtMostOnce, "3c:22:fb:12:34:56"),
        garbage,
        probe(rumqttc::QoS::AtMostOnce, "3c:22:fb:12:34:57"),
    ];
    pipeline.process(&messages, now);
    pipeline.commit(now).unwrap();
    let fields = |stream: usize| -> Vec<Vec<String>> {
        store
            .read(stream, 1, 10, now)
            .records
            .iter()
            .map(|r| {
                let mut names: Vec<String> = r.record().unwrap().fields.into_keys().collect();
                names.sort_unstable();
                names
            })
            .collect()
    };
    assert_eq!(fields(0), [["counter_id"], ["counter_id"]]);
    assert!(fields(1).is_empty());
    assert_eq!(fields(2), [["counter_id", "mac"], ["counter_id", "mac"]]);
    let macs: Vec<String> = store
        .read(2, 1, 10, now)
        .records
        .iter()
        .map(|r| match r.record().unwrap().fields["mac"].kind.clone() {
            Some(v1::value::Kind::StringValue(p)) => p,
            other => panic!("a pseudonym, not {other:?}"),
        })
        .collect();
    assert_ne!(macs[0], macs[1]);
    let dropped: Vec<u64> = (pipeline.stats.streams.iter())
        .map(|s| s.dropped_decode.load(Ordering::Relaxed))
        .collect();
    assert_eq!(dropped, [1, 3, 1]);
}

/// A window that absorbed a QoS 1 reading (to be acknowledged) is checkpointed in that
/// commit; one that absorbed only QoS 0 readings at most once a second, and before a stop.
#[test]
fn windows_are_checkpointed_before_acknowledgement_and_at_most_each_second_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let (mut pipeline, store) = pipeline_for(AGGREGATED, dir.path());
    let name = checkpoint_name("counts");
    let t = now_ms();
    pipeline.process(&[probe(rumqttc::QoS::AtMostOnce, "aa:01")], t);
    pipeline.commit(t).unwrap();
    assert_eq!(store.checkpoint(&name).unwrap(), None, "QoS 0: not yet");
    pipeline.process(&[probe(rumqttc::QoS::AtMostOnce, "aa:02")], t + 1_500);
    pipeline.commit(t + 1_500).unwrap();
    let after_a_second = store
        .checkpoint(&name)
        .unwrap()
        .expect("due after a second");
    pipeline.process(&[probe(rumqttc::QoS::AtLeastOnce, "aa:03")], t + 1_600);
    pipeline.commit(t + 1_600).unwrap();
    let for_the_ack = store.checkpoint(&name).unwrap().expect("checkpointed");
    assert_ne!(for_the_ack, after_a_second, "QoS 1: in the same commit");
    pipeline.process(&[probe(rumqttc::QoS::AtMostOnce, "aa:04")], t + 1_700);
    pipeline.commit(t + 1_700).unwrap();
    assert_eq!(store.checkpoint(&name).unwrap().unwrap(), for_the_ack);
    pipeline.checkpoint_all_windows();
    pipeline.commit(t + 1_800).unwrap();
    assert_ne!(
        store.checkpoint(&name).unwrap().unwrap(),
        for_the_ack,
        "before a stop"
    );
}

/// Between whole states, a checkpoint writes only the groups that changed; the whole state
/// and its changes resume the state the pipeline holds, and once a quarter of the groups
/// changed the whole state is written again.
#[test]
fn window_checkpoints_write_the_changes_between_whole_states() {
    let dir = tempfile::tempdir().unwrap();
    let (mut pipeline, store) = pipeline_for(AGGREGATED, dir.path());
    let probe_at = |counter: usize, mac: &str| {
        let payload = format!(r#"{{"counter_id":"pc-{counter}","mac":"{mac}"}}"#);
        Inbound {
            bytes: payload.len(),
            publish: Publish::new(
                format!("city/footfall/pc-{counter}/probe"),
                rumqttc::QoS::AtLeastOnce,
                payload,
            ),
            oversized: false,
        }
    };
    let (whole, changes) = (checkpoint_name("counts"), changes_name("counts"));
    let stored = |name: &str| store.checkpoint(name).unwrap().unwrap_or_default();
    let t = now_ms();
    let batch: Vec<_> = (0..40).map(|c| probe_at(c, "aa:01")).collect();
    pipeline.process(&batch, t);
    pipeline.commit(t).unwrap();
    let first = stored(&whole);
    assert!(first.starts_with(CHECKPOINT_MAGIC));
    assert!(
        stored(&changes).is_empty(),
        "a whole state, with no changes"
    );

    // Two groups change, one of them new: only they are written.
    pipeline.process(&[probe_at(1, "aa:02"), probe_at(99, "aa:03")], t + 10);
    pipeline.commit(t + 10).unwrap();
    assert_eq!(stored(&whole), first);
    let written = stored(&changes);
    assert!(written.starts_with(CHANGES_MAGIC));
    assert!(
        written.len() * 5 < first.len(),
        "{} of {}",
        written.len(),
        first.len()
    );
    let spec = pipeline.policy.streams()[0].aggregate.clone().unwrap();
    let resumed = resume_windows(&store, &pipeline.policy.streams()[0], &spec).unwrap();
    let live = &pipeline.windows[0].as_ref().unwrap().state;
    assert_eq!(resumed.state.entries(), live.entries());
    assert_eq!(
        resumed.state.groups().collect::<Vec<_>>(),
        live.groups().collect::<Vec<_>>()
    );
    assert!(
        live.groups()
            .any(|(_, key, n)| key == [Value::Str("pc-99".into())] && n == 1)
    );

    // A quarter of the groups changed: the whole state again, and its changes start over.
    let batch: Vec<_> = (0..10).map(|c| probe_at(c, "aa:04")).collect();
    pipeline.process(&batch, t + 20);
    pipeline.commit(t + 20).unwrap();
    assert_ne!(stored(&whole), first);
    assert!(stored(&changes).is_empty());
    let resumed = resume_windows(&store, &pipeline.policy.streams()[0], &spec).unwrap();
    let live = &pipeline.windows[0].as_ref().unwrap().state;
    assert_eq!(
        resumed.state.groups().collect::<Vec<_>>(),
        live.groups().collect::<Vec<_>>()
    );

    // Changes that are not those of the whole state beside them are refused, not applied.
    store.save_checkpoint(&changes, written).unwrap();
    let refused = resume_windows(&store, &pipeline.policy.streams()[0], &spec);
    assert!(refused.unwrap_err().to_string().contains("damaged"));
}

/// However many origins push, the marks held in memory stay bounded, and a mark let go is
/// read back from the store: a batch sent again is still recognised.
#[test]
fn push_marks_in_memory_are_bounded_and_reread_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (mut pipeline, store) = pipeline_for(POLICY, dir.path());
    let origins = MAX_CACHED_PUSH_MARKS + 100;
    for i in 0..origins {
        assert_eq!(
            pipeline.accept_push(&push(&format!("o{i}"), 1), 0).unwrap(),
            1
        );
        pipeline.commit(0).unwrap();
        assert!(pipeline.push_marks.len() < MAX_CACHED_PUSH_MARKS);
    }
    let kept = store.next_sequence(0);
    assert_eq!(kept, origins as u64 + 1);
    // The first origin's mark left memory long ago; its batch sent again is not kept twice.
    assert!(!pipeline.push_marks.contains_key("push/o0/s"));
    assert_eq!(pipeline.accept_push(&push("o0", 1), 0).unwrap(), 1);
    pipeline.commit(0).unwrap();
    assert_eq!(store.next_sequence(0), kept);
}

/// An origin that invents incarnations adds one mark, holding its latest few incarnations;
/// marks of one incarnation written by earlier versions are still honoured.
#[test]
fn push_marks_hold_the_latest_incarnations_of_an_origin() {
    use crate::sources::push::{MAX_INCARNATIONS, Marks};
    let dir = tempfile::tempdir().unwrap();
    let (mut pipeline, store) = pipeline_for(POLICY, dir.path());
    for i in 0..100 {
        let mut job = push("o", 1);
        job.incarnation = format!("i{i}");
        assert_eq!(pipeline.accept_push(&job, 0).unwrap(), 1);
        pipeline.commit(0).unwrap();
        assert_eq!(
            store.checkpoint(&format!("push/o/i{i}/s")).unwrap(),
            None,
            "no mark per incarnation"
        );
    }
    let marks = Marks::decode(&store.checkpoint("push/o/s").unwrap().unwrap());
    assert_eq!(marks.len(), MAX_INCARNATIONS);
    assert_eq!(marks.get("i99"), Some(1));
    assert_eq!(marks.get("i0"), None);
    // The latest incarnation sending its batch again: acknowledged, not kept twice.
    let kept = store.next_sequence(0);
    let mut again = push("o", 1);
    again.incarnation = "i99".into();
    assert_eq!(pipeline.accept_push(&again, 0).unwrap(), 1);
    pipeline.commit(0).unwrap();
    assert_eq!(store.next_sequence(0), kept);
    // A mark in the earlier layout (one checkpoint per incarnation).
    pipeline
        .pending
        .checkpoint("push/old/a/s".into(), 7u64.to_be_bytes().to_vec());
    pipeline.commit(0).unwrap();
    assert_eq!(pipeline.accept_push(&push("old", 7), 0).unwrap(), 7);
    pipeline.commit(0).unwrap();
    assert_eq!(store.next_sequence(0), kept, "sequence 7 was kept before");
}

const HELD: &str = r#"
[[stream]]
name = "probes"
topics = ["city/probes/+"]
purpose = "test"
legal_basis = "public task"
principles = ["community_participation"]
retention = "1d"
time_bucket = "10s"

[stream.fields]
n = "keep"
pad = "keep"
mac = "pseudonymise"
"#;

fn numbered(n: u64) -> Inbound {
    let payload = format!(r#"{{"n":{n},"mac":"3c:22:fb:12:34:{:02x}"}}"#, n % 256);
    Inbound {
        bytes: payload.len(),
        publish: Publish::new("city/probes/p1", rumqttc::QoS::AtLeastOnce, payload),
        oversized: false,
    }
}

/// The `n` of every record of stream 0, in sequence order, read as of `now_ms`.
fn numbers(store: &Store, now_ms: i64) -> Vec<i64> {
    let (mut from, mut out) = (1, Vec::new());
    loop {
        let batch = store.read(0, from, 1_000, now_ms);
        if batch.records.is_empty() {
            return out;
        }
        out.extend(batch.records.iter().filter_map(
            |r| match r.record().ok()?.fields.get("n")?.kind {
                Some(v1::value::Kind::IntValue(v)) => Some(v),
                _ => None,
            },
        ));
        from = batch.next;
    }
}

/// A personal-data stream with a time bucket shows nothing before its bucket ends; then the
/// bucket's records all at once, in an order unrelated to their arrival, each once, also after
/// a restart in between.
#[test]
fn held_records_are_released_after_their_bucket_in_no_order_of_arrival() {
    let dir = tempfile::tempdir().unwrap();
    let (mut pipeline, store) = pipeline_for(HELD, dir.path());
    let t = 1_700_000_000_000; // on the 10 s grid
    let batch: Vec<Inbound> = (0..60).map(numbered).collect();
    pipeline.process(&batch, t + 1_000);
    pipeline.commit(t + 1_000).unwrap();
    pipeline.tick(t + 5_000);
    pipeline.commit(t + 5_000).unwrap();
    assert_eq!(
        store.next_sequence(0),
        1,
        "nothing is visible within the bucket"
    );

    // A restart within the bucket changes nothing: the records wait in the outbox.
    drop((pipeline, store));
    let (mut pipeline, store) = pipeline_for(HELD, dir.path());
    pipeline.tick(t + 9_999);
    pipeline.commit(t + 9_999).unwrap();
    assert_eq!(store.next_sequence(0), 1);

    pipeline.tick(t + 10_400);
    pipeline.commit(t + 10_400).unwrap();
    let released = numbers(&store, t + 10_400);
    assert_eq!(released.len(), 60, "the whole bucket at once");
    let mut sorted = released.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..60).collect::<Vec<i64>>(), "each record once");
    assert_ne!(released, sorted, "not in the order they came");

    // Released records leave the hold log, and are not released again after a restart.
    store.purge_expired_all(t + 10_500);
    let hold = store.hold_of(0).unwrap();
    assert!(store.read(hold, 1, 100, t + 10_500).records.is_empty());
    drop((pipeline, store));
    let (mut pipeline, store) = pipeline_for(HELD, dir.path());
    pipeline.tick(t + 30_000);
    pipeline.commit(t + 30_000).unwrap();
    assert_eq!(numbers(&store, t + 30_000).len(), 60);
}

/// A release larger than a lane is cut into lanes by the record hash: it comes in several
/// commits, and still holds each record once.
#[test]
fn a_large_release_comes_in_lanes_each_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut pipeline, store) = pipeline_for(HELD, dir.path());
    pipeline.lane_bytes = 64 << 10;
    let t = 1_700_000_000_000;
    let pad = "x".repeat(2_000);
    let n = pipeline.lane_bytes / 2_000 * 3;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        let batch: Vec<Inbound> = chunk
            .iter()
            .map(|i| {
                let payload = format!(r#"{{"n":{i},"mac":"m","pad":"{pad}"}}"#);
                Inbound {
                    bytes: payload.len(),
                    publish: Publish::new("city/probes/p1", rumqttc::QoS::AtMostOnce, payload),
                    oversized: false,
                }
            })
            .collect();
        pipeline.process(&batch, t + 1_000);
        pipeline.commit(t + 1_000).unwrap();
    }
    let mut commits = 0;
    for step in 0..10 {
        pipeline.tick(t + 10_000 + step);
        if pipeline.wants_commit(t + 10_000 + step) {
            commits += 1;
        }
        pipeline.commit(t + 10_000 + step).unwrap();
    }
    assert!(commits >= 2, "{commits} commits");
    let mut released = numbers(&store, t + 10_010);
    assert_eq!(released.len() as u64, n);
    released.sort_unstable();
    released.dedup();
    assert_eq!(released.len() as u64, n, "each record once");
}
