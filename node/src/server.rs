//! Wires a node together and runs it until SIGINT/SIGTERM or a fatal error.

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, Context};
use piehole_protocol::limits::{MAX_MESSAGE_BYTES, MAX_PEER_MESSAGE_BYTES};
use piehole_protocol::pb::{local_server::LocalServer, peer_server::PeerServer};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt as _;

use crate::access::{Access, Identified};
use crate::api::local::LocalService;
use crate::api::peer::{PeerGate, PeerParts, PeerService};
use crate::config::NodeConfig;
use crate::consensus::etcd::EtcdConsensus;
use crate::consensus::raft::bootstrap::{self, Identity};
use crate::consensus::raft::storage::RaftStorage;
use crate::consensus::raft::RaftConsensus;
use crate::consensus::Consensus;
use crate::disk::Disk;
use crate::durability::ObjectQuorum;
use crate::listener;
use crate::local_refs::LocalRefs;
use crate::peer_client::PeerAuth;
use crate::push::Pushes;
use crate::replicator::Replicator;
use crate::state::StateMachine;

/// The consensus backend's own task: the Raft driver thread, or the etcd
/// watch and lease. The node stops when it ends.
type Backend = tokio::task::JoinHandle<anyhow::Result<()>>;

pub async fn run(config: NodeConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    // The socket's group may pass through the data dir to the socket, and
    // nothing more: it can neither list it nor read the database.
    std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o710))
        .with_context(|| format!("data dir {} is not usable", config.data_dir.display()))?;
    if let Some(gid) = config.socket_gid {
        std::os::unix::fs::chown(&config.data_dir, None, Some(gid)).with_context(|| {
            format!(
                "cannot give data dir {} to group {gid}",
                config.data_dir.display()
            )
        })?;
    }
    let db_dir = config.data_dir.join("db");
    let disk = Arc::new(Disk::open(&db_dir)?);
    std::fs::set_permissions(&db_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("{} is not usable", db_dir.display()))?;

    // Bind the peer port before anything else, so a port in use is a clean
    // error; the peer API serves the bootstrap handshake before consensus runs.
    let tcp = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;

    let secret = match (&config.cluster_secret, &config.tls) {
        (Some(secret), _) => Some(secret.clone()),
        // Mutual TLS keeps everyone without a certificate off the port.
        (None, Some(_)) => None,
        // Only on loopback: the configuration refuses anything else.
        (None, None) => {
            Some(crate::config::generated_secret(&config.data_dir).map_err(anyhow::Error::msg)?)
        }
    };
    let mut auth = PeerAuth {
        from: config.id,
        secret: secret.as_deref().map(Arc::from),
        cluster: None,
        tls: config.tls.clone(),
    };
    let parts: Arc<OnceLock<PeerParts>> = Arc::default();
    let raft_parts = match &config.etcd {
        None => {
            let state = Arc::new(StateMachine::open(disk.clone())?);
            let storage = RaftStorage::open(disk.clone(), state.clone())?;
            Some((Identity::new(&config, state.clone()), state, storage))
        }
        Some(_) => None,
    };
    let vouch = listener::Vouch::default();
    let gate = PeerGate {
        secret: auth.secret.clone(),
    };
    // Snapshots and raft batches can be far larger than tonic's 4 MB default.
    let peer = tonic::service::interceptor::InterceptedService::new(
        PeerServer::new(PeerService {
            parts: parts.clone(),
            identity: raft_parts.as_ref().map(|(identity, _, _)| identity.clone()),
            self_id: config.id,
            roots: config.repo_roots.clone(),
            tls: config.tls.is_some(),
            vouch: vouch.clone(),
        })
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES),
        gate,
    );
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        server = server
            .tls_config(tls.server_config())
            .context("the TLS certificate or key is not usable")?;
    }
    let mut peer_task = tokio::spawn(
        server
            // A peer that froze or vanished mid-stream is found in seconds,
            // and what it held (a pack being built for it) is let go.
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(1)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(2)))
            .add_service(peer)
            .serve_with_incoming(listener::bounded(tcp, config.max_peer_connections, vouch)),
    );

    let (consensus, inbox, backend): (Arc<dyn Consensus>, _, Backend) =
        match (&config.etcd, raft_parts) {
            (None, Some((identity, state, storage))) => {
                let cluster_id = tokio::select! {
                    r = bootstrap::establish(&config, &storage, &state, &identity, &auth) => r?,
                    _ = shutdown_signal() => return Ok(()),
                    r = &mut peer_task => return Err(anyhow!("peer API stopped: {r:?}")),
                };
                auth.cluster = Some(cluster_id);
                let started =
                    RaftConsensus::start(&config, storage, state, auth.clone(), cluster_id)?;
                let driver = started.driver;
                let done = tokio::task::spawn_blocking(move || match driver.join() {
                    Ok(r) => r,
                    Err(_) => Err(anyhow!("consensus thread panicked")),
                });
                (started.consensus, Some(started.inbox), done)
            }
            (Some(etcd), _) => {
                // The sled database stays open, unused: it locks the data dir.
                let started = EtcdConsensus::start(&config, etcd).await?;
                (started.consensus, None, started.background)
            }
            (None, None) => unreachable!("the embedded Raft's parts are opened above"),
        };
    let local_refs = LocalRefs::new(consensus.clone());
    let replicator = Replicator::new(
        consensus.clone(),
        local_refs.clone(),
        auth.clone(),
        config.reconcile_interval,
        config.repo_roots.clone(),
        config.max_pack_bytes,
    );
    tokio::spawn(replicator.clone().run());
    let pushes = Arc::new(Pushes {
        consensus: consensus.clone(),
        local_refs,
        replicator: replicator.clone(),
        quorum: ObjectQuorum {
            level: config.durability,
            consensus: consensus.clone(),
            auth: auth.clone(),
        },
    });
    let _ = parts.set(PeerParts {
        inbox,
        replicator: replicator.clone(),
        consensus: consensus.clone(),
    });

    // The local socket appears only now: a node that has not joined its
    // cluster has nothing to answer hooks with.
    let sock_path = config.socket_path();
    let _ = std::fs::remove_file(&sock_path); // the data dir lock above proves it is stale
    let unix = UnixListener::bind(&sock_path)
        .with_context(|| format!("cannot bind {}", sock_path.display()))?;
    std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = config.socket_gid {
        std::os::unix::fs::chown(&sock_path, None, Some(gid))
            .with_context(|| format!("cannot give {} to group {gid}", sock_path.display()))?;
    }
    let local = LocalServer::new(LocalService {
        consensus,
        replicator,
        pushes,
        auth,
        request_timeout: config.request_timeout,
        durability: config.durability,
        paused: config.paused,
        access: Access::new(config.admin_gid, config.repo_roots.clone()),
        max_groups: config.max_groups,
        max_refs_per_group: config.max_refs_per_group,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let local_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(local)
            .serve_with_incoming(UnixListenerStream::new(unix).map(|s| s.map(Identified::new))),
    );
    tracing::info!(id = config.id, listen = %config.listen, socket = %sock_path.display(), "node started");
    if !piehole_repo::confine::available() {
        tracing::warn!(
            "Landlock is not available on this kernel: writes into replicas rely on the \
             node's symlink checks alone, not on the kernel (README, Security)"
        );
    }

    let result = tokio::select! {
        _ = shutdown_signal() => Ok(()),
        r = backend => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.context("consensus stopped")),
            Err(_) => Err(anyhow!("consensus task panicked")),
        },
        r = peer_task => Err(anyhow!("peer API stopped: {r:?}")),
        r = local_task => Err(anyhow!("local API stopped: {r:?}")),
    };
    let _ = std::fs::remove_file(&sock_path);
    result
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
