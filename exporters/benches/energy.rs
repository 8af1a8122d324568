//! What one reading of the energy meter costs (it runs every 5 s).
//!
//! `cargo bench -p hubgate-exporters --bench energy`

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use hubgate_exporters::energy::{Coefficients, Meter};

fn benches(c: &mut Criterion) {
    let mut meter = Meter::new(
        Path::new("/sys/class"),
        Path::new("/proc"),
        Coefficients::default(),
        2,
    )
    .expect("procfs");
    eprintln!("energy meter method: {}", meter.method_name());
    c.bench_function("energy_meter_sample", |b| {
        b.iter(|| black_box(meter.sample(5.0).expect("sample")))
    });
}

criterion_group!(energy_benches, benches);
criterion_main!(energy_benches);
