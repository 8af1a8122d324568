//! What a configuration needs from the machine it runs on, apart from itself: the files it names
//! (readable, parseable, private where they hold a secret), the data directory (private to the
//! gateway, or one that can be made) and the listen addresses (free to bind).
//!
//! `hubgate check` validates a configuration and its policy anywhere — on a laptop where a policy
//! is written and reviewed — and names what it left out; `hubgate check --environment`, run on
//! the hub, checks these too. A start and a reload check them all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::Config;

/// One finding about the machine: an error stops a start, a warning does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    Error(String),
    Warning(String),
}

/// The files `config` names, each with its key.
pub fn named_files(config: &Config) -> Vec<(&'static str, &Path)> {
    let mut files: Vec<(&'static str, Option<&PathBuf>)> = vec![
        (
            "footprint.grid_intensity_file",
            config.footprint.grid_intensity_file.as_ref(),
        ),
        ("mqtt.password_file", config.mqtt.password_file.as_ref()),
    ];
    if let Some(tls) = &config.mqtt.tls {
        files.push(("mqtt.tls.ca_file", Some(&tls.ca_file)));
        files.push(("mqtt.tls.cert_file", tls.cert_file.as_ref()));
        files.push(("mqtt.tls.key_file", tls.key_file.as_ref()));
    }
    if let Some(tls) = &config.grpc.tls {
        files.push(("grpc.tls.cert_file", Some(&tls.cert_file)));
        files.push(("grpc.tls.key_file", Some(&tls.key_file)));
        files.push(("grpc.tls.client_ca_file", tls.client_ca_file.as_ref()));
    }
    if let Some(nats) = &config.nats {
        files.push(("nats.token_file", nats.token_file.as_ref()));
        files.push(("nats.ca_file", nats.ca_file.as_ref()));
    }
    if let Some(up) = &config.upstream {
        files.push(("upstream.token_file", up.token_file.as_ref()));
        files.push(("upstream.ca_file", up.ca_file.as_ref()));
        files.push(("upstream.cert_file", up.cert_file.as_ref()));
        files.push(("upstream.key_file", up.key_file.as_ref()));
    }
    files
        .into_iter()
        .filter_map(|(key, path)| Some((key, path?.as_path())))
        .collect()
}

/// The addresses `config` listens on, each with its key.
pub fn listen_addresses(config: &Config) -> Vec<(&'static str, SocketAddr)> {
    let mut addresses = vec![
        ("grpc.listen", config.grpc.listen),
        ("admin.listen", config.admin.listen),
    ];
    if let Some(public) = config.admin.public_listen {
        addresses.push(("admin.public_listen", public));
    }
    addresses
}

/// What `check` without `--environment` leaves out, in words.
pub fn not_checked(config: &Config) -> String {
    let files = named_files(config);
    let mut parts = Vec::new();
    if !files.is_empty() {
        let list: Vec<String> = files
            .iter()
            .map(|(key, path)| format!("{key} ({})", path.display()))
            .collect();
        parts.push(format!("the files {}", list.join(", ")));
    }
    parts.push(format!(
        "the data directory {}",
        config.store.data_dir.display()
    ));
    let addresses: Vec<String> = listen_addresses(config)
        .iter()
        .map(|(key, addr)| format!("{key} {addr}"))
        .collect();
    parts.push(format!("the listen addresses {}", addresses.join(", ")));
    parts.join("; ")
}

/// Checks what `config` needs from this machine: the files it names, as a start reads them; the
/// data directory; the listen addresses. An address in use is a warning, since the gateway being
/// checked before a reload holds its own.
pub fn check(config: &Config) -> Vec<Finding> {
    let mut findings = Vec::new();
    if let Err(err) = super::check_files(config) {
        findings.push(Finding::Error(format!("{err:#}")));
    }
    match data_dir_state(&config.store.data_dir) {
        Ok(Some(warning)) => findings.push(Finding::Warning(warning)),
        Ok(None) => {}
        Err(err) => findings.push(Finding::Error(format!("{err:#}"))),
    }
    for (key, addr) in listen_addresses(config) {
        if addr.port() == 0 {
            continue;
        }
        match std::net::TcpListener::bind(addr) {
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {
                findings.push(Finding::Warning(format!(
                    "{key} {addr} is in use (by a gateway running here, or another program)"
                )));
            }
            Err(err) => findings.push(Finding::Error(format!(
                "{key}: cannot listen on {addr}: {err}"
            ))),
        }
    }
    findings
}

/// The data directory as a start would find it: refused when others may enter it, a warning
/// when its group may. One that does not exist yet must have an existing directory above it,
/// where it will be made.
fn data_dir_state(dir: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            use std::os::unix::fs::PermissionsExt as _;
            openness(dir, meta.permissions().mode())
        }
        Ok(_) => anyhow::bail!("the data directory {} is not a directory", dir.display()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let above = dir
                .ancestors()
                .skip(1)
                .find(|a| a.exists())
                .unwrap_or(Path::new("/"));
            if !above.is_dir() {
                anyhow::bail!(
                    "the data directory {} cannot be made: {} is not a directory",
                    dir.display(),
                    above.display()
                );
            }
            Ok(None)
        }
        Err(err) => anyhow::bail!("cannot read the data directory {}: {err}", dir.display()),
    }
}

/// Whether a data directory of `mode` is private enough: an error when others may enter it, a
/// warning when its group may.
pub(super) fn openness(dir: &Path, mode: u32) -> anyhow::Result<Option<String>> {
    if mode & 0o007 != 0 {
        anyhow::bail!(
            "the data directory {} is open to others (mode {:o}): it holds pseudonymisation keys, \
             the outbox and the audit log; make it private with chmod 700",
            dir.display(),
            mode & 0o777
        );
    }
    Ok((mode & 0o070 != 0).then(|| {
        format!(
            "the data directory {} is open to its group (mode {:o}): make it private with chmod 700 \
             unless the group is the gateway's alone",
            dir.display(),
            mode & 0o777
        )
    }))
}
