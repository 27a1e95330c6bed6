//! The local API client: everything the `piehole` command (and the tests)
//! say to a node goes through [`LocalClient`], over the node's Unix socket.

pub mod certs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use piehole_protocol::limits::MAX_MESSAGE_BYTES;
use piehole_protocol::pb::{self, local_client::LocalClient as Grpc};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Where a node's socket is when nothing else says.
pub const DEFAULT_SOCKET: &str = "/var/lib/piehole/piehole.sock";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the local piehole node is unreachable at {socket}: {reason}")]
    Unreachable { socket: String, reason: String },
    #[error("{}", .0.message())]
    Status(tonic::Status),
}

impl ClientError {
    pub fn is_unreachable(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Status(s) => {
                s.code() == tonic::Code::Unknown && s.message().contains("transport")
            }
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Status(s)
    }
}

/// The socket to use: an explicit `--node`, else `PIEHOLE_NODE`, else the
/// repository's `piehole.node`, else [`DEFAULT_SOCKET`].
pub fn resolve_socket(flag: Option<PathBuf>, git_dir: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p;
    }
    if let Some(p) = std::env::var_os("PIEHOLE_NODE").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(dir) = git_dir {
        if let Ok(cfg) = piehole_repo::config::read(dir) {
            if let Some(node) = cfg.node {
                return node;
            }
        }
    }
    PathBuf::from(DEFAULT_SOCKET)
}

/// One ref of a push, as git reported it (ids 40 hex, empty for absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushUpdate {
    pub ref_name: String,
    pub old: String,
    pub new: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasOutcome {
    pub applied: bool,
    pub current: Option<String>,
}

pub struct LocalClient {
    grpc: Grpc<Channel>,
}

impl LocalClient {
    pub async fn connect(socket: &Path) -> Result<LocalClient, ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable {
            socket: socket.display().to_string(),
            reason,
        };
        let path = socket.to_path_buf();
        // The URI is required by the API and ignored by the connector.
        let channel =
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .map_err(|e| {
                    let src = std::error::Error::source(&e)
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| e.to_string());
                    unreachable(src)
                })?;
        Ok(LocalClient {
            // Sending is not capped here: the node judges what it accepts.
            grpc: Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES),
        })
    }

    pub async fn status(&mut self, include_peers: bool) -> Result<pb::StatusReply, ClientError> {
        Ok(self
            .grpc
            .status(pb::StatusRequest { include_peers })
            .await?
            .into_inner())
    }

    pub async fn cas(
        &mut self,
        group: &str,
        ref_name: &str,
        expected: Option<&str>,
        new: Option<&str>,
    ) -> Result<CasOutcome, ClientError> {
        let req = pb::CasRequest {
            group: group.into(),
            ref_name: ref_name.into(),
            expected: expected.unwrap_or_default().into(),
            new: new.unwrap_or_default().into(),
        };
        let r = self.grpc.cas(req).await?.into_inner();
        Ok(CasOutcome {
            applied: r.applied,
            current: (!r.current.is_empty()).then_some(r.current),
        })
    }

    pub async fn refs(
        &mut self,
        group: &str,
        linearizable: bool,
    ) -> Result<BTreeMap<String, String>, ClientError> {
        let r = self.read_group(group, linearizable).await?;
        Ok(r.refs.into_iter().map(|c| (c.ref_name, c.value)).collect())
    }

    pub async fn read_group(
        &mut self,
        group: &str,
        linearizable: bool,
    ) -> Result<pb::ReadRefsReply, ClientError> {
        let req = pb::ReadRefsRequest {
            group: group.into(),
            linearizable,
        };
        Ok(self.grpc.read_refs(req).await?.into_inner())
    }

    /// Registers the repository at `path` as this node's replica of
    /// `group`; `force` joins a group whose refs would replace some of the
    /// repository's own (which are kept under refs/piehole/kept/).
    /// `dry_run` only checks that it would be accepted, changing nothing.
    pub async fn register(
        &mut self,
        group: &str,
        path: &Path,
        force: bool,
        dry_run: bool,
    ) -> Result<pb::RegisterReply, ClientError> {
        let req = pb::RegisterRequest {
            group: group.into(),
            path: path.to_string_lossy().into_owned(),
            force,
            dry_run,
        };
        Ok(self.grpc.register(req).await?.into_inner())
    }

    /// Makes the registered replica at `repo_path` the group's consensus;
    /// `prune` also removes consensus refs it lacks.
    pub async fn clobber(
        &mut self,
        repo_path: &Path,
        prune: bool,
    ) -> Result<pb::ClobberReply, ClientError> {
        let req = pb::ClobberRequest {
            repo_path: repo_path.to_string_lossy().into_owned(),
            prune,
        };
        Ok(self.grpc.clobber(req).await?.into_inner())
    }

    /// Adds a learner or removes a member; returns once committed.
    pub async fn change_member(
        &mut self,
        kind: pb::MemberChangeKind,
        node_id: u64,
        addr: &str,
    ) -> Result<(), ClientError> {
        let req = pb::MemberChangeRequest {
            kind: kind as i32,
            node_id,
            addr: addr.to_string(),
            nonce: 0,
        };
        self.grpc.change_member(req).await?;
        Ok(())
    }

    /// Every group's refs and replicas (linearizable).
    pub async fn export_consensus(&mut self) -> Result<pb::ConsensusExport, ClientError> {
        Ok(self
            .grpc
            .export_consensus(pb::ExportRequest {})
            .await?
            .into_inner())
    }

    /// Writes an export into the node's (empty) consensus.
    pub async fn import_consensus(
        &mut self,
        export: pb::ConsensusExport,
    ) -> Result<pb::ImportReply, ClientError> {
        Ok(self.grpc.import_consensus(export).await?.into_inner())
    }

    /// One push's ref updates, decided by the node. Ids in piehole's form
    /// (40 hex, empty for absent).
    pub async fn hook_push(
        &mut self,
        repo_path: &Path,
        updates: Vec<PushUpdate>,
        atomic: bool,
        git_moves_refs: bool,
    ) -> Result<Vec<pb::RefVerdict>, ClientError> {
        let req = pb::HookPushRequest {
            repo_path: repo_path.to_string_lossy().into_owned(),
            updates: updates
                .into_iter()
                .map(|u| pb::RefUpdate {
                    ref_name: u.ref_name,
                    old: u.old,
                    new: u.new,
                })
                .collect(),
            atomic,
            git_moves_refs,
        };
        Ok(self.grpc.hook_push(req).await?.into_inner().verdicts)
    }

    pub async fn hook_post_update(
        &mut self,
        repo_path: &Path,
        ref_names: Vec<String>,
    ) -> Result<(), ClientError> {
        let req = pb::HookPostUpdateRequest {
            repo_path: repo_path.to_string_lossy().into_owned(),
            ref_names,
        };
        self.grpc.hook_post_update(req).await?;
        Ok(())
    }
}
