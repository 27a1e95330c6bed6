//! Makes this node's replicas match the consensus. It consumes applied
//! changes (and nudges, and a periodic reconcile) and, per group: moves local
//! refs whose objects are already here, fetches a pack from a peer that has
//! the rest, then moves those refs — always with a compare-and-swap on the
//! local ref, and never to a value the consensus does not hold.
//!
//! Correctness never depends on a nudge arriving: the periodic reconcile
//! also covers a replica that drifted, was down or was re-created.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use piehole_protocol::pb;
use piehole_repo::Replica;
use tokio::sync::mpsc;

use crate::consensus::{Consensus, GroupView};
use crate::peer_client::{self, PeerAuth};
use crate::update_rule::blocking;

/// How long a ref accepted by the update hook is left to git: git moves it
/// itself after the hook, and a replicator that got there first would make
/// git's own update fail. post-update releases it sooner.
const HOLD_FOR: Duration = Duration::from_secs(30);

/// Refs a push is in the middle of moving: the update hook accepted them and
/// git has yet to move them itself. The replicator keeps its hands off, or
/// git's own compare-and-swap of the ref would fail and the push with it.
///
/// Counted: two pushes of the same ref may be in flight at once.
#[derive(Clone, Default)]
pub struct Holds(Arc<Mutex<HashMap<GroupRef, (usize, Instant)>>>);

/// (group, ref name)
type GroupRef = (String, String);

impl Holds {
    fn hold(&self, group: &str, ref_name: &str) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map
            .entry((group.to_string(), ref_name.to_string()))
            .or_insert((0, Instant::now()));
        *entry = (entry.0 + 1, Instant::now());
    }

    fn release(&self, group: &str, ref_names: &[String]) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for r in ref_names {
            let key = (group.to_string(), r.clone());
            if let Some(entry) = map.get_mut(&key) {
                entry.0 = entry.0.saturating_sub(1);
                if entry.0 == 0 {
                    map.remove(&key);
                }
            }
        }
    }

    fn is_held(&self, group: &str, ref_name: &str) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, (_, t)| t.elapsed() < HOLD_FOR);
        map.contains_key(&(group.to_string(), ref_name.to_string()))
    }
}

#[derive(Debug, Clone)]
struct Lag {
    consensus: String,
    local: String,
    differs_since_unix_ms: u64,
}

pub struct Replicator {
    consensus: Arc<dyn Consensus>,
    node_id: u64,
    peers: BTreeMap<u64, String>,
    auth: PeerAuth,
    reconcile_every: Duration,
    nudges: mpsc::UnboundedSender<String>,
    nudge_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    /// (group, ref) accepted by a hook and not yet moved by git.
    holds: Holds,
    /// (group, ref) -> last seen consensus and local values.
    lag: Mutex<BTreeMap<(String, String), Lag>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Replicator {
    pub fn new(
        consensus: Arc<dyn Consensus>,
        peers: BTreeMap<u64, String>,
        auth: PeerAuth,
        reconcile_every: Duration,
    ) -> Arc<Self> {
        let (nudges, rx) = mpsc::unbounded_channel();
        Arc::new(Replicator {
            node_id: consensus.node_id(),
            consensus,
            peers,
            auth,
            reconcile_every,
            nudges,
            nudge_rx: Mutex::new(Some(rx)),
            holds: Holds::default(),
            lag: Mutex::default(),
        })
    }

    pub fn nudge(&self, group: &str) {
        let _ = self.nudges.send(group.to_string());
    }

    pub fn hold(&self, group: &str, ref_name: &str) {
        self.holds.hold(group, ref_name);
    }

    pub fn release(&self, group: &str, ref_names: &[String]) {
        self.holds.release(group, ref_names);
    }

    pub fn is_held(&self, group: &str, ref_name: &str) -> bool {
        self.holds.is_held(group, ref_name)
    }

    fn guard(&self, group: &str) -> MoveGuard {
        MoveGuard {
            holds: self.holds.clone(),
            consensus: self.consensus.clone(),
            group: group.to_string(),
        }
    }

    /// The path of this node's replica of `group`, from local state.
    pub fn local_path(&self, group: &str) -> Option<PathBuf> {
        self.consensus.hosted().remove(group).map(PathBuf::from)
    }

    /// The group this node hosts at `path` (as registered), if any.
    pub fn group_at(&self, path: &std::path::Path) -> Option<String> {
        self.consensus
            .hosted()
            .into_iter()
            .find(|(_, p)| std::path::Path::new(p) == path)
            .map(|(g, _)| g)
    }

    pub fn lag(&self) -> Vec<pb::ReplicaLag> {
        let lag = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        lag.iter()
            .map(|((group, ref_name), l)| pb::ReplicaLag {
                group: group.clone(),
                node_id: self.node_id,
                path: String::new(),
                ref_name: ref_name.clone(),
                consensus: l.consensus.clone(),
                local: l.local.clone(),
                differs_since_unix_ms: l.differs_since_unix_ms,
            })
            .collect()
    }

    fn record_lag(
        &self,
        group: &str,
        consensus: &BTreeMap<String, String>,
        local: &BTreeMap<String, String>,
    ) {
        let mut lag = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        lag.retain(|(g, r), _| g != group || consensus.contains_key(r) || local.contains_key(r));
        let names: BTreeSet<&String> = consensus.keys().chain(local.keys()).collect();
        for name in names {
            let c = consensus.get(name).cloned().unwrap_or_default();
            let l = local.get(name).cloned().unwrap_or_default();
            let entry = lag.entry((group.to_string(), name.clone())).or_insert(Lag {
                consensus: c.clone(),
                local: l.clone(),
                differs_since_unix_ms: 0,
            });
            entry.differs_since_unix_ms = match (c == l, entry.differs_since_unix_ms) {
                (true, _) => 0,
                (false, 0) => now_ms(),
                (false, since) => since,
            };
            entry.consensus = c;
            entry.local = l;
        }
    }

    /// A pack of `wants` for a peer that already has `haves`.
    pub async fn serve_pack(
        &self,
        group: &str,
        wants: Vec<String>,
        haves: Vec<String>,
    ) -> Result<Vec<u8>, String> {
        let path = self
            .local_path(group)
            .ok_or_else(|| format!("no replica of group {group} on this node"))?;
        blocking(move || {
            let repo = Replica::open(&path)?;
            for w in &wants {
                if !repo.is_complete(w)? {
                    return Err(piehole_repo::RepoError::MissingObject(w.clone()));
                }
            }
            repo.build_pack(&wants, &haves)
        })
        .await
        .map_err(|e| e.to_string())
    }

    pub async fn run(self: Arc<Self>) {
        let Some(mut nudges) = self
            .nudge_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let mut changes = self.consensus.subscribe();
        let mut failures: HashMap<String, u32> = HashMap::new();
        let mut tick = tokio::time::interval(self.reconcile_every);
        loop {
            let mut due: BTreeSet<String> = BTreeSet::new();
            tokio::select! {
                _ = tick.tick() => due.extend(self.consensus.groups()),
                g = nudges.recv() => match g { Some(g) => { due.insert(g); } None => return },
                g = changes.recv() => match g {
                    Ok(g) => { due.insert(g); }
                    // Missed some changes: look at everything.
                    Err(_) => due.extend(self.consensus.groups()),
                },
            }
            while let Ok(g) = nudges.try_recv() {
                due.insert(g);
            }
            while let Ok(g) = changes.try_recv() {
                due.insert(g);
            }
            for group in due {
                match self.sync_group(&group).await {
                    Ok(()) => {
                        failures.remove(&group);
                    }
                    Err(e) => {
                        let n = failures.entry(group.clone()).or_insert(0);
                        *n += 1;
                        let delay =
                            Duration::from_millis(200 << (*n).min(6)).min(self.reconcile_every);
                        tracing::warn!(group = %group, attempt = *n, error = %e, "replication incomplete; retrying");
                        let me = self.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            me.nudge(&group);
                        });
                    }
                }
            }
        }
    }

    /// One pass over one group. Err means something is still behind.
    async fn sync_group(&self, group: &str) -> Result<(), String> {
        let view = self
            .consensus
            .group(group, false)
            .await
            .map_err(|e| e.to_string())?;
        let Some(path) = view.replicas.get(&self.node_id).map(PathBuf::from) else {
            return Ok(());
        };
        let consensus: BTreeMap<String, String> = view
            .refs
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect();
        let (local, missing) = {
            let (path, consensus, guard) = (path.clone(), consensus.clone(), self.guard(group));
            blocking(move || apply_present(&Replica::open(&path)?, &consensus, &guard)).await
        }
        .map_err(|e| e.to_string())?;
        self.record_lag(group, &consensus, &local);
        if missing.is_empty() {
            return Ok(());
        }
        self.fetch_missing(group, &view, &path, &consensus, &local, missing)
            .await?;
        let local = {
            let path = path.clone();
            blocking(move || Replica::open(&path)?.refs())
                .await
                .map_err(|e| e.to_string())?
        };
        self.record_lag(group, &consensus, &local);
        Ok(())
    }

    async fn fetch_missing(
        &self,
        group: &str,
        view: &GroupView,
        path: &std::path::Path,
        consensus: &BTreeMap<String, String>,
        local: &BTreeMap<String, String>,
        missing: Vec<String>,
    ) -> Result<(), String> {
        let wants: Vec<String> = missing.iter().map(|r| consensus[r].clone()).collect();
        let haves: Vec<String> = local
            .values()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // The node that proposed a value certainly had its objects; try it first.
        let mut sources: Vec<u64> = missing
            .iter()
            .filter_map(|r| view.refs.get(r).map(|v| v.proposer))
            .collect();
        sources.extend(view.replicas.keys().copied());
        let mut seen = BTreeSet::new();
        sources.retain(|&n| n != self.node_id && seen.insert(n));
        let mut last_err = format!("no peer hosts group {group}");
        for source in sources {
            let Some(addr) = self.peers.get(&source) else {
                continue;
            };
            match self.fetch_from(addr, group, &wants, &haves).await {
                Ok(pack) => {
                    let path = path.to_path_buf();
                    let (consensus, local, refs) =
                        (consensus.clone(), local.clone(), missing.clone());
                    let guard = self.guard(group);
                    let done = blocking(move || {
                        let repo = Replica::open(&path)?;
                        repo.index_pack(&pack)?;
                        move_refs(&repo, &consensus, &local, &refs, &guard)
                    })
                    .await;
                    // A bad or short pack from one node: try the next.
                    match done {
                        Ok(true) => {
                            tracing::info!(
                                group,
                                from = source,
                                refs = missing.len(),
                                "replicated"
                            );
                            return Ok(());
                        }
                        Ok(false) => last_err = format!("node {source} sent an incomplete pack"),
                        Err(e) => last_err = format!("pack from node {source}: {e}"),
                    }
                }
                Err(e) => last_err = format!("fetch from node {source}: {e}"),
            }
        }
        Err(last_err)
    }

    async fn fetch_from(
        &self,
        addr: &str,
        group: &str,
        wants: &[String],
        haves: &[String],
    ) -> Result<Vec<u8>, String> {
        let mut client = peer_client::connect(addr, &self.auth).map_err(|e| e.to_string())?;
        let req = pb::FetchPackRequest {
            group: group.into(),
            wants: wants.to_vec(),
            haves: haves.to_vec(),
        };
        let mut stream = client
            .fetch_pack(req)
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let mut pack = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| s.message().to_string())?
        {
            pack.extend_from_slice(&chunk.data);
        }
        Ok(pack)
    }
}

/// What must still hold the moment a local ref is moved: no push has it in
/// flight, and the consensus (as applied here now, not when the pass began)
/// still names the value we are about to write.
#[derive(Clone)]
struct MoveGuard {
    holds: Holds,
    consensus: Arc<dyn Consensus>,
    group: String,
}

impl MoveGuard {
    fn may_move(&self, name: &str, want: Option<&String>) -> bool {
        !self.holds.is_held(&self.group, name)
            && self.consensus.local_value(&self.group, name).as_ref() == want
    }
}

/// Moves every ref whose consensus value is already complete here; returns
/// the local refs as they were and the refs that need objects from a peer.
fn apply_present(
    repo: &Replica,
    consensus: &BTreeMap<String, String>,
    guard: &MoveGuard,
) -> Result<(BTreeMap<String, String>, Vec<String>), piehole_repo::RepoError> {
    let local = repo.refs()?;
    let mut missing = Vec::new();
    let names: BTreeSet<&String> = consensus.keys().chain(local.keys()).collect();
    for name in names {
        let (want, have) = (consensus.get(name), local.get(name));
        if want == have {
            continue;
        }
        match want {
            Some(w) if !repo.is_complete(w)? => missing.push(name.clone()),
            _ if guard.may_move(name, want) => set_local(repo, name, have, want),
            _ => {}
        }
    }
    Ok((local, missing))
}

/// After a pack arrived: moves the refs it was for. True if all now match.
fn move_refs(
    repo: &Replica,
    consensus: &BTreeMap<String, String>,
    local: &BTreeMap<String, String>,
    missing: &[String],
    guard: &MoveGuard,
) -> Result<bool, piehole_repo::RepoError> {
    let mut all = true;
    for name in missing {
        let want = &consensus[name];
        if !repo.is_complete(want)? {
            all = false;
        } else if guard.may_move(name, Some(want)) {
            set_local(repo, name, local.get(name), Some(want));
        }
    }
    Ok(all)
}

/// A local CAS; losing the race to a concurrent push is fine — the next pass
/// looks again.
fn set_local(repo: &Replica, name: &str, have: Option<&String>, want: Option<&String>) {
    let result = repo.set_ref(
        name,
        have.map(|s| s.as_str()),
        want.map(|s| s.as_str()),
        "piehole: replicate",
    );
    if let Err(e) = result {
        tracing::debug!(ref_name = name, error = %e, "local ref not moved");
    }
}
