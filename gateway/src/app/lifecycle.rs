//! A gateway process's life: start, stop on SIGTERM or Ctrl-C, and reload on SIGHUP.
//!
//! A reload reads and checks the configuration file again; one with errors, or whose files cannot
//! be used, is rejected (`policy_rejected` in the audit log) and the running policy stays. A valid
//! one takes over: the running gateway finishes and commits what it holds, stops, and the new one
//! starts on the same listening sockets. Should it fail to start, the previous configuration
//! starts again (`policy_reload_failed`).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use hubgate_privacy::Severity;
use tokio_util::sync::CancellationToken;

use super::{Process, Running, Start};
use crate::config::{self, Config};

/// Runs `config` until SIGTERM or Ctrl-C, reloading `config_path` on SIGHUP (when there is one).
/// `announce` is called once, when the first gateway is listening.
pub async fn serve(
    mut config: Config,
    config_path: Option<PathBuf>,
    announce: impl FnOnce(&Running),
) -> anyhow::Result<()> {
    let process = Process::bind(&config)?;
    let mut signals = Signals::new()?;
    let mut why = Start::Fresh;
    let mut announce = Some(announce);
    // The configuration that ran before a reload, to go back to if the new one cannot start.
    let mut previous: Option<Config> = None;
    loop {
        let shutdown = CancellationToken::new();
        let started =
            super::start_in(&process, config.clone(), why.clone(), shutdown.clone()).await;
        let gateway = match (started, previous.take()) {
            (Ok(gateway), _) => gateway,
            (Err(err), Some(before)) => {
                let error = format!("{err:#}");
                tracing::error!(%error, "the reloaded configuration cannot start; the previous one runs again");
                why = Start::Revert {
                    failed_policy_hash: config.policy.hash_hex(),
                    error,
                };
                config = before;
                continue;
            }
            (Err(err), None) => return Err(err),
        };
        if let Some(announce) = announce.take() {
            announce(&gateway);
        }
        let running_hash = gateway.policy.hash_hex();
        let next = match until_reload(
            gateway,
            &shutdown,
            &mut signals,
            config_path.as_deref(),
            &config,
        )
        .await
        {
            Until::Stopped(result) => return result,
            Until::Reload(next) => *next,
        };
        why = Start::Reload {
            previous_policy_hash: running_hash,
            previous_tokens: config.grpc.tokens.clone(),
        };
        previous = Some(std::mem::replace(&mut config, next));
    }
}

/// How a running gateway ended.
enum Until {
    /// It stopped, on a signal or a failure.
    Stopped(anyhow::Result<()>),
    /// It stopped for a reload, which this configuration is to replace.
    Reload(Box<Config>),
}

/// Waits for `gateway` to stop, or for a signal: a stop, or a reload with a valid configuration
/// (then stops the gateway). A rejected reload leaves it running.
async fn until_reload(
    gateway: Running,
    shutdown: &CancellationToken,
    signals: &mut Signals,
    config_path: Option<&Path>,
    running: &Config,
) -> Until {
    let audit = std::sync::Arc::clone(&gateway.audit);
    let running_hash = gateway.policy.hash_hex();
    let wait = gateway.wait();
    tokio::pin!(wait);
    let next = loop {
        tokio::select! {
            result = &mut wait => return Until::Stopped(result),
            signal = signals.next() => match signal {
                Signal::Stop => {
                    tracing::info!("stopping");
                    shutdown.cancel();
                    return Until::Stopped(wait.await);
                }
                Signal::Reload => {
                    let Some(path) = config_path else {
                        tracing::warn!("SIGHUP: nothing to reload (running the embedded default)");
                        continue;
                    };
                    match reload(path, running) {
                        Ok(next) => break next,
                        Err(rejected) => {
                            tracing::warn!(errors = rejected.errors, first = %rejected.first, "SIGHUP: the new configuration is rejected; the running policy stays");
                            audit.record(
                                crate::telemetry::clock::now_ms(),
                                "policy_rejected",
                                serde_json::json!({
                                    "running_policy_hash": running_hash,
                                    "errors": rejected.errors,
                                    "first_error": rejected.first,
                                }),
                            );
                        }
                    }
                }
            }
        }
    };
    tracing::info!(
        from = %running_hash,
        to = %next.policy.hash_hex(),
        "SIGHUP: reloading the configuration"
    );
    shutdown.cancel();
    match wait.await {
        Ok(()) => Until::Reload(Box::new(next)),
        Err(err) => Until::Stopped(Err(err)),
    }
}

/// Why a reloaded configuration is not taken.
#[derive(Debug)]
struct Rejected {
    errors: usize,
    /// The first error, with its line and column.
    first: String,
}

/// Reads and checks `path` again for a reload. The listening addresses and the data directory
/// belong to the process and need a restart to change.
fn reload(path: &Path, running: &Config) -> Result<Config, Rejected> {
    let name = path.display().to_string();
    let source = std::fs::read_to_string(path).map_err(|e| Rejected {
        errors: 1,
        first: format!("{name}: cannot read: {e}"),
    })?;
    let config = match config::parse(&source) {
        Ok((config, warnings)) => {
            for w in &warnings {
                eprintln!("{}", w.render(&name, &source));
            }
            config
        }
        Err(rejected) => {
            let errors: Vec<String> = rejected
                .diagnostics
                .iter()
                .filter(|d| d.severity == Severity::Error)
                .map(|d| d.render(&name, &source))
                .collect();
            for d in &rejected.diagnostics {
                eprintln!("{}", d.render(&name, &source));
            }
            return Err(Rejected {
                errors: errors.len(),
                first: errors
                    .first()
                    .and_then(|e| e.lines().next())
                    .unwrap_or_default()
                    .to_owned(),
            });
        }
    };
    let fixed = [
        ("grpc.listen", config.grpc.listen != running.grpc.listen),
        ("admin.listen", config.admin.listen != running.admin.listen),
        (
            "admin.public_listen",
            config.admin.public_listen != running.admin.public_listen,
        ),
        (
            "store.data_dir",
            config.store.data_dir != running.store.data_dir,
        ),
    ];
    if let Some((what, _)) = fixed.iter().find(|(_, changed)| *changed) {
        return Err(Rejected {
            errors: 1,
            first: format!(
                "{name}: {what} changed: a reload cannot change it, restart the gateway"
            ),
        });
    }
    if let Err(err) = super::check_files(&config) {
        return Err(Rejected {
            errors: 1,
            first: format!("{name}: {err:#}"),
        });
    }
    Ok(config)
}

/// The signals the gateway acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// SIGTERM or Ctrl-C (SIGINT): stop.
    Stop,
    /// SIGHUP: load the configuration file again.
    Reload,
}

/// Signal streams, made once so that none is missed while the gateway restarts.
#[derive(Debug)]
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
                int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
                hup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => Signal::Stop,
                _ = self.int.recv() => Signal::Stop,
                _ = self.hup.recv() => Signal::Reload,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Stop
        }
    }
}
