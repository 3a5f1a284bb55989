//! Reading PEM certificates and keys into rustls types, with errors that name the file.
//!
//! async-nats can read these files itself, but only when it connects: with
//! `retry_on_initial_connect` (which every Fleet program uses, so it may start before NATS) a
//! missing or garbled file then shows up as an endless retry loop in the log instead of an error
//! at start. So the files are read and checked here, once, before any connection is tried, and
//! the same code serves the gateway's HTTPS certificate.
//!
//! Only rustls's `ring` provider is used, passed explicitly, so no process-wide default provider
//! has to be installed and a second crypto backend in the dependency tree could not make rustls
//! panic for want of a choice.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// A certificate, key or CA file that cannot be used; the message names the file and its role.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    // The I/O error is part of the message, not a `source`, so a cause chain does not say it twice.
    #[error("{what} {}: cannot read it: {error}", path.display())]
    Read { what: &'static str, path: PathBuf, error: std::io::Error },
    #[error("{what} {}: {reason}", path.display())]
    Invalid { what: &'static str, path: PathBuf, reason: String },
    #[error("{0}")]
    Incomplete(String),
}

impl TlsFileError {
    fn invalid(what: &'static str, path: &Path, reason: impl ToString) -> Self {
        TlsFileError::Invalid { what, path: path.to_owned(), reason: reason.to_string() }
    }
}

/// The one crypto provider Fleet uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|error| TlsFileError::Read { what, path: path.to_owned(), error })
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let bytes = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsFileError::invalid(what, path, format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(TlsFileError::invalid(
            what,
            path,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    let bytes = read(what, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            TlsFileError::invalid(what, path, "holds no PEM private key (-----BEGIN PRIVATE KEY-----)")
        }
        e => TlsFileError::invalid(what, path, format!("not a PEM private key ({e})")),
    })
}

/// The trust anchors of a CA file: the only roots trusted when a CA is given.
pub fn load_roots(what: &'static str, path: &Path) -> Result<RootCertStore, TlsFileError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(what, path)? {
        roots
            .add(cert)
            .map_err(|e| TlsFileError::invalid(what, path, format!("not a usable CA certificate ({e})")))?;
    }
    Ok(roots)
}

/// A certificate chain and its key, checked to belong together.
pub fn load_identity(
    cert_what: &'static str,
    cert: &Path,
    key_what: &'static str,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsFileError> {
    let chain = load_certs(cert_what, cert)?;
    let der = load_key(key_what, key)?;
    CertifiedKey::from_der(chain.clone(), der.clone_key(), &provider()).map_err(|e| {
        let reason = match e {
            rustls::Error::InconsistentKeys(_) => "is not the key of the certificate".to_owned(),
            e => format!("cannot be used with the certificate ({e})"),
        };
        TlsFileError::Incomplete(format!("{key_what} {} {reason} {}", key.display(), cert.display()))
    })?;
    Ok((chain, der))
}

/// The rustls server configuration for an HTTPS listener (HTTP/1.1 and HTTP/2 by ALPN).
pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsFileError> {
    let (chain, der) = load_identity("TLS certificate", cert, "TLS key", key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsFileError::Incomplete(format!("TLS protocol versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, der)
        .map_err(|e| TlsFileError::invalid("TLS key", key, e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
