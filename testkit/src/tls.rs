//! A throwaway public-key infrastructure for TLS tests: a CA, a server certificate for
//! `127.0.0.1` and `localhost`, client certificates signed by it, and a second, unrelated CA
//! with a client certificate of its own (the "robot that presents the wrong CA").
//!
//! Everything is generated fresh per test with rcgen and written as PEM files into a temporary
//! directory, because that is what the programs read (paths in flags and config files), so the
//! tests go through the same file loading as a real deployment.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

use fleet_connect::NatsTls;

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA that signs server and client certificates, plus an unrelated second CA. The files live
/// as long as this value.
pub struct TestPki {
    dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    other: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate (PEM), what clients trust.
    pub ca_cert: PathBuf,
    /// A CA that signed none of the certificates below (except [`TestPki::wrong_client`]).
    pub other_ca_cert: PathBuf,
    /// The server's certificate for `127.0.0.1`, `::1` and `localhost`, signed by the CA.
    pub server: CertFiles,
}

impl TestPki {
    pub fn new() -> anyhow::Result<TestPki> {
        let dir = tempfile::Builder::new().prefix("fleet-pki-").tempdir().context("PKI directory")?;
        let ca = new_ca("Fleet test CA")?;
        let other = new_ca("Unrelated test CA")?;
        let ca_cert = write(dir.path(), "ca.pem", &ca.pem())?;
        let other_ca_cert = write(dir.path(), "other-ca.pem", &other.pem())?;
        let mut pki = TestPki {
            server: CertFiles { cert: PathBuf::new(), key: PathBuf::new() },
            dir,
            ca,
            other,
            ca_cert,
            other_ca_cert,
        };
        pki.server = pki.issue(
            "server",
            &["127.0.0.1", "::1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
            false,
        )?;
        Ok(pki)
    }

    /// The folder holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A new client certificate named `name` (its common name), signed by the CA.
    pub fn client(&self, name: &str) -> anyhow::Result<CertFiles> {
        self.issue(name, &[], ExtendedKeyUsagePurpose::ClientAuth, false)
    }

    /// A client certificate signed by the unrelated CA: a server trusting only the test CA
    /// refuses it.
    pub fn wrong_client(&self, name: &str) -> anyhow::Result<CertFiles> {
        self.issue(name, &[], ExtendedKeyUsagePurpose::ClientAuth, true)
    }

    /// Client settings that trust the CA and present a new client certificate `name`.
    pub fn client_tls(&self, name: &str) -> anyhow::Result<NatsTls> {
        let files = self.client(name)?;
        Ok(NatsTls {
            ca: Some(self.ca_cert.clone()),
            cert: Some(files.cert),
            key: Some(files.key),
            require: true,
        })
    }

    /// The nats-server TLS settings: the server certificate, client certificates verified
    /// against the CA when `verify_clients`, and what the harness's own probe presents.
    pub fn server_tls(&self, verify_clients: bool) -> anyhow::Result<crate::ServerTls> {
        Ok(crate::ServerTls {
            cert: self.server.cert.clone(),
            key: self.server.key.clone(),
            ca: Some(self.ca_cert.clone()),
            verify_clients,
            probe: self.client_tls("testkit-probe")?,
        })
    }

    fn issue(
        &self,
        name: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        by_other: bool,
    ) -> anyhow::Result<CertFiles> {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .with_context(|| format!("certificate parameters for {name}"))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().context("key pair")?;
        let issuer = if by_other { &self.other } else { &self.ca };
        let cert = params.signed_by(&key, issuer).with_context(|| format!("signing {name}"))?;
        let stem = if by_other { format!("{name}.other") } else { name.to_owned() };
        Ok(CertFiles {
            cert: write(self.dir.path(), &format!("{stem}.pem"), &cert.pem())?,
            key: write(self.dir.path(), &format!("{stem}-key.pem"), &key.serialize_pem())?,
        })
    }
}

fn new_ca(name: &str) -> anyhow::Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().context("CA key pair")?;
    CertifiedIssuer::self_signed(params, key).with_context(|| format!("self-signing {name}"))
}

fn write(dir: &Path, name: &str, pem: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
