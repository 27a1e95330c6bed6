use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use piehole_node::config::{parse_peers, NodeSettings};

#[derive(clap::Args)]
pub struct Args {
    /// This node's id (a positive integer, one of --peers; unique among
    /// the nodes sharing an etcd prefix).
    #[arg(long)]
    id: Option<u64>,
    /// Where the node keeps its log, state and socket.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Peer API address, HOST:PORT (numeric IP).
    #[arg(long)]
    listen: Option<String>,
    /// Every member, for a new cluster's first start: ID=HOST:PORT,...
    /// Later the members come from the data dir; an entry here still
    /// overrides the address this node dials that member at.
    #[arg(long, value_parser = parse_peers)]
    peers: Option<std::collections::BTreeMap<String, String>>,
    /// First start of a node added with `piehole member add`: members to
    /// learn the cluster from, HOST:PORT[,HOST:PORT...]. Later starts use
    /// the data dir alone.
    #[arg(long, value_delimiter = ',')]
    join: Option<Vec<String>>,
    /// Compatibility mode: etcd v3 endpoints instead of the embedded Raft.
    #[arg(long, value_delimiter = ',')]
    etcd: Option<Vec<String>>,
    /// Key prefix of piehole's keys in etcd [default: /piehole/].
    #[arg(long)]
    etcd_prefix: Option<String>,
    /// etcd user to log in as (with --etcd-password-file).
    #[arg(long)]
    etcd_user: Option<String>,
    /// File whose first line is that user's etcd password.
    #[arg(long)]
    etcd_password_file: Option<PathBuf>,
    /// CA certificate (PEM) that etcd's server certificates are signed by.
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd; needs --etcd-key.
    #[arg(long)]
    etcd_cert: Option<PathBuf>,
    /// Client key (PEM) for etcd.
    #[arg(long)]
    etcd_key: Option<PathBuf>,
    /// In etcd mode, the peer address other nodes reach this one at
    /// [default: --listen].
    #[arg(long)]
    advertise: Option<String>,
    /// File holding the cluster secret (else PIEHOLE_CLUSTER_SECRET).
    #[arg(long)]
    cluster_secret_file: Option<PathBuf>,
    /// Longest a ref update may wait for the cluster before failing [default: 10000].
    #[arg(long)]
    request_timeout_ms: Option<u64>,
    /// Compact the Raft log every this many entries [default: 1000].
    #[arg(long)]
    snapshot_interval: Option<u64>,
    /// How often every replica is compared with the consensus [default: 5000].
    #[arg(long)]
    reconcile_interval_ms: Option<u64>,
    /// When a push is acknowledged: `local` (objects on the receiving
    /// replica, refs committed) or `quorum` (objects also stored on a
    /// majority of nodes first) [default: local].
    #[arg(long)]
    durability: Option<String>,
    /// Refuse every push and every write but `piehole consensus import`:
    /// for moving the consensus between the embedded Raft and etcd.
    #[arg(long)]
    paused: bool,
    /// Members of this group (name or gid) are admins of the node, beside
    /// root and the node's own user: clobber, ref cas, member changes.
    #[arg(long)]
    admin_group: Option<String>,
    /// The local socket's group (name or gid): the users who push. They
    /// reach the socket and nothing else in the data dir.
    #[arg(long)]
    socket_group: Option<String>,
    /// Keep repositories only under this directory (repeatable): nothing
    /// outside it is registered, read, written or served, whatever arrives
    /// through the log.
    #[arg(long)]
    repo_root: Option<Vec<PathBuf>>,
    /// Most connections the peer port holds open at once; beyond it the
    /// oldest that has not spoken yet is closed [default: 512].
    #[arg(long)]
    max_peer_connections: Option<usize>,
    /// Largest pack this node takes from a peer, in bytes [default: 32 GiB].
    #[arg(long)]
    max_pack_bytes: Option<u64>,
    /// Most groups the cluster may hold; installing a new group beyond it
    /// is refused [default: 100000].
    #[arg(long)]
    max_groups: Option<u64>,
    /// Mutual TLS on the peer port: this node's certificate (PEM), which
    /// must carry the DNS name node-ID.piehole; with --tls-key and --tls-ca.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// This node's private key (PEM), readable by the node's user alone.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// The CA (PEM) every member's certificate is signed by; a peer without
    /// one, or whose certificate names another node, is refused.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Most refs a group may hold; a push creating refs beyond it is
    /// refused [default: 1000000].
    #[arg(long)]
    max_refs_per_group: Option<u64>,
    /// Read these settings from a TOML file (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let file = match &a.config {
        Some(path) => NodeSettings::from_toml_file(path).map_err(|e| anyhow!(e))?,
        None => NodeSettings::default(),
    };
    let flags = NodeSettings {
        id: a.id,
        data_dir: a.data_dir,
        listen: a.listen,
        peers: a.peers,
        cluster_secret_file: a.cluster_secret_file,
        request_timeout_ms: a.request_timeout_ms,
        snapshot_interval: a.snapshot_interval,
        reconcile_interval_ms: a.reconcile_interval_ms,
        durability: a.durability,
        etcd: a.etcd,
        etcd_prefix: a.etcd_prefix,
        etcd_user: a.etcd_user,
        etcd_password_file: a.etcd_password_file,
        etcd_ca: a.etcd_ca,
        etcd_cert: a.etcd_cert,
        etcd_key: a.etcd_key,
        advertise: a.advertise,
        paused: a.paused.then_some(true),
        join: a.join,
        admin_group: a.admin_group,
        socket_group: a.socket_group,
        repo_root: a.repo_root,
        max_peer_connections: a.max_peer_connections,
        max_pack_bytes: a.max_pack_bytes,
        max_groups: a.max_groups,
        max_refs_per_group: a.max_refs_per_group,
        tls_cert: a.tls_cert,
        tls_key: a.tls_key,
        tls_ca: a.tls_ca,
    };
    let env_secret = std::env::var("PIEHOLE_CLUSTER_SECRET")
        .ok()
        .filter(|s| !s.is_empty());
    let config = file
        .merge(flags)
        .into_config(env_secret)
        .map_err(|e| anyhow!(e))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(piehole_node::server::run(config))?;
    Ok(ExitCode::SUCCESS)
}
