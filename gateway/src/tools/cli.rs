//! The `hubgate` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use hubgate_privacy::Severity;

use crate::config::{self, Config};

/// hubgate: an edge gateway that applies a city's privacy policy to MQTT telemetry and serves the
/// filtered records over gRPC.
#[derive(Debug, Parser)]
#[command(name = "hubgate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway. Without --config, runs the embedded default: an in-process MQTT broker on
    /// 127.0.0.1:1883 (or a free port if that is taken) and a small district's policy.
    Run {
        /// Configuration file (TOML): broker, listeners and policy.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Threads of the async runtime: MQTT, pipeline, gRPC, exporters, admin server. The
        /// outbox commits on a thread of its own besides. One thread carries the benchmark's full load
        /// with a subscriber; more help with many gRPC subscribers or exporters, at the cost of
        /// more thread wake-ups per reading (BENCHMARKS.md). Also `HUBGATE_WORKER_THREADS`.
        #[arg(long, env = "HUBGATE_WORKER_THREADS", default_value_t = 1,
              value_parser = clap::value_parser!(u16).range(1..=1024))]
        worker_threads: u16,
    },
    /// Validate configuration files and their policies; print every error and warning with its
    /// line and column. Works anywhere: what needs the hub itself (the files a configuration
    /// names, the data directory, the listen addresses) is checked with `--environment`.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Also check this machine as the hub: the files the configuration names (readable,
        /// parseable, secrets private), the data directory and the listen addresses.
        #[arg(long)]
        environment: bool,
    },
    /// Show what the policy does to sample messages, field by field (deterministic).
    DryRun {
        /// Configuration file holding the policy.
        #[arg(long, short)]
        config: PathBuf,
        /// Samples, one JSON object per line: {"topic": "...", "payload": {...}}.
        #[arg(long, short)]
        input: PathBuf,
        /// Compare with this (older) configuration instead: show only what the change from it
        /// changes in the output (fields newly passed or dropped, groups newly released or
        /// suppressed).
        #[arg(long)]
        against: Option<PathBuf>,
    },
    /// Print the transparency register of a configuration's policy: what is collected, why, how
    /// it is reduced, who receives it and how long it is kept.
    Explain {
        /// Configuration file; the embedded default without it.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// text (readable), json (as /transparency.json), art30 (GDPR Art. 30 record, Markdown),
        /// html (the /transparency page) or ngsi-ld (Smart Data Models PrivacyObject entities, as
        /// /transparency.ngsi-ld.json).
        #[arg(long, short, value_enum, default_value_t = ExplainFormat::Text)]
        format: ExplainFormat,
    },
    /// Make bearer tokens for gRPC clients.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Check the audit log's hash chain and report the first broken entry.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Look at the outbox of a stopped gateway, or copy what is readable out of a damaged one.
    Outbox {
        #[command(subcommand)]
        action: OutboxAction,
    },
    /// Run a simulated district through the gateway and show what the policy keeps.
    #[cfg(feature = "embedded-broker")]
    Demo {
        /// How long to run, in seconds (0: until Ctrl-C).
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Messages the simulated district publishes per second.
        #[arg(long, default_value_t = 50)]
        rate: u32,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ExplainFormat {
    Text,
    Json,
    Art30,
    Html,
    NgsiLd,
}

#[derive(Debug, Subcommand)]
enum TokenAction {
    /// Make a new random token; print it (for the client) and its `[[grpc.token]]` entry (for
    /// the configuration, which holds only its SHA-256).
    New {
        /// Who will hold it.
        #[arg(long)]
        name: String,
        /// Streams it may subscribe to (repeat the option; `*` for all).
        #[arg(long = "stream")]
        streams: Vec<String>,
        /// May read the policy and register (GetPolicy).
        #[arg(long)]
        policy: bool,
        /// May read the footprint (GetFootprint, WatchFootprint).
        #[arg(long)]
        footprint: bool,
        /// May push records (Push): for an origin gateway.
        #[arg(long)]
        push: bool,
    },
    /// Print the SHA-256 of a token read from standard input.
    Hash,
}

#[derive(Debug, Subcommand)]
enum AuditAction {
    /// Verify the chain of an audit log (`<data_dir>/audit.jsonl`, after its closed segments
    /// `audit-*.jsonl`, oldest first); exits 1 if it is broken.
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// A head noted earlier, `SEQ:HASH` (from `GetPolicy`'s `audit_head_seq` and
        /// `audit_head_hash`, or from this command's output): the files must still hold entry
        /// SEQ with that hash, or the log was cut or rewritten since.
        #[arg(long, value_parser = parse_head)]
        head: Option<crate::governance::audit::Head>,
    },
}

#[derive(Debug, Subcommand)]
enum OutboxAction {
    /// Read every batch, key slot and log entry of the outbox in a data directory, and report
    /// what is damaged: the file, where, and the sequences lost. Exits 0 when nothing was lost, 1
    /// when records were, 2 when the outbox cannot be opened. Reads a copy: the directory is left
    /// as it was.
    Verify {
        /// The gateway's data directory (`store.data_dir`).
        data_dir: PathBuf,
    },
    /// Copy what is readable of the outbox in a data directory into a new data directory, with
    /// the directory's other files; sequences that could not be read stay holes, served as Gaps,
    /// and numbering goes on after the highest ever handed out.
    Salvage {
        /// The damaged gateway's data directory.
        data_dir: PathBuf,
        /// The new data directory (must not exist, or be empty).
        #[arg(long)]
        into: PathBuf,
    },
}

fn parse_head(text: &str) -> Result<crate::governance::audit::Head, String> {
    crate::governance::audit::Head::parse(text)
        .ok_or_else(|| "expected SEQ:HASH, the hash 64 hex digits".to_owned())
}

/// Entry point of the `hubgate` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Check { files, environment } => return check(&files, environment),
        Command::Run {
            config,
            worker_threads,
        } => runtime(Some(worker_threads.into())).and_then(|rt| rt.block_on(run(config))),
        Command::DryRun {
            config,
            input,
            against,
        } => dry_run(&config, &input, against.as_deref()),
        Command::Explain { config, format } => explain(config.as_deref(), format),
        Command::Token { action } => token(action),
        Command::Audit {
            action: AuditAction::Verify { files, head },
        } => return audit_verify(&files, head.as_ref()),
        Command::Outbox { action } => return outbox(action),
        #[cfg(feature = "embedded-broker")]
        Command::Demo { seconds, rate } => {
            runtime(None).and_then(|rt| rt.block_on(crate::tools::demo::run(seconds, rate)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("hubgate: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn outbox(action: OutboxAction) -> ExitCode {
    use crate::tools::outbox_repair;
    let (result, done) = match &action {
        OutboxAction::Verify { data_dir } => (outbox_repair::verify(data_dir), None),
        OutboxAction::Salvage { data_dir, into } => {
            (outbox_repair::salvage(data_dir, into), Some(into))
        }
    };
    match result {
        Ok(report) => {
            print!("{}", report.text());
            if let Some(into) = done {
                println!(
                    "salvaged into {}: what is listed as lost above is a hole there, served as a Gap",
                    into.display()
                );
            }
            if report.lost() {
                println!("records were lost");
                ExitCode::from(1)
            } else {
                println!("nothing was lost");
                ExitCode::SUCCESS
            }
        }
        Err(err) => {
            eprintln!("hubgate: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn audit_verify(files: &[PathBuf], head: Option<&crate::governance::audit::Head>) -> ExitCode {
    let verdicts = match crate::governance::audit::verify_files(files) {
        Ok(verdicts) => verdicts,
        Err(err) => {
            eprintln!("hubgate: error: cannot read the audit log: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut intact = true;
    for (file, verdict) in files.iter().zip(verdicts) {
        match verdict {
            crate::governance::audit::Verdict::Intact {
                entries,
                last_hash,
                continues,
            } => {
                let from = continues
                    .map(|h| format!(", continuing from entry hash {h}"))
                    .unwrap_or_default();
                println!(
                    "{}: intact, {entries} entries, last entry hash {last_hash}{from}",
                    file.display()
                );
            }
            crate::governance::audit::Verdict::Broken { line, reason } => {
                println!("{}:{line}: broken: {reason}", file.display());
                intact = false;
            }
        }
    }
    if let Some(head) = head {
        match crate::governance::audit::hash_in_files(files, head.seq) {
            Ok(Some(hash)) if hash == head.hash => {
                println!("entry {} holds the head's hash {}", head.seq, head.hash);
            }
            Ok(Some(hash)) => {
                println!(
                    "entry {} has hash {hash}, not the head's {}: the chain was rewritten",
                    head.seq, head.hash
                );
                intact = false;
            }
            Ok(None) => {
                println!(
                    "the files end before entry {}, the head noted: the log was cut",
                    head.seq
                );
                intact = false;
            }
            Err(err) => {
                eprintln!("hubgate: error: cannot read the audit log: {err}");
                return ExitCode::FAILURE;
            }
        }
    }
    if intact {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=off,rumqttc=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The async runtime, with `worker_threads` threads (by default one per core).
fn runtime(worker_threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = worker_threads {
        builder.worker_threads(threads);
    }
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Reads and validates a config file, printing its diagnostics. `None` when it has errors.
fn load(path: &Path) -> anyhow::Result<Option<Config>> {
    let source =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let name = path.display().to_string();
    match config::parse(&source) {
        Ok((config, warnings)) => {
            for w in &warnings {
                eprintln!("{}", w.render(&name, &source));
            }
            Ok(Some(config))
        }
        Err(rejected) => {
            for d in &rejected.diagnostics {
                eprintln!("{}", d.render(&name, &source));
            }
            Ok(None)
        }
    }
}

fn token(action: TokenAction) -> anyhow::Result<()> {
    match action {
        TokenAction::New {
            name,
            streams,
            policy,
            footprint,
            push,
        } => {
            let token = crate::sinks::grpc::auth::new_token()?;
            eprintln!("The token, for the client only (it is stored nowhere; keep it secret):");
            println!("{token}");
            eprintln!("\nFor the gateway's configuration:\n");
            let streams: Vec<String> = streams.iter().map(|s| format!("{s:?}")).collect();
            eprintln!(
                "[[grpc.token]]\nname = {name:?}\nsha256 = \"{}\"\nstreams = [{}]\npolicy = {policy}\nfootprint = {footprint}\npush = {push}",
                crate::sinks::grpc::auth::digest_hex(&token),
                streams.join(", ")
            );
        }
        TokenAction::Hash => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            let token = line.trim();
            anyhow::ensure!(!token.is_empty(), "no token on standard input");
            println!("{}", crate::sinks::grpc::auth::digest_hex(token));
        }
    }
    Ok(())
}

fn explain(config_path: Option<&Path>, format: ExplainFormat) -> anyhow::Result<()> {
    let config = match config_path {
        Some(path) => match load(path)? {
            Some(config) => config,
            None => anyhow::bail!("{} has errors (see above)", path.display()),
        },
        None => {
            config::parse(config::DEFAULT_CONFIG)
                .map_err(|_| anyhow::anyhow!("the embedded default configuration is invalid"))?
                .0
        }
    };
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let register = crate::governance::register::Register::new(&config, &now);
    match format {
        ExplainFormat::Text => print!("{}", register.to_text()),
        ExplainFormat::Json => println!("{}", register.to_json()),
        ExplainFormat::Art30 => print!("{}", register.to_art30()),
        ExplainFormat::NgsiLd => println!("{}", register.to_ngsi_ld()),
        ExplainFormat::Html => {
            let url = register
                .public_url
                .clone()
                .unwrap_or_else(|| format!("http://{}/transparency", config.admin.listen));
            print!(
                "{}",
                crate::governance::register::html::render(&register, &url)
            );
        }
    }
    Ok(())
}

fn dry_run(config_path: &Path, input: &Path, against: Option<&Path>) -> anyhow::Result<()> {
    let Some(config) = load(config_path)? else {
        anyhow::bail!("{} has errors (see above)", config_path.display());
    };
    let file =
        std::fs::File::open(input).with_context(|| format!("cannot read {}", input.display()))?;
    let samples = std::io::BufReader::new(file);
    let report = match against {
        None => crate::tools::dry_run::run(&config.policy, samples)?,
        Some(old_path) => {
            let Some(old) = load(old_path)? else {
                anyhow::bail!("{} has errors (see above)", old_path.display());
            };
            crate::tools::dry_run::diff(&old.policy, &config.policy, samples)?
        }
    };
    print!("{report}");
    Ok(())
}

fn check(files: &[PathBuf], environment: bool) -> ExitCode {
    let mut failed = false;
    for path in files {
        let source = match std::fs::read_to_string(path) {
            Ok(s) => s,
            Err(err) => {
                eprintln!("{}: error: cannot read: {err}", path.display());
                failed = true;
                continue;
            }
        };
        let name = path.display().to_string();
        let (diagnostics, machine_warnings, outcome) = match config::parse(&source) {
            Ok((config, warnings)) => {
                println!(
                    "{name}: the outbox needs up to {} MiB on the volume of {}",
                    config.store.space_needed().div_ceil(1 << 20),
                    config.store.data_dir.display()
                );
                let (machine_errors, machine_warnings) = check_machine(&name, &config, environment);
                let outcome = if machine_errors == 0 {
                    Ok((config.policy.hash_hex(), config.policy.streams().len()))
                } else {
                    Err(machine_errors)
                };
                (warnings, machine_warnings, outcome)
            }
            Err(rejected) => (rejected.diagnostics, 0, Err(0)),
        };
        for d in &diagnostics {
            println!("{}", d.render(&name, &source));
        }
        let errors = diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count();
        let warnings = diagnostics.len() - errors + machine_warnings;
        match outcome {
            Ok((hash, streams)) => {
                println!("{name}: ok: {streams} streams, policy {hash}, {warnings} warnings");
            }
            Err(machine_errors) => {
                let errors = errors + machine_errors;
                println!("{name}: rejected: {errors} errors, {warnings} warnings");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `check`'s part about the hub: with `environment`, the files, data directory and addresses
/// checked and each finding printed; without, a line naming what was left out. Returns the
/// errors and warnings found.
fn check_machine(name: &str, config: &Config, environment: bool) -> (usize, usize) {
    use crate::app::environment::{self, Finding};
    if !environment {
        println!(
            "{name}: not checked without --environment (run it on the hub): {}",
            environment::not_checked(config)
        );
        return (0, 0);
    }
    let (mut errors, mut warnings) = (0, 0);
    for finding in environment::check(config) {
        match finding {
            Finding::Error(text) => {
                println!("{name}: error: {text}");
                errors += 1;
            }
            Finding::Warning(text) => {
                println!("{name}: warning: {text}");
                warnings += 1;
            }
        }
    }
    (errors, warnings)
}

async fn run(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let (config, broker) = match &config_path {
        Some(path) => match load(path)? {
            Some(config) => (config, None),
            None => anyhow::bail!(
                "{} has errors; nothing was started (see above)",
                path.display()
            ),
        },
        None => embedded_default()?,
    };
    crate::app::lifecycle::serve(config, config_path, |gateway| {
        // One line on stdout that says where everything is (scripts and tests read it).
        println!(
            "hubgate: gRPC listening on {}, admin HTTP listening on {}{}{}",
            gateway.grpc_addr,
            gateway.admin_addr,
            gateway
                .public_addr
                .map(|p| format!(", transparency notice on http://{p}/transparency"))
                .unwrap_or_default(),
            broker
                .map(|b| format!(", embedded MQTT broker on {b}"))
                .unwrap_or_default()
        );
    })
    .await
}

#[cfg(feature = "embedded-broker")]
fn embedded_default() -> anyhow::Result<(Config, Option<std::net::SocketAddr>)> {
    let (mut config, _) = config::parse(config::DEFAULT_CONFIG)
        .map_err(|_| anyhow::anyhow!("the embedded default configuration is invalid"))?;
    let addr = crate::tools::broker::start(crate::tools::broker::DEFAULT_ADDR)?;
    config.mqtt.host = addr.ip().to_string();
    config.mqtt.port = addr.port();
    // Without a config file there is nothing to edit: take a free port when a default one is taken.
    let mut listens = vec![
        ("gRPC", &mut config.grpc.listen),
        ("admin HTTP", &mut config.admin.listen),
    ];
    if let Some(public) = &mut config.admin.public_listen {
        listens.push(("the transparency notice", public));
    }
    for (what, listen) in listens {
        if std::net::TcpListener::bind(*listen).is_err() {
            tracing::warn!(
                "port {} is taken; {what} listens on a free port instead (printed below)",
                listen.port()
            );
            listen.set_port(0);
        }
    }
    Ok((config, Some(addr)))
}

#[cfg(not(feature = "embedded-broker"))]
fn embedded_default() -> anyhow::Result<(Config, Option<std::net::SocketAddr>)> {
    anyhow::bail!("this build has no embedded broker: run `hubgate run --config FILE`")
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command};

    fn worker_threads(args: &[&str]) -> Result<u16, clap::Error> {
        match Cli::try_parse_from(args)?.command {
            Command::Run { worker_threads, .. } => Ok(worker_threads),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn run_takes_one_worker_thread_unless_told_more_and_never_none() {
        assert_eq!(worker_threads(&["hubgate", "run"]).unwrap(), 1);
        assert_eq!(
            worker_threads(&["hubgate", "run", "--worker-threads", "4"]).unwrap(),
            4
        );
        let refused = worker_threads(&["hubgate", "run", "--worker-threads", "0"]).unwrap_err();
        assert!(
            refused.to_string().contains("0 is not in 1..=1024"),
            "{refused}"
        );
    }
}
