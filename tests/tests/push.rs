//! Push from another hub, tried as a hostile peer with a push token would: what the hub serves of
//! a pushed record is what its own chain could have produced, and a record it cannot make so is
//! refused with the field named. Without tokens, Push is refused.

use std::time::Duration;

use hubgate_proto::v1::{self, start_position::Position, subscribe_response::Event};
use hubgate_tests::{Gateway, Mosquitto, config, fields, gateway_bin, subscribe_request};
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tonic::{Code, Request};

const HUB: &str = r#"
[[stream]]
name = "footfall"
topics = ["city/footfall/+/probe"]
purpose = "How busy public spaces are"
legal_basis = "public task"
principles = ["community_participation"]
retention = "1d"
time_bucket = "1s"

[stream.fields]
counter_id = "keep"
note = "keep"
mac = "pseudonymise"
cell = { h3 = { resolution = 9, lat = "lat", lon = "lon" } }
area = { grid = { step = 0.01, lat = "lat", lon = "lon" } }
"#;

const PUSHER: &str = "hg_district_push_token";
const READER: &str = "hg_dashboard_token";

fn with<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    request
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(s: &str) -> v1::Value {
    v1::Value {
        kind: Some(v1::value::Kind::StringValue(s.to_owned())),
    }
}

fn record(sequence: u64, policy_hash: &str, fields: &[(&str, &str)]) -> v1::Record {
    v1::Record {
        sequence,
        event_time: Some(prost_types::Timestamp {
            seconds: 1_700_000_123,
            nanos: 456_000_000,
        }),
        policy_hash: policy_hash.to_owned(),
        fields: fields
            .iter()
            .map(|(p, v)| ((*p).to_owned(), value(v)))
            .collect(),
        ..v1::Record::default()
    }
}

fn hub_config(port: u16) -> String {
    let digest = |t: &str| hubgate::sinks::grpc::auth::digest_hex(t);
    format!(
        "{}\n[[grpc.token]]\nname = \"district-1\"\nsha256 = \"{}\"\nstreams = [\"footfall\"]\npush = true\norigins = [\"district-1\"]\n\
         \n[[grpc.token]]\nname = \"dashboard\"\nsha256 = \"{}\"\nstreams = [\"*\"]\npolicy = true\n",
        config(port, "hub-push", HUB),
        digest(PUSHER),
        digest(READER),
    )
}

/// One Push call of one request; the hub's answer to it.
async fn push(gw: &Gateway, request: v1::PushRequest) -> Result<u64, tonic::Status> {
    let mut client = gw.client().await;
    let response = client
        .push(with(tokio_stream::iter(vec![request]), PUSHER))
        .await?;
    let ack = response
        .into_inner()
        .next()
        .await
        .expect("an answer to the request")?;
    Ok(ack.sequence)
}

fn request(incarnation: &str, records: Vec<v1::Record>, policies: Vec<String>) -> v1::PushRequest {
    v1::PushRequest {
        origin: "district-1".into(),
        stream: "footfall".into(),
        records,
        incarnation: incarnation.into(),
        policies,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_records_leave_the_hub_only_as_its_own_chain_could_make_them() {
    let broker = Mosquitto::start();
    let gw = Gateway::start(gateway_bin!(), &hub_config(broker.port));
    gw.wait_ready();
    let mut client = gw.client().await;
    let own = client
        .get_policy(with(v1::GetPolicyRequest {}, READER))
        .await
        .unwrap()
        .into_inner()
        .policy_hash;

    // A record shaped as the hub expects, but finer than its policy: a cell at resolution 15, a
    // grid corner of 1 m, milliseconds in the time, and a raw MAC padded to a pseudonym's shape.
    let fine = h3o::LatLng::new(52.3731, 4.8922)
        .unwrap()
        .to_cell(h3o::Resolution::Fifteen)
        .to_string();
    let padded = format!("{:0>32}", "3c22fb123456");
    let sent = record(
        1,
        &own,
        &[
            ("counter_id", "pc-01"),
            ("note", "ok"),
            ("mac", &padded),
            ("cell", &fine),
            ("area", "52.37312,4.89221"),
            ("undeclared", "x"),
        ],
    );
    assert_eq!(
        push(&gw, request("a1", vec![sent], Vec::new()))
            .await
            .unwrap(),
        1
    );
    let mut stream = client
        .subscribe(with(
            subscribe_request(&["footfall"], Position::Oldest(v1::Oldest {})),
            READER,
        ))
        .await
        .unwrap()
        .into_inner();
    let kept = loop {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the pushed record")
            .unwrap()
            .unwrap();
        if let Some(Event::Record(r)) = message.event {
            break r;
        }
    };
    let f = fields(&kept);
    let coarse = h3o::LatLng::new(52.3731, 4.8922)
        .unwrap()
        .to_cell(h3o::Resolution::Nine)
        .to_string();
    assert_eq!(f["cell"], coarse, "generalised to the hub's resolution");
    assert_eq!(f["area"], "52.37,4.89", "floored to the hub's step");
    assert_ne!(f["mac"], padded, "pseudonymised again under the hub's key");
    assert!(!f["mac"].contains("3c22fb123456"));
    assert!(!f.contains_key("undeclared"));
    assert_eq!(
        kept.event_time.unwrap().nanos,
        0,
        "floored to the hub's time bucket"
    );
    assert_eq!(kept.policy_hash, own);

    // What cannot be made to fit is refused whole, with the field named, and counted.
    let announced_doc = "{\"language_version\":1,\"streams\":[]}".to_owned();
    let announced_hash = hex(&Sha256::digest(announced_doc.as_bytes()));
    // Each: the record's fields, its policy hash, and what the refusal must name.
    type Hostile<'a> = (Vec<(&'a str, &'a str)>, String, &'a str);
    let hostile: Vec<Hostile<'_>> = vec![
        (vec![("cell", "52.3731,4.8922")], own.clone(), "cell"),
        (vec![("cell", "3c:22:fb:12:34:56")], own.clone(), "cell"),
        (vec![("mac", "3c:22:fb:12:34:56")], own.clone(), "mac"),
        (vec![("area", "somewhere")], own.clone(), "area"),
        (
            vec![("note", "ok")],
            "forged-policy-hash".into(),
            "policy hash",
        ),
        (vec![("note", "ok")], "a".repeat(5000), "policy hash"),
        (vec![("note", "ok")], "b".repeat(64), "policy hash"),
    ];
    for (i, (fields, hash, named)) in hostile.iter().enumerate() {
        let refused = push(
            &gw,
            request(&format!("h{i}"), vec![record(1, hash, fields)], Vec::new()),
        )
        .await
        .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{fields:?}: {refused:?}"
        );
        assert!(refused.message().contains(named), "{}", refused.message());
        assert!(
            !refused.message().contains("3c:22") && !refused.message().contains("52.37"),
            "a refusal names fields, never values: {}",
            refused.message()
        );
    }
    assert_eq!(
        gw.metric(
            "hubgate_push_records_total",
            &[("stream", "footfall"), ("outcome", "refused")]
        ),
        hostile.len() as f64
    );

    // A policy the origin announced, by its document, is accepted.
    let ok = record(1, &announced_hash, &[("note", "ok")]);
    assert_eq!(
        push(&gw, request("b1", vec![ok], vec![announced_doc]))
            .await
            .unwrap(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_push_is_refused_unless_the_configuration_allows_it() {
    let broker = Mosquitto::start();
    let open = Gateway::start(gateway_bin!(), &config(broker.port, "hub-open", HUB));
    let mut client = open.client().await;
    let refused = client
        .push(tokio_stream::iter(vec![request(
            "a1",
            Vec::new(),
            Vec::new(),
        )]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("push_without_tokens"));

    let allowing = config(broker.port, "hub-allowing", HUB)
        .replace("[grpc]\n", "[grpc]\npush_without_tokens = true\n");
    let allowing = Gateway::start(gateway_bin!(), &allowing);
    let mut client = allowing.client().await;
    let own = client
        .get_policy(v1::GetPolicyRequest {})
        .await
        .unwrap()
        .into_inner()
        .policy_hash;
    let response = client
        .push(tokio_stream::iter(vec![request(
            "a1",
            vec![record(1, &own, &[("note", "ok")])],
            Vec::new(),
        )]))
        .await
        .unwrap();
    let ack = response.into_inner().next().await.unwrap().unwrap();
    assert_eq!(ack.sequence, 1);
}

/// A request over the hub's message size limit is answered with the size error, not with a
/// call that ends without an ack; the call after it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_over_the_size_limit_is_told_so() {
    let broker = Mosquitto::start();
    let gw = Gateway::start(gateway_bin!(), &hub_config(broker.port));
    let own = gw
        .client()
        .await
        .get_policy(with(v1::GetPolicyRequest {}, READER))
        .await
        .unwrap()
        .into_inner()
        .policy_hash;
    let note = "n".repeat(2048);
    let big: Vec<v1::Record> = (1..=3000)
        .map(|s| record(s, &own, &[("note", note.as_str())]))
        .collect();
    let refused = push(&gw, request("a1", big, Vec::new())).await.unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(refused.message().contains("too large"), "{refused:?}");
    let small = vec![record(1, &own, &[("note", "ok")])];
    assert_eq!(
        push(&gw, request("a1", small, Vec::new())).await.unwrap(),
        1
    );
}
