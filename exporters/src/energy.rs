//! The energy the gateway process uses, measured where the host allows it and modelled where it
//! does not, always with the method stated.
//!
//! - **RAPL** (Intel and recent AMD, through the Linux powercap interface): each top-level zone
//!   `intel-rapl:N` has a cumulative `energy_uj` counter that wraps at `max_energy_range_uj`. The
//!   zones overlap (a `psys` platform zone contains the packages; the packages contain their core
//!   and uncore subzones), so they are never summed across levels: `psys` alone when the host has
//!   it, otherwise the top-level package zones. The counters are root-only on kernels patched for
//!   CVE-2020-8694; an unreadable counter means hwmon or the model instead.
//! - **hwmon**, where RAPL cannot be read: the processors' socket energy counters that some
//!   hwmon drivers expose (`amd_energy`, `zenergy`: `energyN_input` in µJ, labelled `Esocket…`),
//!   64-bit accumulators that start over only when the driver reloads. Their per-core counters
//!   are inside the socket's and are never added to it.
//! - **Model** (the Cloud Carbon Footprint method), where neither can be read (virtual machines,
//!   no permission): host watts = vCPUs × (idle + u × (max − idle)) with u the host's CPU
//!   utilisation, plus memory watts per GB of the process's resident memory. The default
//!   coefficients are Cloud Carbon Footprint's averages for AWS: 0.74 W idle and 3.5 W at full load
//!   per vCPU, 0.392 W per GB of memory.
//!
//! Whatever the method, the host's energy is attributed to the process by its share of the CPU time the host
//! spent active over the interval (P_process = P_host × ΔCPU_process / ΔCPU_active), the method of
//! Scaphandre and Kepler. CPU times come from `/proc/self/stat` and `/proc/stat`, in clock ticks of
//! 1/100 s (`USER_HZ`, fixed by the kernel's ABI).
//!
//! Uncertainty: RAPL is a model inside the processor, within a few per cent of wall power for the
//! package; the cloud coefficients are averages over instance types, good to perhaps a factor of
//! two for one machine. The attribution charges the process with idle power in proportion to its
//! share of the active time.
//!
//! Pure file reading with injectable roots (`/sys/class`, `/proc`), so tests run against
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
    /// Where a RAPL counter wraps to zero; `None` for a 64-bit hwmon accumulator, which only
    /// starts over when its driver is reloaded.
    max_range_uj: Option<u64>,
    last_uj: u64,
}

/// Cumulative energy counters that together are the host's energy, without overlap: RAPL zones
/// or hwmon socket counters.
#[derive(Debug)]
pub struct Counters {
    source: &'static str,
    zones: Vec<Zone>,
}

fn read_u64(path: &Path) -> io::Result<u64> {
    fs::read_to_string(path)?
        .trim()
        .parse()
        .map_err(|_| invalid("not a number"))
}

/// Subdirectories of `root`, sorted by name; the error says why `root` cannot be listed.
fn sorted_dirs(root: &Path, what: &str) -> Result<Vec<(String, PathBuf)>, String> {
    let entries = fs::read_dir(root).map_err(|e| format!("no {what} interface ({e})"))?;
    let mut dirs: Vec<(String, PathBuf)> = entries
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    dirs.sort();
    Ok(dirs)
}

impl Counters {
    /// Finds the RAPL zones under `powercap_root` (normally `/sys/class/powercap`) and reads each
    /// once. The error says why RAPL cannot be used.
    pub fn rapl(powercap_root: &Path) -> Result<Self, String> {
        let named: Vec<(String, PathBuf)> = sorted_dirs(powercap_root, "powercap")?
            .into_iter()
            // Top-level zones are `intel-rapl:N`; `intel-rapl:N:M` are their subzones.
            .filter(|(dir, _)| dir.starts_with("intel-rapl:") && dir.matches(':').count() == 1)
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
                max_range_uj: Some(max_range_uj),
                last_uj,
            });
        }
        Ok(Self {
            source: "rapl",
            zones,
        })
    }

    /// Finds the processors' socket energy counters among the hwmon devices under `hwmon_root`
    /// (normally `/sys/class/hwmon`) and reads each once: the `energyN_input` files (µJ) labelled
    /// `Esocket…`, as the `amd_energy` and `zenergy` drivers name them. Their per-core counters
    /// (`Ecore…`) are inside the socket's and are not summed; other energy inputs (graphics
    /// cards) are not the processors' and are left out. The error says why hwmon cannot be used.
    pub fn hwmon(hwmon_root: &Path) -> Result<Self, String> {
        let mut zones = Vec::new();
        for (dir, path) in sorted_dirs(hwmon_root, "hwmon")? {
            let Ok(files) = fs::read_dir(&path) else {
                continue;
            };
            let mut inputs: Vec<String> = files
                .flatten()
                .map(|f| f.file_name().to_string_lossy().into_owned())
                .filter(|f| f.starts_with("energy") && f.ends_with("_input"))
                .collect();
            inputs.sort();
            for input in inputs {
                let label_file = path.join(input.replace("_input", "_label"));
                let Ok(label) = fs::read_to_string(&label_file) else {
                    continue;
                };
                let label = label.trim();
                if !label.starts_with("Esocket") {
                    continue;
                }
                let counter = path.join(&input);
                let last_uj = read_u64(&counter)
                    .map_err(|e| format!("{} is not readable ({e})", counter.display()))?;
                zones.push(Zone {
                    name: format!("{dir}/{label}"),
                    counter,
                    max_range_uj: None,
                    last_uj,
                });
            }
        }
        if zones.is_empty() {
            return Err("no processor socket energy counters in hwmon".into());
        }
        Ok(Self {
            source: "hwmon",
            zones,
        })
    }

    /// `rapl` or `hwmon`.
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// Names of the counters read.
    pub fn zones(&self) -> Vec<&str> {
        self.zones.iter().map(|z| z.name.as_str()).collect()
    }

    /// Joules the counters gained since the last sample, across a wrap or a reset.
    pub fn sample(&mut self) -> io::Result<f64> {
        let mut microjoules = 0u64;
        for zone in &mut self.zones {
            let now = read_u64(&zone.counter)?;
            microjoules += match zone.max_range_uj {
                _ if now >= zone.last_uj => now - zone.last_uj,
                // Wrapped: up to the maximum, then from zero.
                Some(max) => max.saturating_sub(zone.last_uj) + now,
                // Started over (the driver was reloaded): what it counted since.
                None => now,
            };
            zone.last_uj = now;
        }
        Ok(microjoules as f64 / 1e6)
    }
}

/// How the meter gets the host's energy.
#[derive(Debug)]
pub enum Method {
    /// Energy counters: RAPL, else hwmon.
    Sensor(Counters),
    /// The model, and why no sensor is used.
    Model { reason: String },
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
    /// A meter reading RAPL under `sys_class/powercap` when it can, else hwmon's socket counters
    /// under `sys_class/hwmon`, else the model with `vcpus` CPUs. `sys_class` is normally
    /// `/sys/class`.
    pub fn new(
        sys_class: &Path,
        proc_root: &Path,
        coefficients: Coefficients,
        vcpus: usize,
    ) -> io::Result<Self> {
        let method = match Counters::rapl(&sys_class.join("powercap")) {
            Ok(rapl) => Method::Sensor(rapl),
            Err(no_rapl) => match Counters::hwmon(&sys_class.join("hwmon")) {
                Ok(hwmon) => Method::Sensor(hwmon),
                Err(no_hwmon) => Method::Model {
                    reason: format!("RAPL: {no_rapl}; hwmon: {no_hwmon}"),
                },
            },
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

    /// `rapl`, `hwmon` or `model`.
    pub fn method_name(&self) -> &'static str {
        match &self.method {
            Method::Sensor(counters) => counters.source(),
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
            Method::Sensor(counters) => (counters.sample()?, 0.0),
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
        let mut rapl = Counters::rapl(root).unwrap();
        assert_eq!(rapl.zones(), ["package-0", "package-1"]);
        // package-0 wraps: 900,000 → 1,000,000 → 50,000 is 150,000 µJ; package-1 gains 200,000.
        fs::write(root.join("intel-rapl:0/energy_uj"), "50000").unwrap();
        fs::write(root.join("intel-rapl:1/energy_uj"), "300000").unwrap();
        fs::write(root.join("intel-rapl:0:0/energy_uj"), "999999").unwrap();
        let joules = rapl.sample().unwrap();
        assert!((joules - 0.35).abs() < 1e-9, "{joules}");

        // With a platform zone, it alone is the host.
        zone(root, "intel-rapl:2", "psys", 10, 1_000_000);
        let rapl = Counters::rapl(root).unwrap();
        assert_eq!(rapl.zones(), ["psys"]);
    }

    #[test]
    fn an_unreadable_counter_falls_back_to_the_model_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (sys, proc_root) = (dir.path().join("sys"), dir.path().join("proc"));
        fake_proc(&proc_root, (0, 0), [0; 8], 0);
        // A counter that cannot be read (permission denied looks the same to the meter).
        fs::create_dir_all(sys.join("powercap/intel-rapl:0/energy_uj")).unwrap();
        fs::write(sys.join("powercap/intel-rapl:0/name"), "package-0").unwrap();
        let meter = Meter::new(&sys, &proc_root, Coefficients::default(), 2).unwrap();
        assert_eq!(meter.method_name(), "model");
        let Method::Model { reason } = meter.method() else {
            panic!()
        };
        assert!(reason.contains("energy_uj is not readable"), "{reason}");
        assert!(reason.contains("hwmon: no hwmon interface"), "{reason}");
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

    /// An hwmon device `dir` with energy inputs of the given labels and values (µJ).
    fn hwmon(root: &Path, dir: &str, name: &str, inputs: &[(&str, u64)]) {
        let d = root.join(dir);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("name"), format!("{name}\n")).unwrap();
        for (i, (label, value)) in inputs.iter().enumerate() {
            fs::write(
                d.join(format!("energy{}_label", i + 1)),
                format!("{label}\n"),
            )
            .unwrap();
            fs::write(
                d.join(format!("energy{}_input", i + 1)),
                format!("{value}\n"),
            )
            .unwrap();
        }
    }

    #[test]
    fn hwmon_socket_counters_are_used_without_their_cores_and_across_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let (sys, proc_root) = (dir.path().join("sys"), dir.path().join("proc"));
        fake_proc(&proc_root, (0, 0), [0; 8], 1024);
        // No RAPL; amd_energy with two cores inside one socket, a graphics card's energy, and a
        // temperature sensor with no energy at all.
        fs::create_dir_all(sys.join("powercap")).unwrap();
        hwmon(
            &sys.join("hwmon"),
            "hwmon0",
            "amd_energy",
            &[
                ("Ecore000", 1_000),
                ("Ecore001", 2_000),
                ("Esocket0", 5_000_000),
            ],
        );
        hwmon(&sys.join("hwmon"), "hwmon1", "amdgpu", &[("PPT", 7_000)]);
        fs::create_dir_all(sys.join("hwmon/hwmon2")).unwrap();
        fs::write(sys.join("hwmon/hwmon2/temp1_input"), "40000").unwrap();
        let mut meter = Meter::new(&sys, &proc_root, Coefficients::default(), 2).unwrap();
        assert_eq!(meter.method_name(), "hwmon");
        let Method::Sensor(counters) = meter.method() else {
            panic!()
        };
        assert_eq!(counters.zones(), ["hwmon0/Esocket0"]);
        // The socket gains 20 J, its cores and the card more; the process had all the active time.
        fs::write(sys.join("hwmon/hwmon0/energy3_input"), "25000000").unwrap();
        fs::write(sys.join("hwmon/hwmon0/energy1_input"), "9000000").unwrap();
        fs::write(sys.join("hwmon/hwmon1/energy1_input"), "99000000").unwrap();
        fake_proc(&proc_root, (100, 0), [100, 0, 0, 100, 0, 0, 0, 0], 1024);
        let sample = meter.sample(5.0).unwrap();
        assert!((sample.joules - 20.0).abs() < 1e-9, "{sample:?}");
        // The driver reloaded: its counter starts over from zero, and what it counted since is
        // the interval's energy (not a wrap at 2^64).
        fs::write(sys.join("hwmon/hwmon0/energy3_input"), "3000000").unwrap();
        fake_proc(&proc_root, (200, 0), [200, 0, 0, 200, 0, 0, 0, 0], 1024);
        let sample = meter.sample(5.0).unwrap();
        assert!((sample.joules - 3.0).abs() < 1e-9, "{sample:?}");
    }

    #[test]
    fn rapl_is_preferred_to_hwmon_and_unreadable_hwmon_counters_mean_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let (sys, proc_root) = (dir.path().join("sys"), dir.path().join("proc"));
        fake_proc(&proc_root, (0, 0), [0; 8], 1024);
        hwmon(&sys.join("hwmon"), "hwmon0", "zenergy", &[("Esocket0", 10)]);
        zone(
            &sys.join("powercap"),
            "intel-rapl:0",
            "package-0",
            0,
            1 << 40,
        );
        let meter = Meter::new(&sys, &proc_root, Coefficients::default(), 2).unwrap();
        assert_eq!(meter.method_name(), "rapl");
        // Without RAPL, an hwmon socket counter that cannot be read: the model, saying why.
        fs::remove_dir_all(sys.join("powercap")).unwrap();
        fs::remove_file(sys.join("hwmon/hwmon0/energy1_input")).unwrap();
        fs::create_dir(sys.join("hwmon/hwmon0/energy1_input")).unwrap();
        let meter = Meter::new(&sys, &proc_root, Coefficients::default(), 2).unwrap();
        let Method::Model { reason } = meter.method() else {
            panic!("{:?}", meter.method())
        };
        assert!(
            reason.contains("RAPL: no powercap interface")
                && reason.contains("energy1_input is not readable"),
            "{reason}"
        );
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
        zone(
            &sys.join("powercap"),
            "intel-rapl:0",
            "package-0",
            0,
            1 << 40,
        );
        fake_proc(&proc_root, (0, 0), [0; 8], 1024);
        let mut meter = Meter::new(&sys, &proc_root, Coefficients::default(), 2).unwrap();
        assert_eq!(meter.method_name(), "rapl");
        // 40 J on the package; the process used a quarter of the active time.
        fs::write(sys.join("powercap/intel-rapl:0/energy_uj"), "40000000").unwrap();
        fake_proc(&proc_root, (100, 0), [400, 0, 0, 600, 0, 0, 0, 0], 1024);
        let sample = meter.sample(5.0).unwrap();
        assert!((sample.joules - 10.0).abs() < 1e-9, "{sample:?}");
        // An idle interval costs the process nothing.
        let sample = meter.sample(5.0).unwrap();
        assert_eq!(sample.joules, 0.0);
    }
}
