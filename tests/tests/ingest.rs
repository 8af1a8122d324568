//! End to end: MQTT through a real mosquitto, the gateway as its own process, a real gRPC client.

use std::collections::BTreeSet;
use std::time::Duration;

use hubgate_proto::v1::{self, start_position::Position, subscribe_response::Event};
use hubgate_tests::{Gateway, Mosquitto, Publisher, config, fields, gateway_bin};
use tokio_stream::StreamExt;

const AIR: &str = r#"
[[stream]]
name = "air"
topics = ["city/air/+/reading"]
purpose = "Air quality maps"
legal_basis = "public task"
principles = ["sustainability_resilience"]
retention = "1d"
time_field = "ts"

[stream.fields]
station_id = "keep"
pm25 = "keep"
"location.district" = "keep"
"#;

const NOISE: &str = r#"
[[stream]]
name = "noise"
topics = ["city/noise/+"]
purpose = "Noise maps"
legal_basis = "public task"
principles = ["human_rights_equity_inclusion"]
retention = "1d"

[stream.fields]
laeq = "keep"
"#;

const PARKING: &str = r#"
[[stream]]
name = "parking"
topics = ["city/parking/+"]
purpose = "Free bays"
legal_basis = "public task"
principles = ["shared_prosperity"]
retention = "1d"

[stream.fields]
occupied = "keep"
"#;

use hubgate_tests::subscribe_request as from;

/// Reads `n` records from a Subscribe stream (failing after 30 s).
async fn take_records(
    stream: &mut tonic::Streaming<v1::SubscribeResponse>,
    n: usize,
) -> Vec<v1::Record> {
    let mut records = Vec::new();
    while records.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(30), stream.next()).await;
        let message =
            next.unwrap_or_else(|_| panic!("timed out after {} of {n} records", records.len()));
        match message.expect("stream open").expect("no error").event {
            Some(Event::Record(r)) => records.push(r),
            other => panic!("unexpected event {other:?}"),
        }
    }
    records
}

/// A Subscribe stream of the `noise` stream, from its oldest record.
async fn noise_from_oldest(gw: &Gateway) -> tonic::Streaming<v1::SubscribeResponse> {
    gw.client()
        .await
        .subscribe(from(&["noise"], Position::Oldest(v1::Oldest {})))
        .await
        .expect("Subscribe is accepted")
        .into_inner()
}

/// The `laeq` numbers of `noise` records.
fn laeq_numbers(records: &[v1::Record]) -> BTreeSet<u64> {
    records
        .iter()
        .map(|r| fields(r)["laeq"].parse().expect("laeq is a number"))
        .collect()
}

/// Asserts nothing more arrives on the stream within `wait`.
async fn assert_quiet(stream: &mut tonic::Streaming<v1::SubscribeResponse>, wait: Duration) {
    if let Ok(Some(m)) = tokio::time::timeout(wait, stream.next()).await {
        panic!("unexpected message: {m:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_fields_arrive_and_everything_else_is_dropped_and_counted() {
    let broker = Mosquitto::start();
    let gw = Gateway::start(
        gateway_bin!(),
        &config(
            broker.port,
            "gw-fields",
            &format!("[footprint]\ngrid_intensity_g_per_kwh = 250.0\n{AIR}{NOISE}"),
        ),
    );
    gw.wait_ready();
    let mut client = gw.client().await;
    let mut air = client
        .subscribe(from(&["air"], Position::Live(v1::Live {})))
        .await
        .unwrap()
        .into_inner();

    let mut publisher = Publisher::connect(broker.port, "pub-fields");
    let mut published = 0;
    for i in 0..10 {
        let payload = serde_json::json!({
            "station_id": format!("aq-{i}"), "ts": 1_700_000_000 + i, "pm25": 10.5 + i as f64,
            "mac": "3c:22:fb:12:34:56", "location": {"district": "north", "lat": 52.3731, "lon": 4.8922},
            "firmware": "2.4.1", "bands": [1, 2, 3],
        });
        publisher
            .publish(&format!("city/air/aq-{i}/reading"), payload.to_string())
            .await;
        published += 1;
        if i % 3 == 0 {
            // A malformed payload between good ones must not stop the stream.
            publisher
                .publish(
                    &format!("city/air/aq-{i}/reading"),
                    &b"{\"station_id\": \"aq-x\", \"pm25\":"[..],
                )
                .await;
            published += 1;
        }
    }
    for i in 0..5 {
        publisher
            .publish(
                &format!("city/noise/n-{i}"),
                serde_json::json!({"laeq": 55.5, "gps": [1, 2]}).to_string(),
            )
            .await;
        published += 1;
    }
    publisher.wait_acked(published).await;

    let records = take_records(&mut air, 10).await;
    let declared: BTreeSet<&str> = ["station_id", "pm25", "location.district"].into();
    for (i, record) in records.iter().enumerate() {
        let f = fields(record);
        let keys: BTreeSet<&str> = f.keys().map(String::as_str).collect();
        assert_eq!(keys, declared, "record {i}: {f:?}");
        assert_eq!(f["station_id"], format!("aq-{i}"));
        assert_eq!(f["location.district"], "north");
        assert_eq!(record.stream, "air");
        assert_eq!(record.sequence, i as u64 + 1);
        assert_eq!(record.event_time.unwrap().seconds, 1_700_000_000 + i as i64);
        assert_eq!(record.policy_hash.len(), 64);
        assert!(
            !format!("{record:?}").contains("3c:22:fb"),
            "a MAC address reached the subscriber"
        );
    }
    assert_quiet(&mut air, Duration::from_millis(300)).await;

    let page = gw.metrics();
    let m = |name: &str, labels: &[(&str, &str)]| hubgate_tests::metric_value(&page, name, labels);
    assert_eq!(
        m("hubgate_stream_messages_total", &[("stream", "air")]),
        14.0
    );
    assert_eq!(
        m(
            "hubgate_messages_dropped_total",
            &[("stream", "air"), ("reason", "decode")]
        ),
        4.0
    );
    // Per good air message: mac, location.lat, location.lon, firmware, bands.
    assert_eq!(
        m(
            "hubgate_fields_dropped_total",
            &[("stream", "air"), ("stage", "allow_list")]
        ),
        50.0
    );
    assert_eq!(m("hubgate_records_kept_total", &[("stream", "air")]), 10.0);
    assert_eq!(m("hubgate_records_kept_total", &[("stream", "noise")]), 5.0);
    assert_eq!(
        m(
            "hubgate_fields_dropped_total",
            &[("stream", "noise"), ("stage", "allow_list")]
        ),
        5.0
    );
    assert_eq!(
        m("hubgate_mqtt_messages_received_total", &[]),
        published as f64
    );
    assert_eq!(m("hubgate_unrouted_messages_total", &[]), 0.0);
    assert!(
        !page.contains("city/air"),
        "a topic appeared in the metrics"
    );
    assert!(
        !gw.log().contains("3c:22:fb"),
        "a MAC address appeared in the log"
    );
    // The footprint meter: its method is named, and the work above cost energy.
    assert!(
        page.contains("hubgate_footprint_info{method=\"model\"")
            || page.contains("hubgate_footprint_info{method=\"rapl\""),
        "{page}"
    );
    hubgate_tests::wait_for("energy counted", Duration::from_secs(15), || {
        gw.metric("hubgate_energy_joules_total", &[]) > 0.0
    });
    // Carbon follows: operational at the configured 250 g/kWh, embodied by running time, and the
    // SCI per 1,000 readings kept (15) consistent with them. (Read until one page holds a whole
    // sample: the figures move together every 5 s.)
    hubgate_tests::wait_for("consistent carbon figures", Duration::from_secs(15), || {
        let page = gw.metrics();
        let figure = |name| hubgate_tests::metric_value(&page, name, &[]);
        let joules = figure("hubgate_energy_joules_total");
        let operational = figure("hubgate_carbon_operational_grams_total");
        let embodied = figure("hubgate_carbon_embodied_grams_total");
        let sci = figure("hubgate_sci_grams_per_1000_readings");
        embodied > 0.0
            && sci > 0.0
            && (operational - joules / 3.6e6 * 250.0).abs() < 1e-9
            && (sci - (operational + embodied) / 15.0 * 1000.0).abs() < 1e-6 * sci
    });
    // Bytes: the policy drops most of each payload's content; the difference is counted as
    // avoided, with its attributional network energy at the default 0.06 kWh/GB. (The records'
    // envelope, about 90 bytes with the policy hash, outweighs these small payloads: it is in the
    // bytes sent, not in the bytes avoided.)
    hubgate_tests::wait_for("consistent byte figures", Duration::from_secs(15), || {
        let page = gw.metrics();
        let figure =
            |name, labels: &[(&str, &str)]| hubgate_tests::metric_value(&page, name, labels);
        let received = figure("hubgate_mqtt_received_bytes_total", &[]);
        let sent = figure("hubgate_grpc_sent_bytes_total", &[("stream", "air")])
            + figure("hubgate_grpc_sent_bytes_total", &[("stream", "noise")]);
        let written = figure("hubgate_outbox_written_bytes_total", &[]);
        let avoided = figure("hubgate_bytes_avoided_total", &[]);
        let avoided_joules = figure("hubgate_network_energy_avoided_joules_total", &[]);
        sent > 0.0
            && written > 0.0
            && avoided > 0.0
            && avoided < received
            && (avoided_joules - avoided / 1e9 * 0.06 * 3.6e6).abs() < 1e-9
    });
}

/// A topic no stream declares never reaches a subscriber. The persistent session makes this real:
/// after a policy change removes a stream, the broker still delivers its topics to the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_topics_are_dropped_and_counted() {
    let broker = Mosquitto::start();
    let before = Gateway::start(
        gateway_bin!(),
        &config(broker.port, "gw-routes", &format!("{AIR}{PARKING}")),
    );
    before.wait_ready();
    assert!(before.stop().success());

    let gw = Gateway::start(gateway_bin!(), &config(broker.port, "gw-routes", AIR));
    gw.wait_ready();
    let mut client = gw.client().await;
    let mut all = client
        .subscribe(from(&[], Position::Oldest(v1::Oldest {})))
        .await
        .unwrap()
        .into_inner();
    let mut publisher = Publisher::connect(broker.port, "pub-routes");
    for i in 0..6 {
        publisher
            .publish(
                &format!("city/parking/p-{i}"),
                r#"{"occupied": true, "plate": "AB-123-CD"}"#,
            )
            .await;
    }
    publisher
        .publish(
            "city/air/aq-1/reading",
            r#"{"station_id": "aq-1", "pm25": 3}"#,
        )
        .await;
    publisher.wait_acked(7).await;

    let records = take_records(&mut all, 1).await;
    assert_eq!(records[0].stream, "air");
    assert_quiet(&mut all, Duration::from_millis(300)).await;
    assert_eq!(gw.metric("hubgate_unrouted_messages_total", &[]), 6.0);
    assert_eq!(gw.metric("hubgate_mqtt_messages_received_total", &[]), 7.0);
    let streams = client
        .list_streams(v1::ListStreamsRequest {})
        .await
        .unwrap()
        .into_inner()
        .streams;
    assert_eq!(
        streams.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["air"]
    );
    let status = client
        .subscribe(from(&["parking"], Position::Live(v1::Live {})))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
}

/// Two gateways in one shared-subscription group: the broker deals the messages out between
/// them, each message to one gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_in_a_shared_group_split_the_messages() {
    const N: u64 = 400;
    let broker = Mosquitto::start();
    let shared = |client_id: &str| {
        config(broker.port, client_id, NOISE).replacen(
            "[mqtt]\n",
            "[mqtt]\nshared_group = \"hubgate\"\n",
            1,
        )
    };
    let (a, b) = (
        Gateway::start(gateway_bin!(), &shared("gw-share-a")),
        Gateway::start(gateway_bin!(), &shared("gw-share-b")),
    );
    a.wait_ready();
    b.wait_ready();
    let kept = |gw: &Gateway| gw.metric("hubgate_records_kept_total", &[("stream", "noise")]);
    // Both subscriptions are in place once a message has reached each gateway. (Messages
    // published before that may reach no one, so they are not counted.)
    let publisher = Publisher::connect(broker.port, "pub-share");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while kept(&a) == 0.0 || kept(&b) == 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the group never subscribed"
        );
        publisher
            .publish("city/noise/warmup", r#"{"laeq": 1}"#)
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (a_before, b_before) = (kept(&a), kept(&b));
    let before = a_before + b_before;
    for i in 0..N {
        publisher
            .publish(&format!("city/noise/n-{}", i % 7), r#"{"laeq": 55}"#)
            .await;
    }
    let want = before + N as f64;
    hubgate_tests::wait_for("every message kept", Duration::from_secs(20), || {
        kept(&a) + kept(&b) >= want
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(kept(&a) + kept(&b), want, "each message kept once");
    assert!(
        kept(&a) > a_before && kept(&b) > b_before,
        "both gateways took a share of the {N}: {} and {}",
        kept(&a) - a_before,
        kept(&b) - b_before
    );
}

/// Sparkplug B through a real broker: the node's birth names its metrics, and its data, sent by
/// alias alone, reaches the subscriber under those names, with the payload's time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparkplug_data_by_alias_is_named_from_the_birth() {
    use hubgate::decode::sparkplug::{Metric, MetricValue, Payload};
    use prost::Message as _;
    let stream = r#"
[[stream]]
name = "reservoirs"
topics = ["spBv1.0/waterworks/+/+"]
format = "sparkplug_b"
purpose = "Reservoir levels"
legal_basis = "public task"
principles = ["sustainability_resilience"]
retention = "1d"
time_field = "timestamp"

[stream.fields]
edge_node = "keep"
"Reservoir/Level" = "keep"
"#;
    let broker = Mosquitto::start();
    let gw = Gateway::start(gateway_bin!(), &config(broker.port, "gw-sparkplug", stream));
    gw.wait_ready();
    let mut client = gw.client().await;
    let mut records = client
        .subscribe(from(&["reservoirs"], Position::Live(v1::Live {})))
        .await
        .unwrap()
        .into_inner();
    let level = |name: Option<&str>, value: f64| Metric {
        name: name.map(str::to_owned),
        alias: Some(1),
        datatype: name.map(|_| 10),
        value: Some(MetricValue::DoubleValue(value)),
        ..Metric::default()
    };
    let message = |seq: u64, ms: u64, metric: Metric| {
        Payload {
            timestamp: Some(ms),
            metrics: vec![metric],
            seq: Some(seq),
            ..Payload::default()
        }
        .encode_to_vec()
    };
    let mut publisher = Publisher::connect(broker.port, "pub-sparkplug");
    publisher
        .publish(
            "spBv1.0/waterworks/NBIRTH/station-3",
            message(0, 1_704_067_200_000, level(Some("Reservoir/Level"), 3.42)),
        )
        .await;
    publisher
        .publish(
            "spBv1.0/waterworks/NDATA/station-3",
            message(1, 1_704_067_260_000, level(None, 3.39)),
        )
        .await;
    publisher.wait_acked(2).await;
    let got = take_records(&mut records, 2).await;
    let levels: Vec<(i64, String)> = got
        .iter()
        .map(|r| {
            (
                r.event_time.unwrap().seconds,
                fields(r)["Reservoir/Level"].clone(),
            )
        })
        .collect();
    assert_eq!(
        levels,
        [
            (1_704_067_200, "3.42".to_owned()),
            (1_704_067_260, "3.39".to_owned())
        ]
    );
    assert_eq!(fields(&got[1])["edge_node"], "station-3");
}

/// The broker restarts mid-stream: every QoS 1 message still reaches the subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_no_qos1_message() {
    const N: u64 = 1500;
    let mut broker = Mosquitto::start();
    let gw = Gateway::start(gateway_bin!(), &config(broker.port, "gw-restart", NOISE));
    gw.wait_ready();
    let mut client = gw.client().await;
    let mut stream = client
        .subscribe(from(&["noise"], Position::Oldest(v1::Oldest {})))
        .await
        .unwrap()
        .into_inner();
    let collector = tokio::spawn(async move {
        let mut seen = BTreeSet::new();
        let mut duplicates = 0u64;
        while (seen.len() as u64) < N {
            let next = tokio::time::timeout(Duration::from_secs(60), stream.next()).await;
            let Ok(Some(Ok(message))) = next else { break };
            if let Some(Event::Record(r)) = message.event {
                let n: u64 = fields(&r)["laeq"].parse().expect("laeq is a number");
                if !seen.insert(n) {
                    duplicates += 1;
                }
            }
        }
        (seen, duplicates)
    });

    let publisher = Publisher::connect(broker.port, "pub-restart");
    for n in 0..N {
        publisher
            .publish("city/noise/m-1", format!("{{\"laeq\": {n}}}"))
            .await;
        if n % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if n == N / 2 {
            broker.restart();
        }
    }
    let (seen, duplicates) = collector.await.unwrap();
    let missing: Vec<u64> = (0..N).filter(|n| !seen.contains(n)).collect();
    if !missing.is_empty() {
        eprintln!("{}", gw.log());
    }
    assert!(
        missing.is_empty(),
        "lost {} messages, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    eprintln!("broker restart: {N} messages, {duplicates} duplicates");
    assert!(
        gw.metric("hubgate_mqtt_connection_errors_total", &[]) >= 1.0,
        "the gateway saw the broker go"
    );
}

/// A broker that comes back without the gateway's session (its persistence lost) is a warning
/// and a count, not just a line at INFO; one that kept it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_broker_session_is_warned_and_counted() {
    let mut broker = Mosquitto::start();
    let gw = Gateway::start(gateway_bin!(), &config(broker.port, "gw-session", NOISE));
    gw.wait_ready();
    let reconnected = |gw: &Gateway, errors: f64| {
        hubgate_tests::wait_for("the reconnection", Duration::from_secs(20), || {
            gw.metric("hubgate_mqtt_connection_errors_total", &[]) >= errors
                && gw.metric("hubgate_mqtt_connected", &[]) == 1.0
        });
    };
    broker.restart();
    reconnected(&gw, 1.0);
    assert_eq!(gw.metric("hubgate_mqtt_sessions_lost_total", &[]), 0.0);
    broker.restart_forgetting();
    reconnected(&gw, 2.0);
    hubgate_tests::wait_for("the loss to be counted", Duration::from_secs(10), || {
        gw.metric("hubgate_mqtt_sessions_lost_total", &[]) == 1.0
    });
    assert!(
        gw.log()
            .contains("the broker had lost the gateway's session"),
        "{}",
        gw.log()
    );
    // Subscribed again: readings flow.
    let mut stream = noise_from_oldest(&gw).await;
    let publisher = Publisher::connect(broker.port, "pub-session");
    publisher.publish("city/noise/m-1", r#"{"laeq": 7}"#).await;
    assert_eq!(
        laeq_numbers(&take_records(&mut stream, 1).await),
        [7].into()
    );
}

/// Every message the gateway kept is acknowledged to the broker, the last burst as promptly as
/// the rest even when nothing follows it: after a SIGKILL and a restart under the same client id,
/// the broker delivers none of them again, only what was published since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_messages_are_acknowledged_and_not_delivered_again() {
    const N: u64 = 1000;
    // At most 20 messages unacknowledged (mosquitto's default here): an ack that is not written
    // stalls delivery.
    let broker = Mosquitto::start();
    let cfg = config(broker.port, "gw-acks", NOISE);
    let gw = Gateway::start(gateway_bin!(), &cfg);
    gw.wait_ready();
    let mut stream = noise_from_oldest(&gw).await;
    let mut publisher = Publisher::connect(broker.port, "pub-acks");
    for n in 0..N {
        publisher
            .publish("city/noise/m-1", format!("{{\"laeq\": {n}}}"))
            .await;
        if n % 250 == 249 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    publisher.wait_acked(N).await;
    let kept = take_records(&mut stream, N as usize).await;
    let numbers = laeq_numbers(&kept);
    assert_eq!(numbers, (0..N).collect());
    // The acks of the last commit go out right after it; give them ample time, then crash.
    tokio::time::sleep(Duration::from_secs(1)).await;
    gw.kill();

    let gw = Gateway::start(gateway_bin!(), &cfg);
    gw.wait_ready();
    publisher
        .publish("city/noise/m-1", format!("{{\"laeq\": {N}}}"))
        .await;
    publisher.wait_acked(N + 1).await;
    let mut stream = noise_from_oldest(&gw).await;
    // The broker sends what it still holds for the session before the new message.
    let first = take_records(&mut stream, 1).await;
    assert_eq!(fields(&first[0])["laeq"], N.to_string(), "delivered again");
    assert_quiet(&mut stream, Duration::from_millis(500)).await;
    assert_eq!(
        gw.metric("hubgate_mqtt_messages_received_total", &[]),
        1.0,
        "the restarted gateway received only the new message"
    );
}

/// Replay from a sequence number, then live, with no gap and no duplicate; plus health and
/// reflection for standard clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_then_live_has_no_gap_and_no_duplicate() {
    let broker = Mosquitto::start();
    let gw = Gateway::start(gateway_bin!(), &config(broker.port, "gw-replay", NOISE));
    gw.wait_ready();
    let mut publisher = Publisher::connect(broker.port, "pub-replay");
    for n in 1..=20 {
        publisher
            .publish("city/noise/m-1", format!("{{\"laeq\": {n}}}"))
            .await;
    }
    publisher.wait_acked(20).await;
    let mut client = gw.client().await;
    // Wait until all 20 are kept.
    for _ in 0..200 {
        let info = client
            .list_streams(v1::ListStreamsRequest {})
            .await
            .unwrap()
            .into_inner();
        if info.streams[0].last_sequence == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let info = client
        .list_streams(v1::ListStreamsRequest {})
        .await
        .unwrap()
        .into_inner()
        .streams;
    assert_eq!((info[0].oldest_sequence, info[0].last_sequence), (1, 20));
    assert_eq!(info[0].fields, ["laeq"]);

    let mut stream = client
        .subscribe(from(&["noise"], Position::Sequence(5)))
        .await
        .unwrap()
        .into_inner();
    let replayed = take_records(&mut stream, 16).await;
    for n in 21..=30 {
        publisher
            .publish("city/noise/m-1", format!("{{\"laeq\": {n}}}"))
            .await;
    }
    let live = take_records(&mut stream, 10).await;
    let sequences: Vec<u64> = replayed.iter().chain(&live).map(|r| r.sequence).collect();
    assert_eq!(sequences, (5..=30).collect::<Vec<_>>());
    let values: Vec<String> = replayed
        .iter()
        .chain(&live)
        .map(|r| fields(r)["laeq"].clone())
        .collect();
    assert_eq!(values, (5..=30).map(|n| n.to_string()).collect::<Vec<_>>());
    assert_quiet(&mut stream, Duration::from_millis(300)).await;

    // Standard clients: gRPC health checking and server reflection.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", gw.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "hubgate.v1.Gateway".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("{response:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"hubgate.v1.Gateway".to_owned()),
        "{names:?}"
    );
}

/// An hourly intensity file covering the hours around now, every hour at `grams`.
fn intensity_file(path: &std::path::Path, zone: &str, grams: f64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs();
    let mut text = String::from("# hourly grid intensity, gCO2e/kWh\nzone,hour,g_per_kwh\n");
    for hour in -2i64..3 {
        let start = (now - now % 3600) as i64 + hour * 3600;
        let time = std::time::UNIX_EPOCH + Duration::from_secs(start as u64);
        let hour = humantime::format_rfc3339_seconds(time);
        text.push_str(&format!("{zone},{hour},{grams}\nOTHER,{hour},1\n"));
    }
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).expect("write the intensity file");
    std::fs::rename(&partial, path).expect("replace the intensity file");
}

/// The footprint over gRPC: GetFootprint carries the figures of `/metrics`, WatchFootprint sends
/// one record per sample, and operational carbon follows the hourly intensity file, read again
/// when it changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_footprint_is_served_over_grpc_and_follows_the_hourly_intensity_file() {
    let broker = Mosquitto::start();
    let files = tempfile::tempdir().unwrap();
    let intensity = files.path().join("intensity.csv");
    intensity_file(&intensity, "NL", 400.0);
    let gw = Gateway::start(
        gateway_bin!(),
        &config(
            broker.port,
            "gw-footprint",
            &format!(
                "[footprint]\nsample_every = \"1s\"\ngrid_intensity_g_per_kwh = 100.0\n\
                 grid_intensity_file = \"{}\"\ngrid_zone = \"NL\"\n{AIR}",
                intensity.display()
            ),
        ),
    );
    gw.wait_ready();
    let mut client = gw.client().await;
    let publisher = Publisher::connect(broker.port, "pub-footprint");
    for i in 0..20 {
        let payload = serde_json::json!({
            "station_id": format!("aq-{i}"), "ts": 1_700_000_000 + i, "pm25": 10.5,
            "firmware": "2.4.1", "serial": "SN-000-111-222", "notes": "a long note to minimise",
        });
        publisher
            .publish(&format!("city/air/aq-{i}/reading"), payload.to_string())
            .await;
    }
    hubgate_tests::wait_for("20 records kept", Duration::from_secs(15), || {
        gw.metric("hubgate_records_kept_total", &[("stream", "air")]) == 20.0
    });

    // WatchFootprint: a record per sample, each later than the one before, counting from the start.
    let mut watch = client
        .watch_footprint(v1::WatchFootprintRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let footprint = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("a footprint record every second")
            .unwrap()
            .unwrap();
        seen.push(footprint);
    }
    let at = |f: &v1::Footprint| {
        let t = f.sampled_at.unwrap();
        (t.seconds, t.nanos)
    };
    assert!(at(&seen[0]) < at(&seen[1]) && at(&seen[1]) < at(&seen[2]));
    assert!(seen[2].energy_joules >= seen[1].energy_joules);
    assert_eq!(seen[2].since, seen[0].since);

    // GetFootprint carries the same figures as /metrics: read until both come from one sample.
    let mut matched = None;
    for _ in 0..50 {
        let before = client
            .get_footprint(v1::GetFootprintRequest {})
            .await
            .unwrap()
            .into_inner();
        let page = gw.metrics();
        let after = client
            .get_footprint(v1::GetFootprintRequest {})
            .await
            .unwrap()
            .into_inner();
        if before == after {
            matched = Some((after, page));
            break;
        }
    }
    let (f, page) = matched.expect("a footprint and a metrics page from the same sample");
    let m = |name, labels: &[(&str, &str)]| hubgate_tests::metric_value(&page, name, labels);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(1.0);
    assert!(f.energy_joules > 0.0, "{f:?}");
    assert!(
        close(f.energy_joules, m("hubgate_energy_joules_total", &[])),
        "{f:?}\n{page}"
    );
    assert!(close(
        f.carbon_embodied_grams,
        m("hubgate_carbon_embodied_grams_total", &[])
    ));
    assert!(close(
        f.carbon_operational_grams,
        m("hubgate_carbon_operational_grams_total", &[])
    ));
    assert_eq!(
        f.bytes_avoided as f64,
        m("hubgate_bytes_avoided_total", &[])
    );
    assert_eq!(
        f.mqtt_received_bytes as f64,
        m("hubgate_mqtt_received_bytes_total", &[])
    );
    assert_eq!(
        f.outbox_written_bytes as f64,
        m("hubgate_outbox_written_bytes_total", &[])
    );
    assert_eq!(f.records_kept, 20);
    assert!(f.bytes_avoided > 0 && f.bytes_avoided < f.mqtt_received_bytes);
    assert!(page.contains(&format!(
        "hubgate_footprint_info{{method=\"{}\"",
        f.energy_method
    )));
    // Carbon from the file's hour, not the fixed fallback, and SCI from it.
    assert_eq!(f.grid_intensity_g_per_kwh, Some(400.0));
    assert_eq!(f.grid_intensity_source, "file");
    assert_eq!(f.seconds_without_intensity, 0.0);
    assert!(
        close(f.carbon_operational_grams, f.energy_joules / 3.6e6 * 400.0),
        "{f:?}"
    );
    let sci = f.sci_grams_per_1000_readings.expect("SCI is defined");
    assert!(close(
        sci,
        (f.carbon_operational_grams + f.carbon_embodied_grams) / 20.0 * 1000.0
    ));
    assert_eq!(m("hubgate_grid_intensity_grams_per_kwh", &[]), 400.0);

    // A broken file leaves the previous one in use; a good one is taken at the next sample.
    std::fs::write(&intensity, "zone,hour,g_per_kwh\nNL,not a time,5\n").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let f = client
        .get_footprint(v1::GetFootprintRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.grid_intensity_g_per_kwh, Some(400.0));
    assert!(
        gw.log().contains("keeping the previous one"),
        "{}",
        gw.log()
    );
    intensity_file(&intensity, "NL", 650.0);
    hubgate_tests::wait_for("the new intensities", Duration::from_secs(10), || {
        gw.metric("hubgate_grid_intensity_grams_per_kwh", &[]) == 650.0
    });
}

/// A broken intensity file stops the gateway at start, naming the file, the line and the column.
#[test]
fn a_broken_intensity_file_is_refused_at_start_with_its_line_and_column() {
    let files = tempfile::tempdir().unwrap();
    let intensity = files.path().join("intensity.csv");
    std::fs::write(
        &intensity,
        "zone,hour,g_per_kwh\nNL,2026-11-25T09:00:00Z,310\nNL,2026-11-25T10:00:00Z,high\n",
    )
    .unwrap();
    let config_path = files.path().join("hubgate.toml");
    std::fs::write(
        &config_path,
        config(
            hubgate_tests::free_port(),
            "gw-bad-intensity",
            &format!(
                "[store]\ndata_dir = \"{}\"\n[footprint]\ngrid_intensity_file = \"{}\"\n{AIR}",
                files.path().join("data").display(),
                intensity.display()
            ),
        ),
    )
    .unwrap();
    let stderr = hubgate_tests::refused_start(gateway_bin!(), &config_path);
    let expected = format!("{}:3:25: `high` is not a number", intensity.display());
    assert!(
        stderr.contains(&expected),
        "missing {expected:?} in:\n{stderr}"
    );
}

/// With `store.commit_interval`, messages that arrive sooner than that after the last commit join
/// the next one: a steady trickle is committed about once per interval, not once per message, and
/// every message is still kept and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_at_least_the_commit_interval_apart() {
    const N: u64 = 60;
    let broker = Mosquitto::start();
    let streams = format!("[store]\ncommit_interval = \"250ms\"\n\n{NOISE}");
    let gw = Gateway::start(
        gateway_bin!(),
        &config(broker.port, "gw-interval", &streams),
    );
    gw.wait_ready();
    let mut stream = noise_from_oldest(&gw).await;
    let before = gw.metric("hubgate_outbox_commits_total", &[]);
    let mut publisher = Publisher::connect(broker.port, "pub-interval");
    // 60 messages over about 1.2 s: a commit each would be 60 commits.
    for n in 0..N {
        publisher
            .publish("city/noise/m-1", format!("{{\"laeq\": {n}}}"))
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publisher.wait_acked(N).await;
    let kept = take_records(&mut stream, N as usize).await;
    let numbers = laeq_numbers(&kept);
    assert_eq!(numbers, (0..N).collect());
    let commits = gw.metric("hubgate_outbox_commits_total", &[]) - before;
    assert!(
        (1.0..=12.0).contains(&commits),
        "{commits} commits for {N} messages over 1.2 s at one per 250 ms"
    );
    // The commits went to the outbox's write-ahead log, which is folded into redb once its
    // oldest entry is a second old; then nothing waits in memory.
    publisher.publish("city/noise/m-1", "{\"laeq\": 60}").await;
    publisher.wait_acked(N + 1).await;
    let folded = || gw.metric("hubgate_outbox_log_folds_total", &[("outcome", "written")]);
    let waiting = || gw.metric("hubgate_outbox_log_waiting_bytes", &[]);
    hubgate_tests::wait_for("a fold of the outbox log", Duration::from_secs(10), || {
        folded() >= 1.0 && waiting() == 0.0
    });
    assert_eq!(
        gw.metric("hubgate_outbox_log_folds_total", &[("outcome", "failed")]),
        0.0
    );
}

const LORAWAN: &str = r#"
[[stream]]
name = "bins"
topics = ["application/+/device/+/event/up"]
format = "chirpstack"
purpose = "Plan waste collection rounds from bin fill levels"
legal_basis = "public task"
principles = ["sustainability_resilience"]
retention = "1d"

[stream.fields]
temperature = "keep"
"lorawan.dev_eui" = "pseudonymise"
cell = { h3 = { resolution = 7, lat = "lorawan.gateway.lat", lon = "lorawan.gateway.lon" } }

[[stream]]
name = "meters"
topics = ["v3/+/devices/+/up"]
format = "ttn"
purpose = "Map indoor climate in public buildings"
legal_basis = "public task"
principles = ["sustainability_resilience"]
retention = "1d"

[stream.fields]
temperature = "keep"
luminosity = "keep"
"lorawan.device_id" = "pseudonymise"
area = { grid = { step = 0.01, lat = "lorawan.location.lat", lon = "lorawan.location.lon" } }
"#;

/// A network server's documented example (tests/data/lorawan) as JSON.
fn lorawan_example(name: &str) -> serde_json::Value {
    let path = hubgate_tests::repo().join("tests/data/lorawan").join(name);
    serde_json::from_slice(&std::fs::read(&path).expect("the example")).expect("JSON")
}

/// LoRaWAN uplinks of ChirpStack and The Things Stack, through mosquitto: the decoded payload's
/// fields pass as declared, the device's identity only as a pseudonym (one per device), positions
/// only as cells, the radio metadata not at all, and the event time is the network server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lorawan_uplinks_from_both_network_servers() {
    let broker = Mosquitto::start();
    let gw = Gateway::start(gateway_bin!(), &config(broker.port, "gw-lorawan", LORAWAN));
    gw.wait_ready();
    let mut client = gw.client().await;
    let mut records = client
        .subscribe(from(&["bins", "meters"], Position::Live(v1::Live {})))
        .await
        .expect("subscribe")
        .into_inner();

    let mut chirpstack = lorawan_example("chirpstack-v4-up.json");
    chirpstack["object"] = serde_json::json!({"temperature": 21.5});
    chirpstack["fCnt"] = serde_json::json!(7);
    chirpstack["rxInfo"][0]["location"] =
        serde_json::json!({"latitude": 52.3731, "longitude": 4.8926});
    let mut later = chirpstack.clone();
    later["time"] = serde_json::json!("2022-07-18T11:49:15.000+02:00");
    later["object"] = serde_json::json!({"temperature": 22.0});
    let ttn = lorawan_example("ttn-v3-up.json");
    let publisher = Publisher::connect(broker.port, "pub-lorawan");
    let chirpstack_topic =
        "application/17c82e96-be03-4f38-aef3-f83d48582d97/device/0101010101010101/event/up";
    for event in [&chirpstack, &later] {
        publisher
            .publish(chirpstack_topic, serde_json::to_vec(event).expect("JSON"))
            .await;
    }
    publisher
        .publish(
            "v3/app1@tenant1/devices/dev1/up",
            serde_json::to_vec(&ttn).expect("JSON"),
        )
        .await;
    let got = take_records(&mut records, 3).await;

    let bins: Vec<_> = got.iter().filter(|r| r.stream == "bins").collect();
    assert_eq!(bins.len(), 2, "{got:?}");
    let seconds: Vec<i64> = bins.iter().map(|r| r.event_time.unwrap().seconds).collect();
    // The network server's times, 2022-07-18T09:34:15.775Z and 09:49:15Z.
    assert_eq!(seconds, [1_658_136_855, 1_658_137_755]);
    let (a, b) = (fields(bins[0]), fields(bins[1]));
    let mut names: Vec<&str> = a.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["cell", "lorawan.dev_eui", "temperature"]);
    assert_eq!(a["temperature"], "21.5");
    assert_ne!(a["lorawan.dev_eui"], "0101010101010101");
    assert_eq!(
        a["lorawan.dev_eui"], b["lorawan.dev_eui"],
        "one device, one pseudonym"
    );
    assert!(!a["cell"].contains("52.37"), "{a:?}");

    let meters: Vec<_> = got.iter().filter(|r| r.stream == "meters").collect();
    let m = fields(meters[0]);
    let mut names: Vec<&str> = m.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["area", "lorawan.device_id", "luminosity", "temperature"]
    );
    assert_ne!(m["lorawan.device_id"], "dev1");
    assert_eq!(m["area"], "37.97,23.72");
    // uplink_message.received_at, the network server's: 2020-02-12T15:15:45.789585559Z.
    assert_eq!(meters[0].event_time.unwrap().seconds, 1_581_520_545);
}
