//! Certificates for a cluster's peer port, for the demo and the tests: a
//! throw-away CA and one certificate per node carrying the name that binds
//! it to its id (`node-ID.piehole`). A real deployment uses its own CA.

use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use piehole_node::peer_client::node_name;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// The files of one node: `--tls-cert`, `--tls-key`, `--tls-ca`.
#[derive(Debug, Clone)]
pub struct NodeCerts {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl NodeCerts {
    /// The node flags that use them.
    pub fn args(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (flag, path) in [
            ("--tls-cert", &self.cert),
            ("--tls-key", &self.key),
            ("--tls-ca", &self.ca),
        ] {
            out.push(flag.to_string());
            out.push(path.display().to_string());
        }
        out
    }
}

/// A CA of its own, named `name`: writes `DIR/<name>-ca.pem` and returns an
/// issuer for node certificates.
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
    ca: PathBuf,
    dir: PathBuf,
}

impl Authority {
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<Authority> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("piehole {name} CA"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let ca = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca, issuer.pem()).with_context(|| format!("write {}", ca.display()))?;
        Ok(Authority {
            issuer,
            ca,
            dir: dir.to_path_buf(),
        })
    }

    /// A certificate for node `id` (the name `names`, normally
    /// `node-ID.piehole`), written as `DIR/<file>.pem` and `DIR/<file>.key`.
    pub fn issue(&self, file: &str, names: Vec<String>) -> anyhow::Result<NodeCerts> {
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(names)?.signed_by(&key, &self.issuer)?;
        let cert_path = self.dir.join(format!("{file}.pem"));
        let key_path = self.dir.join(format!("{file}.key"));
        std::fs::write(&cert_path, cert.pem())?;
        // Created private: never readable by others, not even for a moment.
        let _ = std::fs::remove_file(&key_path);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, key.serialize_pem().as_bytes()))
            .with_context(|| format!("write {}", key_path.display()))?;
        Ok(NodeCerts {
            cert: cert_path,
            key: key_path,
            ca: self.ca.clone(),
        })
    }

    /// [`Authority::issue`] for node `id` under its proper name.
    pub fn node(&self, id: u64) -> anyhow::Result<NodeCerts> {
        self.issue(&format!("node-{id}"), vec![node_name(id)])
    }
}
