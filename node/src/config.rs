//! A node's settings, from flags or a TOML file, checked before anything starts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::access::{resolve_group, RepoRoots};
use crate::durability::Durability;
use crate::peer_client::PeerTls;

/// Settings as written by a user (flags or `--config FILE`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeSettings {
    pub id: Option<u64>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    /// "1=host:port,2=host:port" on the command line; a table in TOML.
    pub peers: Option<BTreeMap<String, String>>,
    pub cluster_secret_file: Option<PathBuf>,
    pub request_timeout_ms: Option<u64>,
    pub snapshot_interval: Option<u64>,
    pub reconcile_interval_ms: Option<u64>,
    pub durability: Option<String>,
    pub etcd: Option<Vec<String>>,
    pub etcd_prefix: Option<String>,
    pub etcd_user: Option<String>,
    pub etcd_password_file: Option<PathBuf>,
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
    pub advertise: Option<String>,
    pub paused: Option<bool>,
    /// First start of a member added with `member add`: members to ask.
    pub join: Option<Vec<String>>,
    /// Group (name or gid) whose members are admins beside root and the
    /// node's user.
    pub admin_group: Option<String>,
    /// Group (name or gid) the local socket belongs to: the pushers.
    pub socket_group: Option<String>,
    /// Directories the node keeps repositories under (repeatable).
    pub repo_root: Option<Vec<PathBuf>>,
    /// Most connections the peer port holds open at once.
    pub max_peer_connections: Option<usize>,
    /// Largest pack taken from a peer.
    pub max_pack_bytes: Option<u64>,
    /// Most groups the cluster may hold: a new group beyond it is refused.
    pub max_groups: Option<u64>,
    /// Most refs a group may hold: a push creating refs beyond it is refused.
    pub max_refs_per_group: Option<u64>,
    /// Mutual TLS on the peer port: this node's certificate and key, and
    /// the CA every member's certificate is signed by (all PEM).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
}

/// Compatibility mode: where the consensus lives in etcd, and how to log in.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Ends with '/'.
    pub prefix: String,
    /// (user, password)
    pub auth: Option<(String, String)>,
    /// CA, and client (certificate, key), all PEM.
    pub ca: Option<Vec<u8>>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The peer address this node registers for the others.
    pub advertise: String,
}

/// Settings after checking, as the node uses them.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Every member, this node included: id -> peer API address.
    pub peers: BTreeMap<u64, String>,
    /// None: a loopback node uses the secret it generates in its data dir
    /// ([`generated_secret`]), or none with TLS.
    pub cluster_secret: Option<String>,
    /// Bound on how long a proposal may wait before failing with a clear error.
    pub request_timeout: Duration,
    pub tick: Duration,
    pub snapshot_interval: u64,
    pub reconcile_interval: Duration,
    pub durability: Durability,
    /// Some: the consensus is in etcd, and `peers` holds only this node.
    pub etcd: Option<EtcdConfig>,
    /// Refuse every write but an import (moving between backends).
    pub paused: bool,
    /// Members to ask on the first start of a node added with `member add`.
    pub join: Option<Vec<String>>,
    pub admin_gid: Option<u32>,
    pub socket_gid: Option<u32>,
    pub repo_roots: RepoRoots,
    pub max_peer_connections: usize,
    pub max_pack_bytes: u64,
    pub max_groups: u64,
    pub max_refs_per_group: u64,
    pub tls: Option<Arc<PeerTls>>,
}

impl NodeConfig {
    pub fn socket_path(&self) -> PathBuf {
        self.data_dir.join("piehole.sock")
    }
}

/// Reads the cluster secret from a file that only this user can read: a
/// secret others can read lets them speak to every node's peer port.
fn read_secret_file(path: &std::path::Path) -> Result<String, String> {
    owner_only(path, "cluster secret file")?;
    let shown = path.display();
    let s = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read cluster secret file {shown}: {e}"))?;
    Ok(s.trim().to_string())
}

fn check_secret(s: &str) -> Result<(), String> {
    if s.len() < 16 {
        return Err("the cluster secret must be at least 16 characters".into());
    }
    // It travels as an HTTP/2 header value: anything else would make
    // every peer call fail later, far from the cause.
    if let Some(bad) = s.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(format!(
            "the cluster secret may hold printable ASCII only (found {:?})",
            bad.escape_default().to_string()
        ));
    }
    Ok(())
}

/// The file in the data dir holding the secret a node generates for itself.
pub const GENERATED_SECRET_FILE: &str = "cluster-secret";

/// The secret of a loopback node given neither a secret nor TLS: without
/// one, every local user could speak to its peer port as a member. It is
/// generated on the first start into a file only the node's user can read,
/// and read back on every later start; other members on this host are
/// given that file with --cluster-secret-file.
pub fn generated_secret(data_dir: &std::path::Path) -> Result<String, String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = data_dir.join(GENERATED_SECRET_FILE);
    let absent = match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            return Err(format!(
                "cannot read cluster secret file {}: {e}",
                path.display()
            ))
        }
        // Whoever could put it there could choose the secret.
        Ok(m) if !m.is_file() => {
            return Err(format!(
                "cluster secret file {} is not a plain file: remove it, and a new secret \
                 is generated at the next start",
                path.display()
            ))
        }
        Ok(_) => false,
    };
    if absent {
        let secret: String = {
            use rand::Rng as _;
            let bytes: [u8; 32] = rand::thread_rng().gen();
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        };
        // Written aside and renamed into place, both synced: a node killed
        // midway leaves no file or the whole secret, never half of one.
        let fresh = data_dir.join(format!("{GENERATED_SECRET_FILE}.new"));
        let written = (|| {
            let _ = std::fs::remove_file(&fresh);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&fresh)?;
            f.write_all(format!("{secret}\n").as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&fresh, &path)?;
            std::fs::File::open(data_dir)?.sync_all()
        })();
        written.map_err(|e| {
            format!(
                "cannot write a cluster secret to {} (through {}): {e}",
                path.display(),
                fresh.display()
            )
        })?;
        tracing::info!(
            file = %path.display(),
            "no cluster secret given: generated one; other members on this host \
             need it too (--cluster-secret-file)"
        );
    }
    let secret = read_secret_file(&path)?;
    check_secret(&secret).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(secret)
}

/// Refuses a file holding a secret that others can read or that another
/// user owns.
fn owner_only(path: &std::path::Path, what: &str) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {what} {shown}: {e}"))?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{what} {shown} can be read by others (mode {mode:o}): `chmod 600 {shown}`"
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "{what} {shown} belongs to uid {}, not to this node's user (uid {me})",
            meta.uid()
        ));
    }
    Ok(())
}

/// Parses "1=host:port,2=host:port".
pub fn parse_peers(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("peer {part:?} is not of the form ID=HOST:PORT"))?;
        out.insert(id.trim().to_string(), addr.trim().to_string());
    }
    Ok(out)
}

impl NodeSettings {
    /// Later settings (flags) override earlier ones (the file).
    pub fn merge(self, over: NodeSettings) -> NodeSettings {
        NodeSettings {
            id: over.id.or(self.id),
            data_dir: over.data_dir.or(self.data_dir),
            listen: over.listen.or(self.listen),
            peers: over.peers.or(self.peers),
            cluster_secret_file: over.cluster_secret_file.or(self.cluster_secret_file),
            request_timeout_ms: over.request_timeout_ms.or(self.request_timeout_ms),
            snapshot_interval: over.snapshot_interval.or(self.snapshot_interval),
            reconcile_interval_ms: over.reconcile_interval_ms.or(self.reconcile_interval_ms),
            durability: over.durability.or(self.durability),
            etcd: over.etcd.or(self.etcd),
            etcd_prefix: over.etcd_prefix.or(self.etcd_prefix),
            etcd_user: over.etcd_user.or(self.etcd_user),
            etcd_password_file: over.etcd_password_file.or(self.etcd_password_file),
            etcd_ca: over.etcd_ca.or(self.etcd_ca),
            etcd_cert: over.etcd_cert.or(self.etcd_cert),
            etcd_key: over.etcd_key.or(self.etcd_key),
            advertise: over.advertise.or(self.advertise),
            paused: over.paused.or(self.paused),
            join: over.join.or(self.join),
            admin_group: over.admin_group.or(self.admin_group),
            socket_group: over.socket_group.or(self.socket_group),
            repo_root: over.repo_root.or(self.repo_root),
            max_peer_connections: over.max_peer_connections.or(self.max_peer_connections),
            max_pack_bytes: over.max_pack_bytes.or(self.max_pack_bytes),
            max_groups: over.max_groups.or(self.max_groups),
            max_refs_per_group: over.max_refs_per_group.or(self.max_refs_per_group),
            tls_cert: over.tls_cert.or(self.tls_cert),
            tls_key: over.tls_key.or(self.tls_key),
            tls_ca: over.tls_ca.or(self.tls_ca),
        }
    }

    pub fn from_toml_file(path: &std::path::Path) -> Result<NodeSettings, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))
    }

    /// Checks everything that can be checked without touching the network.
    /// `env_secret` is PIEHOLE_CLUSTER_SECRET, if set.
    pub fn into_config(self, env_secret: Option<String>) -> Result<NodeConfig, String> {
        let id = self.id.ok_or("--id is required")?;
        if id == 0 {
            return Err("--id must be a positive integer".into());
        }
        let data_dir = self.data_dir.clone().ok_or("--data-dir is required")?;
        let listen_s = self.listen.clone().ok_or("--listen is required")?;
        let listen: SocketAddr = listen_s.parse().map_err(|_| {
            format!("--listen {listen_s:?} is not HOST:PORT with a numeric IP address")
        })?;
        let etcd = self.etcd_config(&listen_s)?;
        let tls = self.tls()?;
        let join = match self.join {
            None => None,
            Some(_) if etcd.is_some() => {
                return Err("--join is for the embedded Raft; in etcd mode nodes find each other through etcd".into())
            }
            Some(_) if self.peers.is_some() => {
                return Err("--join and --peers exclude each other: a joining node learns the members from the cluster".into())
            }
            Some(targets) => {
                let targets: Vec<String> = targets
                    .iter()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
                    .collect();
                for t in &targets {
                    let (id, addr) = match t.split_once('=') {
                        Some((id, addr)) => (Some(id), addr),
                        None => (None, t.as_str()),
                    };
                    if !addr.contains(':') || id.is_some_and(|id| id.parse::<u64>().is_err()) {
                        return Err(format!("--join {t:?} is not [ID=]HOST:PORT"));
                    }
                    if id.is_none() && self.tls_ca.is_some() {
                        return Err(format!(
                            "--join {t:?}: with TLS give the member's id too, ID=HOST:PORT, \
                             so that its certificate can be checked"
                        ));
                    }
                }
                if targets.is_empty() {
                    return Err("--join needs at least one HOST:PORT of a member".into());
                }
                Some(targets)
            }
        };
        let raw_peers = match (&etcd, self.peers) {
            (None, None) if join.is_some() => BTreeMap::from([(id.to_string(), listen_s.clone())]),
            (None, Some(p)) => p,
            (None, None) => {
                return Err(
                    "--peers is required (ID=HOST:PORT,...), or --join (a member added with `member add`), or --etcd"
                        .into(),
                )
            }
            (Some(_), Some(_)) => {
                return Err(
                    "--peers and --etcd exclude each other: in etcd mode nodes find each other through etcd"
                        .into(),
                )
            }
            (Some(e), None) => BTreeMap::from([(id.to_string(), e.advertise.clone())]),
        };
        let mut peers = BTreeMap::new();
        for (k, addr) in raw_peers {
            let pid: u64 = k
                .parse()
                .map_err(|_| format!("peer id {k:?} is not a positive integer"))?;
            if pid == 0 {
                return Err("peer ids must be positive integers".into());
            }
            if addr.parse::<SocketAddr>().is_err() && !addr.contains(':') {
                return Err(format!("peer {pid} address {addr:?} is not HOST:PORT"));
            }
            peers.insert(pid, addr);
        }
        if !peers.contains_key(&id) {
            return Err(format!("--peers does not include this node's --id {id}"));
        }
        let cluster_secret = match (self.cluster_secret_file, env_secret) {
            (Some(path), _) => Some(read_secret_file(&path)?),
            (None, Some(s)) => Some(s.trim().to_string()),
            (None, None) => None,
        };
        if let Some(s) = &cluster_secret {
            check_secret(s)?;
        }
        if cluster_secret.is_none() && !listen.ip().is_loopback() {
            return Err(format!(
                "refusing to listen on non-loopback {listen} without a cluster secret \
                 (use --cluster-secret-file or PIEHOLE_CLUSTER_SECRET)"
            ));
        }
        let group = |flag: &str, g: &Option<String>| {
            g.as_deref()
                .map(|g| resolve_group(g).map_err(|e| format!("{flag}: {e}")))
                .transpose()
        };
        let admin_gid = group("--admin-group", &self.admin_group)?;
        let socket_gid = group("--socket-group", &self.socket_group)?;
        let repo_roots = RepoRoots::new(self.repo_root.as_deref().unwrap_or_default())?;
        let durability = match self.durability {
            Some(d) => d.parse()?,
            None => Durability::default(),
        };
        Ok(NodeConfig {
            durability,
            id,
            data_dir,
            listen,
            peers,
            cluster_secret,
            request_timeout: Duration::from_millis(
                self.request_timeout_ms.unwrap_or(10_000).max(100),
            ),
            tick: Duration::from_millis(100),
            snapshot_interval: self.snapshot_interval.unwrap_or(1000).max(10),
            reconcile_interval: Duration::from_millis(
                self.reconcile_interval_ms.unwrap_or(5_000).max(100),
            ),
            etcd,
            paused: self.paused.unwrap_or(false),
            join,
            admin_gid,
            socket_gid,
            repo_roots,
            max_peer_connections: self.max_peer_connections.unwrap_or(512).max(8),
            max_pack_bytes: self.max_pack_bytes.unwrap_or(32 << 30),
            max_groups: self.max_groups.unwrap_or(100_000),
            max_refs_per_group: self.max_refs_per_group.unwrap_or(1_000_000),
            tls,
        })
    }

    /// The peer port's TLS material, read and checked; None without it.
    fn tls(&self) -> Result<Option<Arc<PeerTls>>, String> {
        let (cert, key, ca) = match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => return Ok(None),
            (Some(c), Some(k), Some(a)) => (c, k, a),
            _ => return Err("--tls-cert, --tls-key and --tls-ca go together".into()),
        };
        let read = |flag: &str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| format!("cannot read {flag} {}: {e}", p.display()))
        };
        let pem = |flag: &str, p: &PathBuf, what: &str| -> Result<Vec<u8>, String> {
            let bytes = read(flag, p)?;
            if !String::from_utf8_lossy(&bytes).contains(&format!("-----BEGIN {what}")) {
                return Err(format!("{flag} {} holds no PEM {what}", p.display()));
            }
            Ok(bytes)
        };
        // The key is a secret like the cluster secret: its file must be ours alone.
        owner_only(key, "--tls-key")?;
        let tls = PeerTls {
            cert: pem("--tls-cert", cert, "CERTIFICATE")?,
            key: pem("--tls-key", key, "")?,
            ca: pem("--tls-ca", ca, "CERTIFICATE")?,
        };
        // Caught here, not as every peer's refusal later.
        use rustls_pki_types::pem::PemObject as _;
        let id = self.id.unwrap_or_default();
        let ours = rustls_pki_types::CertificateDer::from_pem_slice(&tls.cert)
            .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
        if !crate::peer_client::certificate_is_node(&ours, id) {
            return Err(format!(
                "--tls-cert {} does not name this node: it must carry the DNS name {} \
                 (a subjectAltName; the common name does not count)",
                cert.display(),
                crate::peer_client::node_name(id)
            ));
        }
        if self.etcd.is_some() {
            return Err("--tls-* is for the embedded Raft's peer port; etcd mode has --etcd-ca, --etcd-cert, --etcd-key".into());
        }
        Ok(Some(Arc::new(tls)))
    }

    /// The etcd settings, read and checked; None without --etcd.
    fn etcd_config(&self, listen: &str) -> Result<Option<EtcdConfig>, String> {
        let Some(endpoints) = &self.etcd else {
            let stray = [
                ("--etcd-prefix", self.etcd_prefix.is_some()),
                ("--etcd-user", self.etcd_user.is_some()),
                ("--etcd-password-file", self.etcd_password_file.is_some()),
                ("--etcd-ca", self.etcd_ca.is_some()),
                ("--etcd-cert", self.etcd_cert.is_some()),
                ("--etcd-key", self.etcd_key.is_some()),
                ("--advertise", self.advertise.is_some()),
            ];
            if let Some((flag, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(format!("{flag} needs --etcd"));
            }
            return Ok(None);
        };
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err("--etcd needs at least one endpoint URL".into());
        }
        let mut prefix = self
            .etcd_prefix
            .clone()
            .unwrap_or_else(|| "/piehole/".into());
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let read = |what: &str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| format!("cannot read {what} {}: {e}", p.display()))
        };
        let auth = match (&self.etcd_user, &self.etcd_password_file) {
            (None, None) => None,
            (Some(user), Some(p)) => {
                if user.is_empty() || user.contains(char::is_whitespace) {
                    return Err(format!("--etcd-user {user:?} is not a user name"));
                }
                let text = String::from_utf8(read("--etcd-password-file", p)?)
                    .map_err(|_| format!("{} is not text", p.display()))?;
                let password = text.lines().next().unwrap_or_default();
                if password.is_empty() {
                    return Err(format!("{} holds no password", p.display()));
                }
                Some((user.clone(), password.to_string()))
            }
            _ => return Err("--etcd-user and --etcd-password-file go together".into()),
        };
        let ca = self
            .etcd_ca
            .as_ref()
            .map(|p| read("--etcd-ca", p))
            .transpose()?;
        let identity = match (&self.etcd_cert, &self.etcd_key) {
            (None, None) => None,
            (Some(c), Some(k)) => Some((read("--etcd-cert", c)?, read("--etcd-key", k)?)),
            _ => return Err("--etcd-cert and --etcd-key go together".into()),
        };
        let advertise = self.advertise.clone().unwrap_or_else(|| listen.to_string());
        // Other nodes dial this address: 0.0.0.0 would reach themselves.
        match advertise.parse::<SocketAddr>() {
            Ok(a) if a.ip().is_unspecified() => {
                return Err(format!(
                    "in etcd mode other nodes dial this node at {advertise}; give --advertise \
                     HOST:PORT with an address they can reach"
                ))
            }
            Ok(_) => {}
            Err(_)
                if advertise
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) => {}
            Err(_) => return Err(format!("--advertise {advertise:?} is not HOST:PORT")),
        }
        Ok(Some(EtcdConfig {
            endpoints,
            prefix,
            auth,
            ca,
            identity,
            advertise,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_secret_is_private_kept_across_starts_and_a_broken_one_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        // What a node killed while writing leaves aside is not in the way.
        std::fs::write(dir.path().join("cluster-secret.new"), "half").unwrap();
        let first = generated_secret(dir.path()).unwrap();
        assert_eq!(first.len(), 64, "{first:?}");
        let file = dir.path().join(GENERATED_SECRET_FILE);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.path().join("cluster-secret.new").exists());
        assert_eq!(generated_secret(dir.path()).unwrap(), first);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(generated_secret(other.path()).unwrap(), first);
        // One that was tampered with is refused, not replaced.
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, "a secret someone else chose\n").unwrap();
        std::fs::rename(&file, dir.path().join("kept")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &file).unwrap();
        let e = generated_secret(dir.path()).unwrap_err();
        assert!(e.contains("not a plain file"), "{e}");
        std::fs::remove_file(&file).unwrap();
        std::fs::rename(dir.path().join("kept"), &file).unwrap();
        std::fs::write(&file, "short\n").unwrap();
        let e = generated_secret(dir.path()).unwrap_err();
        assert!(e.contains("at least 16"), "{e}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = generated_secret(dir.path()).unwrap_err();
        assert!(e.contains("can be read by others"), "{e}");
    }

    fn settings(id: u64, listen: &str, peers: &str) -> NodeSettings {
        NodeSettings {
            id: Some(id),
            data_dir: Some("/tmp/x".into()),
            listen: Some(listen.into()),
            peers: Some(parse_peers(peers).unwrap()),
            ..Default::default()
        }
    }

    #[test]
    fn accepts_a_loopback_cluster() {
        let c = settings(
            2,
            "127.0.0.1:7002",
            "1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003",
        )
        .into_config(None)
        .unwrap();
        assert_eq!(c.peers.len(), 3);
        assert_eq!(c.request_timeout, Duration::from_secs(10));
    }

    #[test]
    fn refuses_peers_without_self_and_open_listen_without_secret() {
        let e = settings(4, "127.0.0.1:7004", "1=127.0.0.1:7001")
            .into_config(None)
            .unwrap_err();
        assert!(e.contains("does not include"), "{e}");
        let e = settings(1, "0.0.0.0:7001", "1=127.0.0.1:7001")
            .into_config(None)
            .unwrap_err();
        assert!(e.contains("without a cluster secret"), "{e}");
        assert!(settings(1, "0.0.0.0:7001", "1=127.0.0.1:7001")
            .into_config(Some("0123456789abcdef".into()))
            .is_ok());
        assert!(parse_peers("1:abc").is_err());
    }

    #[test]
    fn etcd_settings_are_checked() {
        let etcd = |listen: &str| NodeSettings {
            id: Some(1),
            data_dir: Some("/tmp/x".into()),
            listen: Some(listen.into()),
            etcd: Some(vec!["http://127.0.0.1:2379".into()]),
            ..Default::default()
        };
        let c = etcd("127.0.0.1:7001").into_config(None).unwrap();
        let e = c.etcd.expect("etcd mode");
        assert_eq!(e.prefix, "/piehole/");
        assert_eq!(e.advertise, "127.0.0.1:7001");
        assert_eq!(
            c.peers.len(),
            1,
            "only this node, until etcd names the others"
        );
        // Others would dial 0.0.0.0, which is themselves.
        let e = etcd("0.0.0.0:7001")
            .into_config(Some("0123456789abcdef".into()))
            .unwrap_err();
        assert!(e.contains("--advertise"), "{e}");
        let mut s = etcd("0.0.0.0:7001");
        s.advertise = Some("10.0.0.1:7001".into());
        assert!(s.into_config(Some("0123456789abcdef".into())).is_ok());
        let mut s = etcd("127.0.0.1:7001");
        s.peers = Some(parse_peers("1=127.0.0.1:7001").unwrap());
        assert!(s
            .into_config(None)
            .unwrap_err()
            .contains("exclude each other"));
        let mut s = etcd("127.0.0.1:7001");
        s.etcd_user = Some("root".into());
        assert!(s.into_config(None).unwrap_err().contains("go together"));
        let mut s = settings(1, "127.0.0.1:7001", "1=127.0.0.1:7001");
        s.etcd_prefix = Some("/p/".into());
        assert!(s.into_config(None).unwrap_err().contains("needs --etcd"));
    }

    #[test]
    fn toml_settings() {
        let s: NodeSettings = toml::from_str(
            "id = 1\ndata-dir = \"/d\"\nlisten = \"127.0.0.1:1\"\n[peers]\n1 = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        assert!(s.into_config(None).is_ok());
        assert!(toml::from_str::<NodeSettings>("bogus = 1").is_err());
    }
}
