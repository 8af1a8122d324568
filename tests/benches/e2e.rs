//! The end-to-end benchmark (see BENCHMARKS.md):
//!
//! ```text
//! cargo bench -p hubgate-tests --bench e2e                 # about 1.5 minutes after the build
//! cargo bench -p hubgate-tests --bench e2e -- --soak 600   # and a 10-minute soak at 50,000/s
//! cargo bench -p hubgate-tests --bench e2e -- --phase 20 --devices 10000 --connections 2
//! cargo bench -p hubgate-tests --bench e2e -- --extra-config store.toml   # e.g. [store] tuning
//! cargo bench -p hubgate-tests --bench e2e -- --gateway /path/to/hubgate-e2e-gateway  # A/B
//! ```
//!
//! `--gateway` runs another build of `hubgate-e2e-gateway` (for example one of an earlier
//! commit) under the same harness, to compare two builds on one machine.
//!
//! Needs `mosquitto` on PATH. Prints one table.

use std::time::Duration;

use hubgate_tests::bench::{self, Settings};

fn main() {
    let mut settings = Settings::default();
    let mut gateway = std::path::PathBuf::from(env!("CARGO_BIN_EXE_hubgate-e2e-gateway"));
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} wants a number"))
        };
        match arg.as_str() {
            "--phase" => settings.phase = Duration::from_secs(number("--phase")),
            "--devices" => settings.devices = number("--devices") as u32,
            "--connections" => settings.connections = number("--connections") as usize,
            "--soak" => settings.soak = Some(Duration::from_secs(number("--soak"))),
            "--extra-config" => {
                let path = args.next().expect("--extra-config wants a file");
                settings.extra_config = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
            }
            "--gateway" => gateway = args.next().expect("--gateway wants a path").into(),
            "--broker-inflight" => settings.broker_inflight = number("--broker-inflight") as u32,
            "--rates" => {
                settings.rates = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .filter(|r| *r != "none")
                    .map(|r| {
                        r.parse()
                            .expect("--rates wants numbers (10000,50000) or none")
                    })
                    .collect();
            }
            // cargo bench passes --bench; the rest are cargo's filters.
            _ => {}
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    eprintln!(
        "hubgate end-to-end benchmark: phases of {:?}, {} devices, {} connections, rates {:?}",
        settings.phase, settings.devices, settings.connections, settings.rates
    );
    eprintln!("gateway: {}", gateway.display());
    let figures = runtime.block_on(bench::run(&gateway, &settings));
    println!("{}", figures.table(&settings));
}
