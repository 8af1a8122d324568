//! A Rust client of hubgate's gRPC API: subscribes to streams and prints each record, resuming
//! after the last sequence printed when the connection breaks.
//!
//! ```text
//! cargo run -p hubgate-tests --example subscribe -- http://127.0.0.1:50051 air_quality noise
//! HUBGATE_TOKEN=hg_... cargo run -p hubgate-tests --example subscribe -- http://127.0.0.1:50051
//! ```
//!
//! The first argument is the gateway's address; the others are streams (none: every stream the
//! token may read). A token, when the gateway wants one, comes from `HUBGATE_TOKEN`.

use std::collections::HashMap;
use std::time::Duration;

use hubgate_proto::v1::gateway_client::GatewayClient;
use hubgate_proto::v1::start_position::Position;
use hubgate_proto::v1::{self, subscribe_response::Event, value::Kind};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::metadata::MetadataValue;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let target = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:50051".to_owned());
    let streams: Vec<String> = args.collect();
    let token = std::env::var("HUBGATE_TOKEN").ok();
    // Per stream, the next sequence to ask for after a reconnect.
    let mut resume: HashMap<String, u64> = HashMap::new();
    let mut backoff = Duration::from_millis(500);
    loop {
        let mut client = match GatewayClient::connect(target.clone()).await {
            Ok(client) => client,
            Err(err) => {
                eprintln!("cannot connect to {target}: {err}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        if resume.is_empty() {
            // Where each stream stands now: after a reconnect, a stream that had no record yet
            // resumes from here rather than from "live", which would skip what was kept meanwhile.
            if let Ok(listed) = client
                .list_streams(authorized(v1::ListStreamsRequest {}, token.as_deref())?)
                .await
            {
                for info in listed.into_inner().streams {
                    if streams.is_empty() || streams.contains(&info.name) {
                        resume.insert(info.name, info.last_sequence + 1);
                    }
                }
            }
        }
        let request = authorized(
            v1::SubscribeRequest {
                streams: streams.clone(),
                start: Some(v1::StartPosition {
                    position: Some(Position::Live(v1::Live {})),
                }),
                from_sequence: resume.clone(),
            },
            token.as_deref(),
        )?;
        let mut events = match client.subscribe(request).await {
            Ok(response) => response.into_inner(),
            Err(status)
                if matches!(
                    status.code(),
                    Code::Unauthenticated | Code::PermissionDenied | Code::NotFound
                ) =>
            {
                eprintln!("refused: {:?}: {}", status.code(), status.message());
                std::process::exit(2);
            }
            Err(status) => {
                eprintln!("subscribe failed: {status}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        backoff = Duration::from_millis(500);
        while let Some(event) = events.next().await {
            match event.map(|e| e.event) {
                Ok(Some(Event::Record(record))) => {
                    let mut fields: Vec<String> = record
                        .fields
                        .iter()
                        .map(|(path, value)| {
                            let text = match &value.kind {
                                Some(Kind::StringValue(s)) => format!("{s:?}"),
                                Some(Kind::IntValue(i)) => i.to_string(),
                                Some(Kind::DoubleValue(d)) => d.to_string(),
                                Some(Kind::BoolValue(b)) => b.to_string(),
                                None => "null".to_owned(),
                            };
                            format!("{path}={text}")
                        })
                        .collect();
                    fields.sort();
                    println!(
                        "{} #{} {}",
                        record.stream,
                        record.sequence,
                        fields.join(" ")
                    );
                    resume.insert(record.stream, record.sequence + 1);
                }
                Ok(Some(Event::Gap(gap))) => {
                    println!(
                        "{}: records {}..={} are no longer held",
                        gap.stream, gap.first_sequence, gap.last_sequence
                    );
                    resume.insert(gap.stream, gap.last_sequence + 1);
                }
                Ok(None) => {}
                Err(status) => {
                    eprintln!("stream ended: {status}; resuming");
                    break;
                }
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

/// `message` as a request carrying `token`, if there is one.
fn authorized<T>(
    message: T,
    token: Option<&str>,
) -> Result<tonic::Request<T>, Box<dyn std::error::Error>> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {token}"))?,
        );
    }
    Ok(request)
}
