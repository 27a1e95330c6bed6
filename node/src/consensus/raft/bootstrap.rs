//! How a data dir comes to belong to a cluster, before raft may start.
//!
//! Raft's safety rests on every voter remembering what it voted for and
//! acknowledged. A node whose data dir was lost and that came back under its
//! old id as a voter could vote twice in a term, or un-commit an entry it had
//! helped commit. So raft never starts on an empty data dir by itself:
//!
//! - **New cluster.** Every member listed in `--peers` has an empty data dir.
//!   Each one records a random nonce (durably, before anyone can see it) and
//!   asks the others for theirs. Once all have answered, every node holds
//!   the same founders (id, nonce, address), derives the same cluster id, and
//!   records both. A member that answers with a recorded cluster id whose
//!   founders include this node's nonce finished first: this node follows it.
//! - **Existing cluster, empty data dir.** The members answer with founders
//!   whose nonce for this id is not ours: this data dir was lost. Refused,
//!   with the procedure that replaces the node.
//! - **`--join`.** A node announced by `member add` learns the cluster id
//!   and the members, and starts as a non-voter with an empty log; the
//!   leader's snapshot brings it the configuration.
//! - **Recorded data dir.** The members are asked whether this node was
//!   removed, or whether they belong to another cluster; either refuses.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use piehole_protocol::pb;

use super::storage::RaftStorage;
use crate::config::NodeConfig;
use crate::peer_client::{self, PeerAuth};
use crate::state::StateMachine;

/// How often a node waiting for the others asks again.
const ASK_EVERY: Duration = Duration::from_millis(200);
/// One ClusterInfo call; peers answer it without touching the disk.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// A node given --join keeps trying the addresses this long.
const JOIN_PATIENCE: Duration = Duration::from_secs(60);

/// This node's answer to ClusterInfo, from before bootstrap on.
pub struct Identity {
    id: u64,
    /// Our own address as --peers names it (what founders record).
    addr: String,
    /// The member ids of --peers: a new cluster's founders must agree on them.
    expected: Vec<u64>,
    known: Mutex<Known>,
    state: Arc<StateMachine>,
}

#[derive(Default, Clone)]
struct Known {
    cluster_id: u64,
    nonce: u64,
    founders: Vec<pb::Founder>,
}

impl Identity {
    pub fn new(config: &NodeConfig, state: Arc<StateMachine>) -> Arc<Identity> {
        Arc::new(Identity {
            id: config.id,
            addr: config
                .peers
                .get(&config.id)
                .cloned()
                .unwrap_or_else(|| config.listen.to_string()),
            expected: config.peers.keys().copied().collect(),
            known: Mutex::default(),
            state,
        })
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn cluster_id(&self) -> u64 {
        self.known().cluster_id
    }

    /// None until this node knows its cluster, or its own nonce for the
    /// handshake: an answer without either would mislead the asker.
    pub fn info(&self) -> Option<pb::ClusterInfoReply> {
        let known = self.known().clone();
        if known.cluster_id == 0 && known.nonce == 0 {
            return None;
        }
        if known.cluster_id == 0 {
            return Some(pb::ClusterInfoReply {
                node_id: self.id,
                nonce: known.nonce,
                expected_ids: self.expected.clone(),
                addr: self.addr.clone(),
                ..Default::default()
            });
        }
        Some(pb::ClusterInfoReply {
            node_id: self.id,
            cluster_id: known.cluster_id,
            founders: known.founders,
            members: self
                .state
                .members()
                .map(|m| m.into_values().collect())
                .unwrap_or_default(),
            ..Default::default()
        })
    }
}

/// A new cluster's id: every founder's (id, nonce), so that founders that
/// saw different nonces (one was wiped in the middle of the handshake)
/// end up in different clusters instead of one that disagrees with itself.
/// FNV-1a: the same on every build.
fn cluster_id_of(founders: &[pb::Founder]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for f in founders {
        for b in f.id.to_be_bytes().into_iter().chain(f.nonce.to_be_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h.max(1)
}

pub fn cluster_hex(id: u64) -> String {
    format!("{id:016x}")
}

/// Makes the data dir belong to a cluster (or finds that it does, and still
/// may), or says why this node must not start. Returns the cluster id.
pub async fn establish(
    config: &NodeConfig,
    storage: &RaftStorage,
    state: &StateMachine,
    identity: &Identity,
    auth: &PeerAuth,
) -> anyhow::Result<u64> {
    if let Some(cluster_id) = storage.cluster_id()? {
        let founders = storage.founders()?;
        *identity.known() = Known {
            cluster_id,
            nonce: 0,
            founders,
        };
        check_still_member(config, state, cluster_id, auth).await?;
        return Ok(cluster_id);
    }
    let (cluster_id, founders) = match &config.join {
        Some(targets) => join(config, storage, state, targets, auth).await?,
        None => {
            let nonce = storage.bootstrap_nonce()?;
            identity.known().nonce = nonce;
            let founders = handshake(config, nonce, &identity.addr, auth).await?;
            let cluster_id = cluster_id_of(&founders);
            let members: Vec<pb::ClusterMember> = founders
                .iter()
                .map(|f| pb::ClusterMember {
                    id: f.id,
                    addr: f.addr.clone(),
                    removed: false,
                    claim: f.nonce,
                })
                .collect();
            // The state first: the cluster id, written last, is what makes
            // the data dir count as bootstrapped.
            state.seed_members(1, &members)?;
            storage.bootstrap(cluster_id, &founders)?;
            tracing::info!(
                cluster = %cluster_hex(cluster_id),
                members = ?founders.iter().map(|f| f.id).collect::<Vec<_>>(),
                "bootstrapped a new cluster"
            );
            (cluster_id, founders)
        }
    };
    *identity.known() = Known {
        cluster_id,
        nonce: 0,
        founders,
    };
    Ok(cluster_id)
}

async fn ask(to: Option<u64>, addr: &str, auth: &PeerAuth) -> Result<pb::ClusterInfoReply, String> {
    let mut client = peer_client::connect(to, addr, auth).map_err(|e| e.to_string())?;
    match tokio::time::timeout(ASK_TIMEOUT, client.cluster_info(pb::ClusterInfoRequest {})).await {
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        Ok(Err(status)) => Err(peer_client::refusal(&status)),
        Err(_) => Err(format!("no answer within {ASK_TIMEOUT:?}")),
    }
}

/// What a removed node says when it stops or refuses to start.
pub(super) fn removed_message(id: u64, why: &str) -> String {
    format!(
        "node {id} was removed from the cluster ({why}); its data dir is no longer used: \
         delete it, and `piehole member add` this host under a new id to bring it back"
    )
}

fn replace_procedure(id: u64) -> String {
    format!(
        "to replace a lost node: `piehole member remove {id}` on a member, then \
         `piehole member add NEW_ID=HOST:PORT` (a new id), then start the new node with \
         an empty data dir and `--join HOST:PORT` of a member"
    )
}

/// The handshake of a new cluster; returns the founders, sorted by id.
async fn handshake(
    config: &NodeConfig,
    nonce: u64,
    addr: &str,
    auth: &PeerAuth,
) -> anyhow::Result<Vec<pb::Founder>> {
    let me = pb::Founder {
        id: config.id,
        nonce,
        addr: addr.to_string(),
    };
    let expected: Vec<u64> = config.peers.keys().copied().collect();
    let mut pending: BTreeMap<u64, pb::Founder> = BTreeMap::from([(config.id, me)]);
    let mut last_log = Instant::now();
    let mut unanswered: BTreeMap<u64, String> = BTreeMap::new();
    loop {
        // Every peer, every round, those that answered before included: one
        // of them may have finished meanwhile (and then this node follows
        // it even if another founder is down by now).
        for (&peer, peer_addr) in &config.peers {
            if peer == config.id {
                continue;
            }
            let reply = match ask(Some(peer), peer_addr, auth).await {
                Ok(r) => r,
                Err(why) => {
                    unanswered.insert(peer, why);
                    continue;
                }
            };
            unanswered.remove(&peer);
            if reply.node_id != peer {
                bail!(
                    "--peers names {peer_addr} as node {peer}, but the node there is node {}",
                    reply.node_id
                );
            }
            if reply.cluster_id != 0 {
                let theirs = reply.founders.iter().find(|f| f.id == config.id);
                if theirs.is_some_and(|f| f.nonce == nonce) {
                    // It bootstrapped with us among the founders.
                    let ids: Vec<u64> = reply.founders.iter().map(|f| f.id).collect();
                    if ids != expected {
                        bail!(
                            "node {peer} bootstrapped a cluster of {ids:?}, but --peers names {expected:?}"
                        );
                    }
                    let mut founders = reply.founders;
                    founders.sort_by_key(|f| f.id);
                    return Ok(founders);
                }
                let member = reply.members.iter().find(|m| m.id == config.id);
                if theirs.is_some() || member.is_some() {
                    bail!(
                        "this node's data dir {} is empty, but node {} is already a member of \
                         cluster {} (node {peer} at {peer_addr} says so): its data was lost, \
                         and it must not vote again under its old id; {}",
                        config.data_dir.display(),
                        config.id,
                        cluster_hex(reply.cluster_id),
                        replace_procedure(config.id)
                    );
                }
                bail!(
                    "node {peer} at {peer_addr} belongs to cluster {}, which has no node {}: \
                     a node added to a running cluster is started with --join, after \
                     `piehole member add`",
                    cluster_hex(reply.cluster_id),
                    config.id
                );
            }
            if reply.nonce == 0 {
                unanswered.insert(peer, "no bootstrap nonce yet".into());
                continue;
            }
            let mut theirs = reply.expected_ids.clone();
            theirs.sort_unstable();
            if theirs != expected {
                bail!(
                    "node {peer} was started with --peers ids {theirs:?}, this node with \
                     {expected:?}: every member of a new cluster must name the same members"
                );
            }
            pending.insert(
                peer,
                pb::Founder {
                    id: peer,
                    nonce: reply.nonce,
                    addr: reply.addr,
                },
            );
        }
        if pending.len() == config.peers.len() {
            return Ok(pending.into_values().collect());
        }
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            tracing::warn!(
                waiting_for = ?unanswered,
                "a new cluster bootstraps once every member in --peers answers"
            );
        }
        tokio::time::sleep(ASK_EVERY).await;
    }
}

/// First start of a member added by `member add`.
async fn join(
    config: &NodeConfig,
    storage: &RaftStorage,
    state: &StateMachine,
    targets: &[String],
    auth: &PeerAuth,
) -> anyhow::Result<(u64, Vec<pb::Founder>)> {
    // Durable before anyone sees it: the claim made with it is idempotent
    // if this start is cut short and tried again.
    let nonce = storage.bootstrap_nonce()?;
    let start = Instant::now();
    let mut last_err = String::new();
    loop {
        for target in targets {
            // ID=HOST:PORT, or HOST:PORT (without TLS the id is not needed).
            let (to, addr) = match target.split_once('=') {
                Some((id, addr)) => (id.parse().ok(), addr),
                None => (None, target.as_str()),
            };
            match join_via(config, to, addr, nonce, auth, start).await {
                Ok(reply) => {
                    // Addresses to answer the leader at until its snapshot
                    // brings them.
                    state.seed_members(0, &reply.members)?;
                    storage.join(reply.cluster_id, &reply.founders)?;
                    tracing::info!(
                        cluster = %cluster_hex(reply.cluster_id),
                        via = %addr,
                        "joined the cluster as a learner"
                    );
                    return Ok((reply.cluster_id, reply.founders));
                }
                Err(JoinError::Final(e)) => return Err(e),
                Err(JoinError::Retry(why)) => last_err = why,
            }
        }
        if start.elapsed() >= JOIN_PATIENCE {
            bail!("cannot join within {JOIN_PATIENCE:?}: {last_err}");
        }
        tokio::time::sleep(ASK_EVERY).await;
    }
}

enum JoinError {
    /// Another member, or the same one later, may say otherwise.
    Retry(String),
    Final(anyhow::Error),
}

/// A member that has not applied the `member add` yet says "not a member"
/// for this long before the joiner believes it.
const NOT_ADDED_PATIENCE: Duration = Duration::from_secs(5);

/// Asks the member at `addr` for the cluster, checks this node was added
/// and its id never claimed by another data dir, then claims it.
async fn join_via(
    config: &NodeConfig,
    to: Option<u64>,
    addr: &str,
    nonce: u64,
    auth: &PeerAuth,
    start: Instant,
) -> Result<pb::ClusterInfoReply, JoinError> {
    let reply = match ask(to, addr, auth).await {
        Ok(r) if r.cluster_id != 0 => r,
        Ok(_) => {
            return Err(JoinError::Retry(format!(
                "{addr} has not bootstrapped a cluster"
            )))
        }
        Err(why) => return Err(JoinError::Retry(format!("{addr}: {why}"))),
    };
    let cluster = cluster_hex(reply.cluster_id);
    let id = config.id;
    let lost = || {
        JoinError::Final(anyhow!(
            "node {id} has already started with another data dir: this one ({}) is empty, \
             so that node's data was lost, and it must not vote again under its old id; {}",
            config.data_dir.display(),
            replace_procedure(id)
        ))
    };
    match reply.members.iter().find(|m| m.id == id) {
        Some(m) if m.removed => {
            return Err(JoinError::Final(anyhow!(
                "node {id} was removed from cluster {cluster}; ids are never reused: \
                 `piehole member add` this host under a new id"
            )))
        }
        // Known without asking the log: nothing is proposed for it.
        Some(m) if m.claim != 0 && m.claim != nonce => return Err(lost()),
        Some(_) => {}
        None if start.elapsed() < NOT_ADDED_PATIENCE => {
            return Err(JoinError::Retry(format!(
                "{addr} does not know node {id} yet"
            )))
        }
        None => {
            return Err(JoinError::Final(anyhow!(
                "node {id} is not a member of cluster {cluster} (as {addr} knows it): run \
                 `piehole member add {id}=HOST:PORT` on a member first"
            )))
        }
    }
    let auth = PeerAuth {
        cluster: Some(reply.cluster_id),
        ..auth.clone()
    };
    let claim = pb::MemberChangeRequest {
        kind: pb::MemberChangeKind::Join as i32,
        node_id: id,
        addr: String::new(),
        nonce,
    };
    let mut client =
        peer_client::connect(to, addr, &auth).map_err(|e| JoinError::Retry(e.to_string()))?;
    match tokio::time::timeout(ASK_TIMEOUT * 10, client.change_member(claim)).await {
        Ok(Ok(_)) => Ok(reply),
        Ok(Err(status)) if status.message().contains("another data dir") => Err(lost()),
        Ok(Err(status)) => Err(JoinError::Retry(format!(
            "claiming id {id} through {addr}: {}",
            status.message()
        ))),
        Err(_) => Err(JoinError::Retry(format!("{addr} did not answer the claim"))),
    }
}

/// A recorded data dir may still have been removed from its cluster while
/// it was down, or be pointed at another cluster's members: asks them.
async fn check_still_member(
    config: &NodeConfig,
    state: &StateMachine,
    cluster_id: u64,
    auth: &PeerAuth,
) -> anyhow::Result<()> {
    let members = state.members()?;
    if members.get(&config.id).is_some_and(|m| m.removed) {
        bail!(
            "{}",
            removed_message(
                config.id,
                &format!(
                    "cluster {}, as this data dir recorded",
                    cluster_hex(cluster_id)
                )
            )
        );
    }
    let mut addrs: BTreeMap<u64, String> = members
        .into_values()
        .filter(|m| !m.removed && m.id != config.id)
        .map(|m| (m.id, m.addr))
        .collect();
    for (&id, addr) in &config.peers {
        if id != config.id {
            addrs.insert(id, addr.clone());
        }
    }
    let mut asks = tokio::task::JoinSet::new();
    for (id, addr) in addrs {
        let auth = auth.clone();
        asks.spawn(async move {
            let reply = ask(Some(id), &addr, &auth).await;
            (id, addr, reply)
        });
    }
    let mut foreign = BTreeSet::new();
    let mut ours = 0;
    while let Some(Ok((id, addr, reply))) = asks.join_next().await {
        let reply = match reply {
            Ok(reply) => reply,
            // Down members are normal at a restart; a refused secret is not,
            // and raft would fail on it without a word at the default level.
            Err(why) if why.contains(peer_client::SECRET_HINT) => {
                tracing::warn!(node = id, %addr, "{why}");
                continue;
            }
            Err(_) => continue,
        };
        if reply.cluster_id != cluster_id {
            foreign.insert(format!("node {id} at {addr}"));
            continue;
        }
        ours += 1;
        if reply.members.iter().any(|m| m.id == config.id && m.removed) {
            bail!(
                "{}",
                removed_message(
                    config.id,
                    &format!("cluster {}, node {id} says so", cluster_hex(cluster_id))
                )
            );
        }
    }
    if ours == 0 && !foreign.is_empty() {
        bail!(
            "this data dir belongs to cluster {}, but {} belong to another cluster",
            cluster_hex(cluster_id),
            foreign.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_peers, NodeSettings};
    use crate::disk::Disk;

    fn node(dir: &tempfile::TempDir) -> (NodeConfig, Arc<StateMachine>, RaftStorage) {
        let config = NodeSettings {
            id: Some(2),
            data_dir: Some(dir.path().into()),
            listen: Some("127.0.0.1:7002".into()),
            peers: Some(parse_peers("1=127.0.0.1:7001,2=127.0.0.1:7002").unwrap()),
            ..Default::default()
        }
        .into_config(None)
        .unwrap();
        let disk = Arc::new(Disk::open(&dir.path().join("db")).unwrap());
        let state = Arc::new(StateMachine::open(disk.clone()).unwrap());
        let storage = RaftStorage::open(disk, state.clone()).unwrap();
        (config, state, storage)
    }

    #[test]
    fn no_answer_before_the_nonce_is_known_and_the_nonce_never_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (config, state, storage) = node(&dir);
        let identity = Identity::new(&config, state);
        // An answer now would hand the asker a nonce of 0, which it would
        // record among the founders: this node would then be refused as
        // "wiped" by the cluster it founded.
        assert!(identity.info().is_none());
        let nonce = storage.bootstrap_nonce().unwrap();
        assert_ne!(nonce, 0);
        assert_eq!(storage.bootstrap_nonce().unwrap(), nonce);
        identity.known().nonce = nonce;
        let info = identity.info().expect("answers once it has a nonce");
        assert_eq!((info.node_id, info.cluster_id, info.nonce), (2, 0, nonce));
        assert_eq!(info.expected_ids, vec![1, 2]);
        assert_eq!(info.addr, "127.0.0.1:7002");
    }

    #[test]
    fn the_cluster_id_depends_on_every_founder() {
        let founders = |c: u64| -> Vec<pb::Founder> {
            [(1, 11), (2, 22), (3, c)]
                .into_iter()
                .map(|(id, nonce)| pb::Founder {
                    id,
                    nonce,
                    addr: String::new(),
                })
                .collect()
        };
        assert_eq!(cluster_id_of(&founders(33)), cluster_id_of(&founders(33)));
        // Founders 1 and 2 saw two nonces of a founder 3 wiped mid-handshake.
        assert_ne!(cluster_id_of(&founders(33)), cluster_id_of(&founders(34)));
    }

    #[test]
    fn a_bootstrapped_log_starts_after_a_snapshot_point_and_a_joined_one_has_no_voters() {
        use raft::Storage as _;
        let dir = tempfile::tempdir().unwrap();
        let (_, _, storage) = node(&dir);
        assert_eq!(storage.cluster_id().unwrap(), None);
        let founders: Vec<pb::Founder> = (1..=3)
            .map(|id| pb::Founder {
                id,
                nonce: 10 + id,
                addr: format!("127.0.0.1:700{id}"),
            })
            .collect();
        storage.bootstrap(11, &founders).unwrap();
        assert_eq!(storage.cluster_id().unwrap(), Some(11));
        assert_eq!(storage.founders().unwrap(), founders);
        let st = storage.initial_state().unwrap();
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        // A member added later has an empty log: index 1 is compacted, so
        // the leader must send it a snapshot, which carries the configuration.
        assert_eq!(storage.first_index().unwrap(), 2);
        assert_eq!(st.hard_state.commit, 1);

        let dir = tempfile::tempdir().unwrap();
        let (_, _, storage) = node(&dir);
        storage.join(11, &founders).unwrap();
        let st = storage.initial_state().unwrap();
        assert!(st.conf_state.voters.is_empty() && st.conf_state.learners.is_empty());
        assert_eq!(storage.cluster_id().unwrap(), Some(11));
    }
}
