//! Prometheus text exposition of the process's metrics.
//!
//! The `metrics` crate's counters are integers; quantities measured in fractions of their base
//! unit (joules) are kept here as floating-point counters and appended to the page.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock, PoisonError};

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

/// Floating-point counters: name → (help, value).
static FLOAT_COUNTERS: Mutex<BTreeMap<&'static str, (&'static str, f64)>> =
    Mutex::new(BTreeMap::new());

/// Adds `value` (≥ 0) to the floating-point counter `name`, creating it with `help`.
pub fn add_float_counter(name: &'static str, help: &'static str, value: f64) {
    if !(value.is_finite() && value >= 0.0) {
        return;
    }
    let mut counters = FLOAT_COUNTERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    counters.entry(name).or_insert((help, 0.0)).1 += value;
}

/// The current value of a floating-point counter (0 before its first addition).
pub fn float_counter(name: &str) -> f64 {
    FLOAT_COUNTERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(name)
        .map_or(0.0, |(_, v)| *v)
}

/// Renders the current metrics in the Prometheus text format.
pub fn render() -> String {
    let mut page = install().render();
    let counters = FLOAT_COUNTERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    for (name, (help, value)) in counters.iter() {
        page.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n\n"
        ));
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_counters_add_up_and_render_as_counters() {
        add_float_counter("hubgate_test_joules_total", "a test", 0.25);
        add_float_counter("hubgate_test_joules_total", "a test", 0.5);
        add_float_counter("hubgate_test_joules_total", "a test", -3.0);
        add_float_counter("hubgate_test_joules_total", "a test", f64::NAN);
        assert_eq!(float_counter("hubgate_test_joules_total"), 0.75);
        let page = render();
        assert!(
            page.contains(
                "# TYPE hubgate_test_joules_total counter\nhubgate_test_joules_total 0.75\n"
            ),
            "{page}"
        );
    }
}
