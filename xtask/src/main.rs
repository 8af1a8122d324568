//! Project tasks, in the xtask style: plain Rust without dependencies, run through `cargo xtask`
//! (the alias is in `.cargo/config.toml`).
//!
//! `cargo xtask test [ARGS…]` is the README's test command. On a machine with a Rust toolchain
//! and the distribution's package manager it first provides what the end-to-end tests need, when
//! it is missing:
//! - `mosquitto`, `nats-server` and Chromium, and Python's `venv`, from the distribution
//!   (`apt-get`, through `sudo` when not run as root);
//! - the Python example client's packages (`examples/python/requirements.txt`, pinned and
//!   hash-checked) in a virtualenv of their own, `target/test-python`.
//!
//! It then runs every test of the workspace (`cargo test --workspace --locked --no-fail-fast`
//! with `ARGS` appended), so that one failing test binary does not hide the others, and closes
//! with one summary line over all of them.

use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

/// A program the tests run, and the Debian package that has it.
struct Needed {
    /// Any of these names will do.
    programs: &'static [&'static str],
    package: &'static str,
    why: &'static str,
}

const NEEDED: &[Needed] = &[
    Needed {
        programs: &["mosquitto"],
        package: "mosquitto",
        why: "the MQTT broker each end-to-end test starts on a free port",
    },
    Needed {
        programs: &["nats-server"],
        package: "nats-server",
        why: "the NATS JetStream server of the exporter's tests",
    },
    Needed {
        programs: &["chromium", "chromium-browser"],
        package: "chromium",
        why: "the headless browser that checks the transparency page",
    },
];

/// Where the Python client's packages are installed.
const PYTHON_ENV: &str = "target/test-python";
const REQUIREMENTS: &str = "examples/python/requirements.txt";

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    match args.next().as_deref().and_then(|a| a.to_str()) {
        Some("test") => match test(args.collect()) {
            Ok(code) => code,
            Err(err) => {
                eprintln!("xtask test: {err}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!(
                "usage: cargo xtask test [ARGS…]\n\n\
                 Installs what the tests need when it is missing (mosquitto, nats-server, \
                 Chromium,\nthe Python client's packages) and runs every test of the workspace; \
                 ARGS go to cargo test."
            );
            ExitCode::from(2)
        }
    }
}

fn test(extra: Vec<OsString>) -> Result<ExitCode, String> {
    let root = workspace_root()?;
    std::env::set_current_dir(&root)
        .map_err(|e| format!("cannot enter {}: {e}", root.display()))?;

    let mut missing: Vec<&Needed> = NEEDED
        .iter()
        .filter(|n| n.programs.iter().all(|p| find(p).is_none()))
        .collect();
    let venv_missing = !python_has_venv();
    let venv_package = Needed {
        programs: &["python3"],
        package: "python3-venv",
        why: "Python with venv, for the example client's packages",
    };
    if venv_missing {
        missing.push(&venv_package);
    }
    if !missing.is_empty() {
        for n in &missing {
            println!("xtask: installing {} ({})", n.package, n.why);
        }
        apt_install(&missing.iter().map(|n| n.package).collect::<Vec<_>>())?;
        if let Some(n) = NEEDED
            .iter()
            .find(|n| n.programs.iter().all(|p| find(p).is_none()))
        {
            return Err(format!(
                "{} is still not found after installing {}",
                n.programs[0], n.package
            ));
        }
    }
    let python = python_env(&root)?;

    // The programs may live in sbin directories that a user's PATH leaves out.
    let mut path: Vec<PathBuf> = NEEDED
        .iter()
        .filter_map(|n| n.programs.iter().find_map(|p| find(p)))
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    path.dedup();
    let path = std::env::join_paths(path).map_err(|e| format!("PATH: {e}"))?;

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!("xtask: cargo test --workspace --locked --no-fail-fast");
    let mut child = Command::new(cargo)
        .args(["test", "--workspace", "--locked", "--no-fail-fast"])
        .args(extra)
        .env("PATH", path)
        .env(
            "HUBGATE_PYTHON",
            std::env::var_os("HUBGATE_PYTHON").unwrap_or_else(|| python.into()),
        )
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run cargo test: {e}"))?;
    let stdout = child.stdout.take().ok_or("cargo test has no stdout")?;
    let mut summary = Summary::default();
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading cargo test's output: {e}"))?;
        summary.add(&line);
        // The tests' output goes on even where the terminal has gone away.
        let _ = writeln!(out, "{line}");
    }
    drop(out);
    let status = child
        .wait()
        .map_err(|e| format!("waiting for cargo test: {e}"))?;
    println!(
        "\n{} passed, {} failed, {} ignored, in {} test binaries{}",
        summary.passed,
        summary.failed,
        summary.ignored,
        summary.binaries,
        if status.success() { "" } else { " — FAILED" }
    );
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The counts of every `test result:` line of a `cargo test` run.
#[derive(Debug, Default)]
struct Summary {
    passed: u64,
    failed: u64,
    ignored: u64,
    binaries: u64,
}

impl Summary {
    /// Adds `line` if it is a test binary's result:
    /// `test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; …`.
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(Ok(n))) = (words.next(), words.next().map(str::parse::<u64>))
            else {
                continue;
            };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
        self.binaries += 1;
    }
}

/// The workspace's root: the directory above this package's.
fn workspace_root() -> Result<PathBuf, String> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| "the xtask package has no parent directory".into())
}

/// `program` on PATH, or in the sbin directories where Debian puts daemons.
fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Whether `python3` can make a virtualenv with pip in it.
fn python_has_venv() -> bool {
    Command::new("python3")
        .args(["-c", "import venv, ensurepip"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs `packages` with apt-get, as root or through sudo.
fn apt_install(packages: &[&str]) -> Result<(), String> {
    let manual = format!(
        "install them and run the tests again: apt-get install {}",
        packages.join(" ")
    );
    if find("apt-get").is_none() {
        return Err(format!("this machine has no apt-get; {manual}"));
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let mut prefix: Vec<&str> = Vec::new();
    if !root {
        if find("sudo").is_none() {
            return Err(format!("not root and no sudo; {manual}"));
        }
        prefix.push("sudo");
    }
    prefix.push("apt-get");
    let apt = |args: &[&str]| -> Result<(), String> {
        let status = Command::new(prefix[0])
            .args(&prefix[1..])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|e| format!("cannot run apt-get: {e}; {manual}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "apt-get {} failed ({status}); {manual}",
                args.join(" ")
            ))
        }
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq"];
    install.extend_from_slice(packages);
    apt(&install)
}

/// The Python of a virtualenv holding the example client's packages, made (or remade when the
/// requirements changed) under `target/`.
fn python_env(root: &Path) -> Result<PathBuf, String> {
    let env = root.join(PYTHON_ENV);
    let stamp = env.join("requirements.txt");
    let requirements = std::fs::read(root.join(REQUIREMENTS))
        .map_err(|e| format!("cannot read {REQUIREMENTS}: {e}"))?;
    let python = env.join("bin/python");
    if python.exists() && std::fs::read(&stamp).is_ok_and(|s| s == requirements) {
        return Ok(python);
    }
    println!("xtask: installing the Python client's packages in {PYTHON_ENV}");
    if env.exists() {
        std::fs::remove_dir_all(&env).map_err(|e| format!("cannot remove {PYTHON_ENV}: {e}"))?;
    }
    run(Command::new("python3").args(["-m", "venv"]).arg(&env))?;
    run(Command::new(env.join("bin/pip"))
        .args(["install", "-q", "--require-hashes", "-r"])
        .arg(root.join(REQUIREMENTS)))?;
    std::fs::write(&stamp, requirements)
        .map_err(|e| format!("cannot write {}: {e}", stamp.display()))?;
    Ok(python)
}

fn run(command: &mut Command) -> Result<(), String> {
    let shown = format!("{command:?}");
    match command.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("{shown} failed ({s})")),
        Err(e) => Err(format!("cannot run {shown}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::Summary;

    #[test]
    fn summary_adds_every_result_line() {
        let mut summary = Summary::default();
        for line in [
            "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.31s",
            "running 3 tests",
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 4.00s",
        ] {
            summary.add(line);
        }
        assert_eq!(
            (
                summary.passed,
                summary.failed,
                summary.ignored,
                summary.binaries
            ),
            (14, 1, 1, 2)
        );
    }
}
