//! Messages too large to read: acknowledged unread, so that one cannot wedge the session.
//!
//! The MQTT client reads a whole packet into memory before it parses it, so it refuses packets
//! over [`crate::config::MqttConfig::read_limit`] and drops the connection. A broker without a packet limit
//! (mosquitto's default) then delivers the same message first on every reconnect, and nothing
//! behind it is ever read. When the connection fails on such a packet, [`skip`] connects once
//! more with the same client id and session, reads what the broker sends by streaming it (the
//! payload is never held), acknowledges the messages over the limit (counted as oversized) and
//! disconnects without acknowledging any other: the main connection then takes those again.
//!
//! It speaks the few packets of MQTT 3.1.1 it needs: CONNECT, CONNACK, PUBLISH, PUBACK,
//! DISCONNECT. Topics are not logged (their levels may name a device): the subscription that
//! matched is.

use std::sync::Arc;
use std::time::Duration;

use hubgate_privacy::topic::TopicFilter;
use rumqttc::tokio_rustls::TlsConnector;
use rumqttc::tokio_rustls::rustls::ClientConfig;
use rumqttc::tokio_rustls::rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// How long to wait for the broker's next packet before the skip is over: by then it has sent
/// every message it will send before acknowledgements (mosquitto's in-flight window).
const IDLE: Duration = Duration::from_millis(750);

/// The longest any single read may stall in the middle of a packet.
const STALL: Duration = Duration::from_secs(10);

/// How to reach the broker as the gateway's session.
#[derive(Clone)]
pub struct Session {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: Option<Arc<ClientConfig>>,
    pub keep_alive: Duration,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No password, and the TLS configuration holds a key.
        f.debug_struct("Session")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What a skip did: for each message acknowledged unread, its size and the subscription filter
/// its topic matched (or `None` if none did).
#[derive(Debug, Default)]
pub struct Skipped {
    pub messages: Vec<(usize, Option<String>)>,
}

/// Connects as `session`, acknowledges every message the broker sends whose packet is larger
/// than `limit` bytes, leaves the others unacknowledged, and disconnects once the broker is idle.
pub async fn skip(session: &Session, limit: usize, filters: &[String]) -> std::io::Result<Skipped> {
    let tcp = tokio::net::TcpStream::connect((session.host.as_str(), session.port)).await?;
    tcp.set_nodelay(true)?;
    let mut stream: Box<dyn Io> = match &session.tls {
        None => Box::new(tcp),
        Some(config) => {
            let name = ServerName::try_from(session.host.clone())
                .map_err(|e| std::io::Error::other(format!("broker host name: {e}")))?;
            Box::new(
                TlsConnector::from(Arc::clone(config))
                    .connect(name, tcp)
                    .await?,
            )
        }
    };
    stream.write_all(&connect_packet(session)).await?;
    let (kind, len) = within(STALL, header(&mut stream)).await?;
    let mut connack = vec![0; len];
    within(STALL, stream.read_exact(&mut connack)).await?;
    if kind >> 4 != 2 || connack.get(1) != Some(&0) {
        return Err(std::io::Error::other("the broker refused the connection"));
    }
    let mut skipped = Skipped::default();
    while let Ok(read) = tokio::time::timeout(IDLE, header(&mut stream)).await {
        let (kind, len) = read?;
        if kind >> 4 != 3 {
            within(STALL, discard(&mut stream, len)).await?;
            continue;
        }
        let qos = (kind >> 1) & 3;
        let mut topic_len = [0; 2];
        within(STALL, stream.read_exact(&mut topic_len)).await?;
        let topic_len = usize::from(u16::from_be_bytes(topic_len));
        let mut topic = vec![0; topic_len.min(len)];
        within(STALL, stream.read_exact(&mut topic)).await?;
        let mut pkid = [0; 2];
        if qos > 0 {
            within(STALL, stream.read_exact(&mut pkid)).await?;
        }
        let rest = len.saturating_sub(2 + topic.len() + if qos > 0 { 2 } else { 0 });
        within(STALL, discard(&mut stream, rest)).await?;
        // The packet's whole size, as the client's limit counts it (its remaining length).
        if len > limit {
            if qos > 0 {
                stream.write_all(&[0x40, 0x02, pkid[0], pkid[1]]).await?;
            }
            let topic = String::from_utf8_lossy(&topic);
            let filter = subscription_of(filters, &topic).cloned();
            skipped.messages.push((len, filter));
        }
    }
    stream.write_all(&[0xE0, 0x00]).await?;
    stream.flush().await?;
    let _ = stream.shutdown().await;
    Ok(skipped)
}

async fn within<T>(
    limit: Duration,
    io: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(limit, io)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// Reads a fixed header: the packet's type and flags, and its remaining length.
async fn header(stream: &mut Box<dyn Io>) -> std::io::Result<(u8, usize)> {
    let kind = stream.read_u8().await?;
    let mut len = 0usize;
    for shift in [0, 7, 14, 21] {
        let byte = within(STALL, stream.read_u8()).await?;
        len |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok((kind, len));
        }
    }
    Err(std::io::Error::other("malformed remaining length"))
}

/// Reads and forgets `n` bytes, a buffer at a time.
async fn discard(stream: &mut Box<dyn Io>, n: usize) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut stream.take(n as u64), &mut tokio::io::sink()).await?;
    if copied < n as u64 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// CONNECT for MQTT 3.1.1 with a persistent session (`clean_session = false`).
fn connect_packet(session: &Session) -> Vec<u8> {
    let mut flags = 0u8;
    let mut payload = Vec::new();
    put_str(&mut payload, session.client_id.as_bytes());
    if let Some(user) = &session.username {
        flags |= 0x80;
        put_str(&mut payload, user.as_bytes());
        if let Some(password) = &session.password {
            flags |= 0x40;
            put_str(&mut payload, password.as_bytes());
        }
    }
    let keep_alive = u16::try_from(session.keep_alive.as_secs()).unwrap_or(u16::MAX);
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend_from_slice(&payload);
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    packet
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&s[..usize::from(len)]);
}

/// The first of `filters` (subscriptions, perhaps `$share/<group>/…`) that `topic` matches.
fn subscription_of<'a>(filters: &'a [String], topic: &str) -> Option<&'a String> {
    filters.iter().find(|subscription| {
        let filter = match subscription.strip_prefix("$share/") {
            Some(rest) => rest.split_once('/').map_or("", |(_, f)| f),
            None => subscription.as_str(),
        };
        TopicFilter::new(filter).is_ok_and(|f| f.matches(topic))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_is_named_by_the_subscription_it_matches() {
        let filters = [
            "city/air/+/reading".to_owned(),
            "$share/hubs/city/+".to_owned(),
        ];
        assert_eq!(
            subscription_of(&filters, "city/air/s1/reading"),
            Some(&filters[0])
        );
        assert_eq!(subscription_of(&filters, "city/noise"), Some(&filters[1]));
        assert_eq!(subscription_of(&filters, "city/air/s1/reading/x"), None);
        assert_eq!(subscription_of(&filters, "town/noise"), None);
    }

    #[test]
    fn the_connect_packet_asks_for_the_persistent_session() {
        let session = Session {
            host: "localhost".into(),
            port: 1883,
            client_id: "gw".into(),
            username: Some("u".into()),
            password: Some("p".into()),
            tls: None,
            keep_alive: Duration::from_secs(30),
        };
        let packet = connect_packet(&session);
        assert_eq!(packet[0], 0x10);
        assert_eq!(usize::from(packet[1]), packet.len() - 2);
        assert_eq!(&packet[2..9], &[0, 4, b'M', b'Q', b'T', b'T', 4]);
        // user name and password, clean session off
        assert_eq!(packet[9], 0xC0);
        assert_eq!(&packet[12..16], &[0, 2, b'g', b'w']);
    }
}
