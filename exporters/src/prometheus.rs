//! Prometheus text exposition of the process's metrics.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns a handle that renders it.
///
/// Safe to call more than once: later calls return the same handle. If another recorder was
/// installed first, metrics go there and the handle renders an empty page.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            match builder.install_recorder() {
                Ok(handle) => {
                    crate::catalogue::describe();
                    handle
                }
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Renders the current metrics in the Prometheus text format.
pub fn render() -> String {
    install().render()
}
