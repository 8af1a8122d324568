//! The files a configuration names besides itself — secrets, TLS certificates and keys, grid
//! intensities — read and checked before a gateway starts or a reload replaces one, so that a
//! file that cannot be used stops the start with a clear error. A file that holds a secret must
//! not be readable by group or others.

use rumqttc::tokio_rustls::rustls;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::{Config, MqttConfig, NatsConfig, TlsConfig, UpstreamConfig};
use crate::governance::footprint::GridIntensity;
use crate::sinks::{nats, upstream};
use crate::sources::mqtt::Login;

/// What the files a configuration names besides itself hold (grid intensities, TLS
/// certificates and keys, tokens and passwords), read and parsed.
#[derive(Debug)]
pub struct Files {
    pub(super) grid_intensity: GridIntensity,
    pub(super) upstream: upstream::Credentials,
    pub(super) nats: nats::Credentials,
    pub(super) grpc_tls: Option<ServerTlsConfig>,
    pub(super) mqtt_login: Login,
}

impl Files {
    /// Reads every file `config` names. Private files must not be readable by group or others.
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        Ok(Self {
            grid_intensity: GridIntensity::load(&config.footprint)?,
            upstream: match &config.upstream {
                Some(up) => upstream_credentials(up)?,
                None => upstream::Credentials::default(),
            },
            nats: match &config.nats {
                Some(nats) => nats_credentials(nats)?,
                None => nats::Credentials::default(),
            },
            grpc_tls: config.grpc.tls.as_ref().map(grpc_server_tls).transpose()?,
            mqtt_login: mqtt_login(&config.mqtt)?,
        })
    }
}

/// Reads the files `config` names as a start would ([`Files::load`]), so that a configuration
/// that cannot start is found before it replaces a running one.
pub fn check_files(config: &Config) -> anyhow::Result<()> {
    Files::load(config).map(drop)
}

/// Reads the broker login: the password from `mqtt.password_file` (which must not be readable by
/// group or others) or the environment variable `HUBGATE_MQTT_PASSWORD`, and the `[mqtt.tls]`
/// files.
pub fn mqtt_login(config: &MqttConfig) -> anyhow::Result<Login> {
    let password = match &config.password_file {
        Some(path) => Some(read_secret(path)?),
        None => std::env::var("HUBGATE_MQTT_PASSWORD")
            .ok()
            .filter(|p| !p.is_empty()),
    };
    let tls = match &config.tls {
        None => None,
        Some(tls) => {
            super::install_crypto_provider();
            let read = |path: &std::path::Path| {
                std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
            };
            let client_auth = match (&tls.cert_file, &tls.key_file) {
                (Some(cert), Some(key)) => Some((read(cert)?, read_private(key)?)),
                _ => None,
            };
            Some(std::sync::Arc::new(mqtt_tls(
                &read(&tls.ca_file)?,
                client_auth,
            )?))
        }
    };
    Ok(Login { password, tls })
}

/// The credentials `config` names, read and checked (private files must not be readable by
/// group or others).
pub fn upstream_credentials(config: &UpstreamConfig) -> anyhow::Result<upstream::Credentials> {
    let tls = if config.endpoint.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        tls = match &config.ca_file {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(
                std::fs::read(ca)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", ca.display()))?,
            )),
            None => tls.with_webpki_roots(),
        };
        if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
            let cert = std::fs::read(cert)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", cert.display()))?;
            tls = tls.identity(Identity::from_pem(cert, read_private(key)?));
        }
        // Parse the files now, so that a bad certificate or key stops a start or a reload here.
        tonic::transport::Endpoint::from_shared(config.endpoint.clone())?
            .tls_config(tls.clone())
            .map_err(|e| anyhow::anyhow!("the upstream TLS settings cannot be used: {e}"))?;
        Some(tls)
    } else {
        None
    };
    Ok(upstream::Credentials {
        authorization: upstream_authorization(config)?,
        tls,
    })
}

/// The `authorization` value to send the hub: the token from `token_file`, or from the
/// environment variable `HUBGATE_UPSTREAM_TOKEN`, if either is set.
fn upstream_authorization(
    config: &UpstreamConfig,
) -> anyhow::Result<Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>> {
    let token = match &config.token_file {
        Some(path) => Some(read_secret(path)?),
        None => std::env::var("HUBGATE_UPSTREAM_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty()),
    };
    if token.is_some() && config.endpoint.starts_with("http://") {
        tracing::warn!(
            "the upstream token is sent without TLS (an http:// endpoint): use https:// outside a trusted network"
        );
    }
    token
        .map(|t| {
            let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                format!("Bearer {}", t.trim()).parse().map_err(|_| {
                    anyhow::anyhow!("the upstream token holds characters a header cannot")
                })?;
            // Never indexed by HPACK, never shown by Debug.
            value.set_sensitive(true);
            Ok(value)
        })
        .transpose()
}

/// Reads the files `config` names (the token file must not be readable by group or others).
pub fn nats_credentials(config: &NatsConfig) -> anyhow::Result<nats::Credentials> {
    if let Some(ca) = &config.ca_file {
        std::fs::metadata(ca).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", ca.display()))?;
    }
    let token = config.token_file.as_deref().map(read_secret).transpose()?;
    if token.is_some() && config.url.starts_with("nats://") {
        tracing::warn!(
            "the NATS token is sent without TLS (a nats:// url): use tls:// outside a trusted network"
        );
    }
    Ok(nats::Credentials { token })
}

/// The server's TLS settings from `[grpc.tls]`: its certificate and key, and the CA its clients'
/// certificates must be signed by when mutual TLS is on.
pub fn grpc_server_tls(config: &TlsConfig) -> anyhow::Result<ServerTlsConfig> {
    let cert = std::fs::read(&config.cert_file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", config.cert_file.display()))?;
    let key = read_private(&config.key_file)?;
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if let Some(ca) = &config.client_ca_file {
        let ca =
            std::fs::read(ca).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", ca.display()))?;
        tls = tls.client_ca_root(Certificate::from_pem(ca));
    }
    // Parse the files now, so that a bad certificate or key stops a start or a reload here.
    tonic::transport::Server::builder()
        .tls_config(tls.clone())
        .map_err(|e| anyhow::anyhow!("[grpc.tls] cannot be used: {e}"))?;
    Ok(tls)
}

/// The TLS client configuration for the broker: its CA, and the gateway's certificate and key
/// (PEM) when the broker wants clients to show one.
fn mqtt_tls(
    ca: &[u8],
    client_auth: Option<(Vec<u8>, Vec<u8>)>,
) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca) {
        roots.add(cert.map_err(|e| anyhow::anyhow!("[mqtt.tls] ca_file: {e}"))?)?;
    }
    if roots.is_empty() {
        anyhow::bail!("[mqtt.tls] ca_file holds no certificate");
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    Ok(match client_auth {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(&cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("[mqtt.tls] cert_file: {e}"))?;
            if chain.is_empty() {
                anyhow::bail!("[mqtt.tls] cert_file holds no certificate");
            }
            let key = PrivateKeyDer::from_pem_slice(&key)
                .map_err(|e| anyhow::anyhow!("[mqtt.tls] key_file: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| anyhow::anyhow!("[mqtt.tls] cert_file and key_file: {e}"))?
        }
    })
}

/// Reads a private file (a key) whole. It must not be readable by group or others.
pub fn read_private(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    check_private(path)?;
    std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
}

/// Reads a secret (a token) from `path`: its first line, trimmed. The file must not be readable
/// by group or others.
pub fn read_secret(path: &std::path::Path) -> anyhow::Result<String> {
    check_private(path)?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let secret = text.lines().next().unwrap_or_default().trim().to_owned();
    if secret.is_empty() {
        anyhow::bail!("{} is empty", path.display());
    }
    Ok(secret)
}

fn check_private(path: &std::path::Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            anyhow::bail!(
                "{} is readable by others (mode {:o}): it holds a secret; chmod 600 it",
                path.display(),
                mode & 0o777
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "hg_secret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret(&path).unwrap_err().to_string();
        assert!(err.contains("readable by others (mode 644)"), "{err}");
        assert!(
            !err.contains("hg_secret"),
            "the secret must not be in the error"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret(&path).unwrap(), "hg_secret");
    }
}
