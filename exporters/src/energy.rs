//! The energy the gateway process uses, measured where the host allows it and modelled where it
//! does not, always with the method stated.
//!
//! - **RAPL** (Intel and recent AMD, through the Linux powercap interface): each top-level zone
//!   `intel-rapl:N` has a cumulative `energy_uj` counter that wraps at `max_energy_range_uj`. The
//!   zones overlap (a `psys` platform zone contains the packages; the packages contain their core
//!   and uncore subzones), so they are never summed across levels: `psys` alone when the host has
//!   it, otherwise the top-level package zones. The counters are root-only on kernels patched for
//!   CVE-2020-8694; an unreadable counter means the model instead.
//! - **Model** (the Cloud Carbon Footprint method), where no sensor can be read (virtual machines,
//!   no permission): host watts = vCPUs × (idle + u × (max − idle)) with u the host's CPU
//!   utilisation, plus memory watts per GB of the process's resident memory. The default
//!   coefficients are Cloud Carbon Footprint's averages for AWS: 0.74 W idle and 3.5 W at full load
//!   per vCPU, 0.392 W per GB of memory.
//!
//! Either way the host's energy is attributed to the process by its share of the CPU time the host
//! spent active over the interval (P_process = P_host × ΔCPU_process / ΔCPU_active), the method of
//! Scaphandre and Kepler. CPU times come from `/proc/self/stat` and `/proc/stat`, in clock ticks of
//! 1/100 s (`USER_HZ`, fixed by the kernel's ABI).
//!
//! Uncertainty: RAPL is a model inside the processor, within a few per cent of wall power for the
//! package; the cloud coefficients are averages over instance types, good to perhaps a factor of
//! two for one machine. The attribution charges the process with idle power in proportion to its
//! share of the active time.
//!
//! Pure file reading with injectable roots (`/sys/class/powercap`, `/proc`), so tests run against
//! a fake tree; the caller samples it on a timer (a few small reads every few seconds).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Clock ticks per second of the CPU times in procfs (`USER_HZ`).
pub const TICKS_PER_SECOND: f64 = 100.0;

/// Coefficients of the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Coefficients {
    pub idle_watts_per_vcpu: f64,
    pub max_watts_per_vcpu: f64,
    pub memory_watts_per_gb: f64,
}

impl Default for Coefficients {
    /// Cloud Carbon Footprint's averages for AWS.
    fn default() -> Self {
        Self {
            idle_watts_per_vcpu: 0.74,
            max_watts_per_vcpu: 3.5,
            memory_watts_per_gb: 0.392,
        }
    }
}

/// CPU time counters, in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// User and system time of the process.
    pub process: u64,
    /// Time the host's CPUs were busy (not idle, not waiting for I/O), all CPUs together.
    pub active: u64,
    /// All of the host's CPU time.
    pub total: u64,
}

/// Reads the process's and the host's CPU times under `proc_root` (normally `/proc`).
pub fn read_cpu(proc_root: &Path) -> io::Result<CpuTimes> {
    let stat = fs::read_to_string(proc_root.join("self/stat"))?;
    // The command name is in parentheses and may itself hold spaces and parentheses.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| invalid("no command name in /proc/self/stat"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: state (index 0), …, utime (11), stime (12).
    let tick = |i: usize| -> io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| invalid("short /proc/self/stat"))
    };
    let process = tick(11)? + tick(12)?;
    let host = fs::read_to_string(proc_root.join("stat"))?;
    let cpu = host
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| invalid("no cpu line in /proc/stat"))?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let ticks: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let total: u64 = ticks.iter().sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    Ok(CpuTimes {
        process,
        active: total.saturating_sub(idle),
        total,
    })
}

/// Resident memory of the process under `proc_root`, in bytes (`VmRSS`).
pub fn read_rss(proc_root: &Path) -> io::Result<u64> {
    let status = fs::read_to_string(proc_root.join("self/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| invalid("no VmRSS in /proc/self/status"))
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

#[derive(Debug)]
struct Zone {
    name: String,
    counter: PathBuf,
    max_range_uj: u64,
    last_uj: u64,
}

/// The RAPL zones whose energy is the host's, without overlap.
#[derive(Debug)]
pub struct Rapl {
    zones: Vec<Zone>,
}

fn read_u64(path: &Path) -> io::Result<u64> {
    fs::read_to_string(path)?
        .trim()
        .parse()
        .map_err(|_| invalid("not a number"))
}

impl Rapl {
    /// Finds the zones under `powercap_root` (normally `/sys/class/powercap`) and reads each once.
    /// The error says why RAPL cannot be used.
    pub fn discover(powercap_root: &Path) -> Result<Self, String> {
        let entries =
            fs::read_dir(powercap_root).map_err(|e| format!("no powercap interface ({e})"))?;
        let mut top: Vec<(String, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let dir = e.file_name().to_string_lossy().into_owned();
                // Top-level zones are `intel-rapl:N`; `intel-rapl:N:M` are their subzones.
                let top_level = dir.starts_with("intel-rapl:") && dir.matches(':').count() == 1;
                top_level.then(|| (dir, e.path()))
            })
            .collect();
        top.sort();
        let named: Vec<(String, PathBuf)> = top
            .into_iter()
            .map(|(dir, path)| {
                let name =
                    fs::read_to_string(path.join("name")).map_or(dir, |n| n.trim().to_owned());
                (name, path)
            })
            .collect();
        // The platform zone holds the packages: take it alone when present.
        let chosen: Vec<(String, PathBuf)> = match named.iter().find(|(n, _)| n == "psys") {
            Some(psys) => vec![psys.clone()],
            None => named,
        };
        if chosen.is_empty() {
            return Err("no RAPL zones".into());
        }
        let mut zones = Vec::new();
        for (name, path) in chosen {
            let counter = path.join("energy_uj");
            let last_uj = read_u64(&counter)
                .map_err(|e| format!("{} is not readable ({e})", counter.display()))?;
            let max_range_uj = read_u64(&path.join("max_energy_range_uj"))
                .map_err(|e| format!("no max_energy_range_uj for zone {name} ({e})"))?;
            zones.push(Zone {
                name,
                counter,
                max_range_uj,
                last_uj,
            });
        }
        Ok(Self { zones })
    }

    /// Names of the zones read.
    pub fn zones(&self) -> Vec<&str> {
        self.zones.iter().map(|z| z.name.as_str()).collect()
    }

    /// Joules the zones used since the last sample, across a counter wrap.
    pub fn sample(&mut self) -> io::Result<f64> {
        let mut microjoules = 0u64;
        for zone in &mut self.zones {
            let now = read_u64(&zone.counter)?;
            microjoules += if now >= zone.last_uj {
                now - zone.last_uj
            } else {
                // Wrapped: up to the maximum, then from zero.
                zone.max_range_uj.saturating_sub(zone.last_uj) + now
            };
            zone.last_uj = now;
        }
        Ok(microjoules as f64 / 1e6)
    }
}

/// How the meter gets the host's energy.
#[derive(Debug)]
pub enum Method {
    Rapl(Rapl),
    /// The model, and why no sensor is used.
    Model {
        reason: String,
    },
}

/// What one sample found for the process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Energy attributed to the process over the interval.
    pub joules: f64,
    /// CPU time the process used over the interval.
    pub cpu_seconds: f64,
}

/// The process's energy meter.
#[derive(Debug)]
pub struct Meter {
    method: Method,
    coefficients: Coefficients,
    vcpus: f64,
    proc_root: PathBuf,
    last: CpuTimes,
}

impl Meter {
    /// A meter reading RAPL under `powercap_root` when it can, else the model with `vcpus` CPUs.
    pub fn new(
        powercap_root: &Path,
        proc_root: &Path,
        coefficients: Coefficients,
        vcpus: usize,
    ) -> io::Result<Self> {
        let method = match Rapl::discover(powercap_root) {
            Ok(rapl) => Method::Rapl(rapl),
            Err(reason) => Method::Model { reason },
        };
        Ok(Self {
            method,
            coefficients,
            vcpus: vcpus as f64,
            last: read_cpu(proc_root)?,
            proc_root: proc_root.to_owned(),
        })
    }

    pub fn method(&self) -> &Method {
        &self.method
    }

    /// `rapl` or `model`.
    pub fn method_name(&self) -> &'static str {
        match self.method {
            Method::Rapl(_) => "rapl",
            Method::Model { .. } => "model",
        }
    }

    pub fn coefficients(&self) -> Coefficients {
        self.coefficients
    }

    /// The process's energy and CPU time since the last sample, `elapsed_seconds` ago.
    pub fn sample(&mut self, elapsed_seconds: f64) -> io::Result<Sample> {
        let now = read_cpu(&self.proc_root)?;
        let process = now.process.saturating_sub(self.last.process) as f64;
        let active = now.active.saturating_sub(self.last.active) as f64;
        let total = now.total.saturating_sub(self.last.total) as f64;
        self.last = now;
        let c = self.coefficients;
        let (host_joules, memory_joules) = match &mut self.method {
            Method::Rapl(rapl) => (rapl.sample()?, 0.0),
            Method::Model { .. } => {
                let utilisation = if total > 0.0 { active / total } else { 0.0 };
                let watts = self.vcpus
                    * (c.idle_watts_per_vcpu
                        + utilisation * (c.max_watts_per_vcpu - c.idle_watts_per_vcpu));
                let gb = read_rss(&self.proc_root)? as f64 / 1e9;
                (
                    watts * elapsed_seconds,
                    c.memory_watts_per_gb * gb * elapsed_seconds,
                )
            }
        };
        let share = if active > 0.0 {
            (process / active).min(1.0)
        } else {
            0.0
        };
        Ok(Sample {
            joules: host_joules * share + memory_joules,
            cpu_seconds: process / TICKS_PER_SECOND,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `/proc` with the given CPU ticks and resident memory.
    fn fake_proc(root: &Path, process: (u64, u64), host: [u64; 8], rss_kib: u64) {
        fs::create_dir_all(root.join("self")).unwrap();
        // A command name with spaces and parentheses, as a process may have.
        fs::write(
            root.join("self/stat"),
            format!(
                "4242 (hub gate (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 {} {} 0 0 20 0 8 0",
                process.0, process.1
            ),
        )
        .unwrap();
        let host: Vec<String> = host.iter().map(u64::to_string).collect();
        fs::write(
            root.join("stat"),
            format!("cpu  {} 0 0\ncpu0 1 2 3\n", host.join(" ")),
        )
        .unwrap();
        fs::write(
            root.join("self/status"),
            format!("Name:\thubgate\nVmRSS:\t   {rss_kib} kB\n"),
        )
        .unwrap();
    }

    fn zone(root: &Path, dir: &str, name: &str, energy: u64, max: u64) {
        let z = root.join(dir);
        fs::create_dir_all(&z).unwrap();
        fs::write(z.join("name"), format!("{name}\n")).unwrap();
        fs::write(z.join("energy_uj"), format!("{energy}\n")).unwrap();
        fs::write(z.join("max_energy_range_uj"), format!("{max}\n")).unwrap();
    }

    #[test]
    fn cpu_times_are_parsed_past_an_awkward_command_name() {
        let dir = tempfile::tempdir().unwrap();
        fake_proc(dir.path(), (120, 30), [100, 5, 50, 800, 40, 3, 2, 0], 2048);
        let cpu = read_cpu(dir.path()).unwrap();
        assert_eq!(cpu.process, 150);
        assert_eq!(cpu.total, 1000);
        assert_eq!(cpu.active, 1000 - 800 - 40);
        assert_eq!(read_rss(dir.path()).unwrap(), 2048 * 1024);
    }

    #[test]
    fn rapl_counters_wrap_and_overlapping_zones_are_not_summed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // Two packages, each with a core subzone that overlaps it.
        zone(root, "intel-rapl:0", "package-0", 900_000, 1_000_000);
        zone(root, "intel-rapl:0:0", "core", 500_000, 1_000_000);
        zone(root, "intel-rapl:1", "package-1", 100_000, 1_000_000);
        let mut rapl = Rapl::discover(root).unwrap();
        assert_eq!(rapl.zones(), ["package-0", "package-1"]);
        // package-0 wraps: 900,000 → 1,000,000 → 50,000 is 150,000 µJ; package-1 gains 200,000.
        fs::write(root.join("intel-rapl:0/energy_uj"), "50000").unwrap();
        fs::write(root.join("intel-rapl:1/energy_uj"), "300000").unwrap();
        fs::write(root.join("intel-rapl:0:0/energy_uj"), "999999").unwrap();
        let joules = rapl.sample().unwrap();
        assert!((joules - 0.35).abs() < 1e-9, "{joules}");

        // With a platform zone, it alone is the host.
        zone(root, "intel-rapl:2", "psys", 10, 1_000_000);
        let rapl = Rapl::discover(root).unwrap();
        assert_eq!(rapl.zones(), ["psys"]);
    }

    #[test]
    fn an_unreadable_counter_falls_back_to_the_model_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (sys, proc_root) = (dir.path().join("sys"), dir.path().join("proc"));
        fake_proc(&proc_root, (0, 0), [0; 8], 0);
        // A counter that cannot be read (permission denied looks the same to the meter).
        fs::create_dir_all(sys.join("intel-rapl:0/energy_uj")).unwrap();
        fs::write(sys.join("intel-rapl:0/name"), "package-0").unwrap();
        let meter = Meter::new(&sys, &proc_root, Coefficients::default(), 2).unwrap();
        assert_eq!(meter.method_name(), "model");
        let Method::Model { reason } = meter.method() else {
            panic!()
        };
        assert!(reason.contains("energy_uj is not readable"), "{reason}");
        // No powercap at all.
        let meter = Meter::new(
            &dir.path().join("none"),
            &proc_root,
            Coefficients::default(),
            2,
        )
        .unwrap();
        assert_eq!(meter.method_name(), "model");
    }

    #[test]
    fn the_model_gives_the_golden_value() {
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path().join("proc");
        fake_proc(&proc_root, (0, 0), [0; 8], 0);
        let mut meter = Meter::new(
            &dir.path().join("none"),
            &proc_root,
            Coefficients::default(),
            2,
        )
        .unwrap();
        // Over 10 s on 2 vCPUs (2,000 ticks): the host busy half the time (1,000 ticks), the
        // process 500 of them; 0.5 GB resident.
        fake_proc(
            &proc_root,
            (400, 100),
            [800, 0, 200, 1000, 0, 0, 0, 0],
            500_000_000 / 1024,
        );
        let sample = meter.sample(10.0).unwrap();
        // Host: 2 × (0.74 + 0.5 × (3.5 − 0.74)) W × 10 s = 42.4 J; the process's share is half:
        // 21.2 J. Memory: 0.392 W/GB × 0.5 GB × 10 s = 1.96 J (to the rounding of the KiB).
        let expected = 21.2 + 0.392 * (500_000_000 / 1024 * 1024) as f64 / 1e9 * 10.0;
        assert!((sample.joules - expected).abs() < 1e-9, "{sample:?}");
        assert!((sample.cpu_seconds - 5.0).abs() < 1e-12);
    }

    #[test]
    fn rapl_energy_is_shared_by_cpu_time() {
        let dir = tempfile::tempdir().unwrap();
        let (sys, proc_root) = (dir.path().join("sys"), dir.path().join("proc"));
        zone(&sys, "intel-rapl:0", "package-0", 0, 1 << 40);
        fake_proc(&proc_root, (0, 0), [0; 8], 1024);
        let mut meter = Meter::new(&sys, &proc_root, Coefficients::default(), 2).unwrap();
        assert_eq!(meter.method_name(), "rapl");
        // 40 J on the package; the process used a quarter of the active time.
        fs::write(sys.join("intel-rapl:0/energy_uj"), "40000000").unwrap();
        fake_proc(&proc_root, (100, 0), [400, 0, 0, 600, 0, 0, 0, 0], 1024);
        let sample = meter.sample(5.0).unwrap();
        assert!((sample.joules - 10.0).abs() < 1e-9, "{sample:?}");
        // An idle interval costs the process nothing.
        let sample = meter.sample(5.0).unwrap();
        assert_eq!(sample.joules, 0.0);
    }
}
