//! The admin HTTP endpoints. The operator's: `/metrics` (Prometheus text format), `/healthz` (the
//! process is up), `/readyz` (the MQTT connection is up and outbox commits succeed; else 503 with
//! the reason). The public's: the transparency register
//! of the running policy (see [`crate::governance::register`]): `/transparency` (the HTML notice),
//! `/transparency.json`, `/transparency.ngsi-ld.json` (Smart Data Models `PrivacyObject`
//! entities) and `/processing-record` (GDPR Art. 30, Markdown).
//!
//! With `admin.public_listen`, the notice is served on a listener of its own, which serves nothing
//! else: whoever is meant to read the notice cannot read the operator's counters, which show
//! traffic as it comes. Without it, both are served on `admin.listen`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::governance::register::{Register, html};
use crate::sinks::guarded::{Bounds, GuardedListener};

/// Serves the operator's endpoints on `listener`, and the notice on `public` (or on `listener`
/// too when there is no public listener), until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    public: Option<TcpListener>,
    (mqtt_connected, outbox_failing): (watch::Receiver<bool>, watch::Receiver<Option<String>>),
    register: Arc<Register>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let operator = operator(mqtt_connected, outbox_failing);
    let listener = GuardedListener::new(listener, BOUNDS);
    let Some(public) = public else {
        let app = operator.merge(notice(register));
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await?;
        return Ok(());
    };
    let operator = axum::serve(listener, operator)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .into_future();
    let notice = axum::serve(GuardedListener::new(public, BOUNDS), notice(register))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .into_future();
    tokio::try_join!(operator, notice)?;
    Ok(())
}

/// Each admin listener holds at most 64 connections, and closes one that sends nothing for 10 s
/// (half a request, or nothing at all): a scrape or a page view sends its request at once.
const BOUNDS: Bounds = Bounds {
    max_connections: 64,
    idle: std::time::Duration::from_secs(10),
};

/// The transparency notice's routes.
fn notice(register: Arc<Register>) -> Router {
    let json = Arc::new(register.to_json());
    let record = Arc::new(register.to_art30());
    let ngsi_ld = Arc::new(register.to_ngsi_ld());
    Router::new()
        .route(
            "/transparency",
            get(move |headers: HeaderMap| {
                let register = Arc::clone(&register);
                async move {
                    let url = page_url(&register, &headers);
                    (
                        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                        html::render(&register, &url),
                    )
                }
            }),
        )
        .route("/transparency.json", fixed(json, "application/json"))
        .route(
            "/transparency.ngsi-ld.json",
            fixed(ngsi_ld, "application/ld+json"),
        )
        .route(
            "/processing-record",
            fixed(record, "text/markdown; charset=utf-8"),
        )
}

/// A route that answers with `body`, made once, as `content_type`.
fn fixed(body: Arc<String>, content_type: &'static str) -> axum::routing::MethodRouter {
    get(move || {
        let body = Arc::clone(&body);
        async move {
            (
                [(header::CONTENT_TYPE, content_type)],
                body.as_str().to_owned(),
            )
        }
    })
}

/// The operator's routes: telemetry and health.
fn operator(
    mqtt_connected: watch::Receiver<bool>,
    outbox_failing: watch::Receiver<Option<String>>,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let connected = *mqtt_connected.borrow();
                let failing = outbox_failing.borrow().clone();
                async move {
                    match (connected, failing) {
                        (_, Some(reason)) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!(
                                "outbox commits are failing ({reason}); messages stay unacknowledged until they succeed\n"
                            ),
                        ),
                        (false, None) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not connected to the MQTT broker\n".to_owned(),
                        ),
                        (true, None) => (StatusCode::OK, "ready\n".to_owned()),
                    }
                }
            }),
        )
}

/// The page's own address, for its QR code: the configured public address, else the address the
/// client used.
fn page_url(register: &Register, headers: &HeaderMap) -> String {
    if let Some(url) = &register.public_url {
        return url.clone();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("localhost");
    format!("http://{host}/transparency")
}

async fn metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        hubgate_exporters::prometheus::render(),
    )
}

/// Binds the admin listener, with a clear error when the address is taken.
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        anyhow::anyhow!("cannot listen for admin HTTP on {addr}: {e} (set [admin] listen to a free address, or port 0)")
    })?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}
