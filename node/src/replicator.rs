//! Makes this node's replicas match the consensus. It consumes applied
//! changes (and nudges, and a periodic reconcile) and, per group: moves the
//! local refs whose objects are already here (through [`LocalRefs`]), asks
//! peers for the objects of the rest, then moves those.
//!
//! Objects are fetched per ref: a peer sends a pack of the wants it can
//! serve and names the ones it cannot, so a value that no replica has (a
//! lost push) blocks only its own ref; it is reported as unfetchable.
//! Groups replicate concurrently, a few at a time, so one slow peer or one
//! huge pack does not hold up the rest. Packs stream in both directions and
//! every wait on a peer is bounded.
//!
//! Correctness never depends on a nudge arriving: the periodic reconcile
//! also covers a replica that drifted, was down or was re-created.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use piehole_protocol::limits::PACK_CHUNK_BYTES;
use piehole_protocol::pb;
use piehole_repo::Replica;
use tokio::sync::{mpsc, Semaphore};

use crate::access::{RepoRoots, REFUSALS};
use crate::consensus::Consensus;
use crate::local_refs::{LocalRefs, Scope, Synced};
use crate::peer_client::{self, PeerAuth};
use crate::update_rule::blocking;

/// Shared replicas whose gc was skipped, logged once an hour each.
static GC_SKIPPED: std::sync::LazyLock<crate::access::RefusalLog> =
    std::sync::LazyLock::new(|| crate::access::RefusalLog::every(Duration::from_secs(3600)));

/// Groups synced at once.
const PARALLEL_GROUPS: usize = 4;
/// Packs this node builds for peers at once.
const PARALLEL_BUILDS: usize = 4;
/// A peer must start answering a fetch within this long...
const FIRST_ANSWER: Duration = Duration::from_secs(10);
/// ...and then send something at least this often. (A peer that is frozen
/// or cut off is found sooner by the connection's keepalive.)
const PACK_IDLE: Duration = Duration::from_secs(60);
const REFLOG_REPLICATE: &str = "piehole: replicate";

#[derive(Debug, Clone)]
struct Lag {
    consensus: String,
    local: String,
    differs_since_unix_ms: u64,
    unfetchable: bool,
}

pub struct Replicator {
    consensus: Arc<dyn Consensus>,
    local_refs: Arc<LocalRefs>,
    node_id: u64,
    auth: PeerAuth,
    reconcile_every: Duration,
    roots: RepoRoots,
    /// `--max-pack-bytes`: a peer cannot fill this node's disk with one pack.
    max_pack_bytes: u64,
    nudges: mpsc::UnboundedSender<String>,
    nudge_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    /// (group, ref) -> last seen consensus and local values.
    lag: Mutex<BTreeMap<(String, String), Lag>>,
    /// Groups with a pass under way; true when another is wanted after it.
    running: Mutex<HashMap<String, bool>>,
    /// Consecutive failed passes per group, for backing off.
    failures: Mutex<HashMap<String, u32>>,
    slots: Arc<Semaphore>,
    builds: Arc<Semaphore>,
    /// Repositories with a `git gc --auto` under way.
    gc_running: Mutex<BTreeSet<PathBuf>>,
    /// Repositories already rid of what a killed predecessor left.
    cleaned: Arc<Mutex<BTreeSet<PathBuf>>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What one fetch from one peer did.
struct Fetched {
    /// Wants the peer said it cannot serve.
    lacked: Vec<String>,
    /// Wants still incomplete here after indexing what it sent.
    still_missing: BTreeSet<String>,
}

impl Replicator {
    pub fn new(
        consensus: Arc<dyn Consensus>,
        local_refs: Arc<LocalRefs>,
        auth: PeerAuth,
        reconcile_every: Duration,
        roots: RepoRoots,
        max_pack_bytes: u64,
    ) -> Arc<Self> {
        let (nudges, rx) = mpsc::unbounded_channel();
        Arc::new(Replicator {
            node_id: consensus.node_id(),
            consensus,
            local_refs,
            auth,
            reconcile_every,
            roots,
            max_pack_bytes,
            nudges,
            nudge_rx: Mutex::new(Some(rx)),
            lag: Mutex::default(),
            running: Mutex::default(),
            failures: Mutex::default(),
            slots: Arc::new(Semaphore::new(PARALLEL_GROUPS)),
            builds: Arc::new(Semaphore::new(PARALLEL_BUILDS)),
            gc_running: Mutex::default(),
            cleaned: Arc::default(),
        })
    }

    pub fn nudge(&self, group: &str) {
        let _ = self.nudges.send(group.to_string());
    }

    fn nudge_after(self: &Arc<Self>, group: &str, delay: Duration) {
        let me = self.clone();
        let group = group.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            me.nudge(&group);
        });
    }

    /// The path of this node's replica of `group`, from local state.
    pub fn local_path(&self, group: &str) -> Option<PathBuf> {
        let path = self.consensus.hosted().remove(group)?;
        self.within_roots(group, path)
    }

    /// The group this node hosts at `path` (as registered), if any.
    pub fn group_at(&self, path: &Path) -> Option<String> {
        let (group, p) = self
            .consensus
            .hosted()
            .into_iter()
            .find(|(_, p)| Path::new(p) == path)?;
        self.within_roots(&group, p).map(|_| group)
    }

    /// A replica as registered in the log, unless it lies outside the
    /// node's repository roots: whatever a peer put in the log, the node
    /// registers, reads, writes and serves nothing outside them.
    fn within_roots(&self, group: &str, path: String) -> Option<PathBuf> {
        let path = PathBuf::from(path);
        // Registered in its canonical form: if it resolves elsewhere now, a
        // symlink was put in its place.
        let moved = path.canonicalize().is_ok_and(|real| real != path);
        let checked = if moved {
            Err(format!(
                "{} is no longer where it was registered (a symlink)",
                path.display()
            ))
        } else {
            self.roots.check(&path)
        };
        if let Err(e) = checked {
            if REFUSALS.allow(&format!("outside roots {group}")) {
                tracing::error!(group, error = %e, "replica registered through the log refused");
            }
            return None;
        }
        Some(path)
    }

    /// Refs that differ from the consensus (unfetchable ones first), and
    /// refs in step too for groups small enough to list whole: at most
    /// LAG_LISTED per group, so status stays small whatever the groups'
    /// sizes. Also how many were left out.
    pub fn lag(&self) -> (Vec<pb::ReplicaLag>, u64) {
        const LAG_LISTED: usize = 1000;
        let lag = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        let mut sizes: HashMap<&str, usize> = HashMap::new();
        for (group, _) in lag.keys() {
            *sizes.entry(group.as_str()).or_default() += 1;
        }
        let mut listed: HashMap<&str, usize> = HashMap::new();
        let mut omitted = 0;
        let mut rows: Vec<(&(String, String), &Lag)> = lag
            .iter()
            .filter(|((group, _), l)| {
                l.differs_since_unix_ms != 0 || sizes[group.as_str()] <= LAG_LISTED
            })
            .collect();
        rows.sort_by_key(|(_, l)| !l.unfetchable);
        rows.retain(|((group, _), _)| {
            let n = listed.entry(group.as_str()).or_default();
            *n += 1;
            let keep = *n <= LAG_LISTED;
            omitted += u64::from(!keep);
            keep
        });
        let rows = rows
            .into_iter()
            .map(|((group, ref_name), l)| pb::ReplicaLag {
                group: group.clone(),
                node_id: self.node_id,
                path: String::new(),
                ref_name: ref_name.clone(),
                consensus: l.consensus.clone(),
                local: l.local.clone(),
                differs_since_unix_ms: l.differs_since_unix_ms,
                unfetchable: l.unfetchable,
            })
            .collect();
        (rows, omitted)
    }

    /// Records what a pass saw; `unfetchable` are refs nobody could serve.
    fn record_lag(&self, group: &str, synced: &Synced, unfetchable: &BTreeSet<String>) {
        let mut lag = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        lag.retain(|(g, r), _| {
            g != group || synced.consensus.contains_key(r) || synced.local.contains_key(r)
        });
        let names: BTreeSet<&String> = synced.consensus.keys().chain(synced.local.keys()).collect();
        for name in names {
            let c = synced.consensus.get(name).cloned().unwrap_or_default();
            let l = synced.local.get(name).cloned().unwrap_or_default();
            let entry = lag.entry((group.to_string(), name.clone())).or_insert(Lag {
                consensus: c.clone(),
                local: l.clone(),
                differs_since_unix_ms: 0,
                unfetchable: false,
            });
            entry.differs_since_unix_ms = match (c == l, entry.differs_since_unix_ms) {
                (true, _) => 0,
                (false, 0) => now_ms(),
                (false, since) => since,
            };
            entry.unfetchable = c != l && unfetchable.contains(name);
            entry.consensus = c;
            entry.local = l;
        }
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
        // State that is behind what the replicas were moved to before a
        // crash must not drive them; LocalRefs waits too, this just keeps
        // the first passes from queueing up meanwhile.
        self.consensus.wait_replayed().await;
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
                self.clone().schedule(group);
            }
        }
    }

    /// Starts a pass over `group`, or asks the running one to go again.
    fn schedule(self: Arc<Self>, group: String) {
        {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(again) = running.get_mut(&group) {
                *again = true;
                return;
            }
            running.insert(group.clone(), false);
        }
        tokio::spawn(async move {
            let Ok(_slot) = self.slots.clone().acquire_owned().await else {
                return;
            };
            loop {
                let result = self.sync_group(&group).await;
                self.after_pass(&group, result);
                let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
                if running.get(&group) == Some(&true) {
                    running.insert(group.clone(), false);
                } else {
                    running.remove(&group);
                    break;
                }
            }
        });
    }

    fn after_pass(self: &Arc<Self>, group: &str, result: Result<Option<Instant>, String>) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(held_until) => {
                failures.remove(group);
                if let Some(until) = held_until {
                    // A push's hold ends then at the latest: look again.
                    let wait = until.saturating_duration_since(Instant::now());
                    self.nudge_after(group, wait + Duration::from_millis(10));
                }
            }
            Err(e) => {
                let n = failures.entry(group.to_string()).or_insert(0);
                *n += 1;
                let delay = Duration::from_millis(100 << (*n).min(6)).min(self.reconcile_every);
                tracing::warn!(group, attempt = *n, error = %e, "replication incomplete; retrying");
                self.nudge_after(group, delay);
            }
        }
    }

    /// One pass over one group. Ok(Some(t)): a ref is left to a push in
    /// flight until t. Err: something fetchable is still behind.
    async fn sync_group(self: &Arc<Self>, group: &str) -> Result<Option<Instant>, String> {
        let Some(path) = self.local_path(group) else {
            return Ok(None);
        };
        tracing::trace!(group, "replication pass");
        let synced = self
            .local_refs
            .sync(group, &path, Scope::All, BTreeSet::new(), REFLOG_REPLICATE)
            .await
            .map_err(|e| e.to_string())?;
        if synced.missing.is_empty() {
            self.record_lag(group, &synced, &BTreeSet::new());
            return Ok(synced.held_until);
        }
        let (unfetchable_values, error) = self.fetch_missing(group, &path, &synced).await;
        let names: BTreeSet<String> = synced.missing.keys().cloned().collect();
        let after = self
            .local_refs
            .sync(
                group,
                &path,
                Scope::Only(names.clone()),
                BTreeSet::new(),
                REFLOG_REPLICATE,
            )
            .await
            .map_err(|e| e.to_string())?;
        let unfetchable: BTreeSet<String> = after
            .missing
            .iter()
            .filter(|(_, v)| unfetchable_values.contains(*v))
            .map(|(k, _)| k.clone())
            .collect();
        // The whole group as the first pass saw it, with the second pass's
        // word on the refs it looked at again.
        let mut whole = synced;
        for name in &names {
            match after.local.get(name) {
                Some(v) => whole.local.insert(name.clone(), v.clone()),
                None => whole.local.remove(name),
            };
            match after.consensus.get(name) {
                Some(v) => whole.consensus.insert(name.clone(), v.clone()),
                None => whole.consensus.remove(name),
            };
        }
        self.record_lag(group, &whole, &unfetchable);
        let fetchable_behind = after.missing.keys().any(|name| !unfetchable.contains(name));
        match error {
            Some(e) if fetchable_behind => Err(e),
            _ if fetchable_behind => Err("objects still missing after fetching".into()),
            _ => {
                if !unfetchable.is_empty() {
                    tracing::warn!(group, refs = ?unfetchable, "no replica has the consensus value of these refs; `piehole clobber` in a good replica is the way out");
                }
                Ok(after.held_until)
            }
        }
    }

    /// Fetches the objects of `synced.missing` from the peers that may have
    /// them. Returns the values every replica said it lacks, and the last
    /// error if some peer could not be asked.
    async fn fetch_missing(
        self: &Arc<Self>,
        group: &str,
        path: &Path,
        synced: &Synced,
    ) -> (BTreeSet<String>, Option<String>) {
        let view = match self.consensus.local_group(group) {
            Ok(v) => v,
            Err(e) => return (BTreeSet::new(), Some(e.to_string())),
        };
        let mut wants: BTreeSet<String> = synced.missing.values().cloned().collect();
        let haves: Vec<String> = synced
            .local
            .values()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // The node that proposed a value certainly had its objects; try it first.
        let mut sources: Vec<u64> = synced
            .missing
            .keys()
            .filter_map(|r| view.refs.get(r).map(|v| v.proposer))
            .collect();
        sources.extend(view.replicas.keys().copied());
        let mut seen = BTreeSet::new();
        let peers = self.consensus.peers();
        sources.retain(|&n| n != self.node_id && peers.contains_key(&n) && seen.insert(n));
        let mut lacked_by: HashMap<String, usize> = HashMap::new();
        let mut answered = 0;
        let mut error = None;
        let mut fetched_any = false;
        for source in &sources {
            if wants.is_empty() {
                break;
            }
            let want_list: Vec<String> = wants.iter().cloned().collect();
            tracing::debug!(group, from = source, wants = want_list.len(), "fetching");
            match self
                .fetch_from(*source, group, &want_list, &haves, path)
                .await
            {
                Ok(f) => {
                    tracing::debug!(
                        group,
                        from = source,
                        lacked = f.lacked.len(),
                        still_missing = f.still_missing.len(),
                        "fetched"
                    );
                    answered += 1;
                    fetched_any |= f.still_missing.len() < want_list.len();
                    for v in f.lacked {
                        *lacked_by.entry(v).or_default() += 1;
                    }
                    wants = f.still_missing;
                }
                Err(e) => error = Some(format!("fetch from node {source}: {e}")),
            }
        }
        if fetched_any {
            self.gc_soon(path);
        }
        // Unfetchable only when every other replica answered that it lacks
        // it (also when there is no other replica to ask).
        let unfetchable = if answered == sources.len() {
            wants
                .into_iter()
                .filter(|v| lacked_by.get(v).copied().unwrap_or(0) == answered)
                .collect()
        } else {
            BTreeSet::new()
        };
        (unfetchable, error)
    }

    /// Asks node `source` for a pack of `wants`, indexing it as it streams.
    async fn fetch_from(
        &self,
        source: u64,
        group: &str,
        wants: &[String],
        haves: &[String],
        path: &Path,
    ) -> Result<Fetched, String> {
        let addr = self
            .consensus
            .peers()
            .remove(&source)
            .ok_or_else(|| format!("node {source} is not a member"))?;
        let mut client =
            peer_client::connect(Some(source), &addr, &self.auth).map_err(|e| e.to_string())?;
        let req = pb::FetchPackRequest {
            group: group.into(),
            wants: wants.to_vec(),
            haves: haves.to_vec(),
        };
        let mut stream = tokio::time::timeout(FIRST_ANSWER, client.fetch_pack(req))
            .await
            .map_err(|_| format!("no answer within {FIRST_ANSWER:?}"))?
            .map_err(|s| peer_client::refusal(&s))?
            .into_inner();
        let (tx, mut rx) = mpsc::channel::<Result<Vec<u8>, String>>(8);
        let (repo_path, want_list) = (path.to_path_buf(), wants.to_vec());
        let cleaned = self.cleaned.clone();
        // Spawned now (not when awaited): it drains what the stream feeds it.
        let indexer = tokio::task::spawn_blocking(move || {
            piehole_repo::confine::confined(&repo_path.clone(), move || {
                let repo = Replica::open(&repo_path)?;
                {
                    // Before this process's first pack lands here, every partial
                    // pack is a killed predecessor's: no clock decides it, so a
                    // node restarted within milliseconds of its death still
                    // sees them as dead. Held during the removal, so a second
                    // fetch waits rather than start a pack among them.
                    let mut cleaned = cleaned.lock().unwrap_or_else(|e| e.into_inner());
                    if cleaned.insert(repo_path.clone()) {
                        repo.clear_leftovers();
                    }
                }
                repo.receive_pack(std::iter::from_fn(|| rx.blocking_recv()))?;
                let mut still = BTreeSet::new();
                for w in want_list {
                    if !repo.is_complete(&w)? {
                        still.insert(w);
                    }
                }
                Ok::<_, piehole_repo::RepoError>(still)
            })
        });
        let mut lacked = Vec::new();
        let mut first = true;
        let mut received: u64 = 0;
        let feed = async {
            loop {
                let wait = if first { FIRST_ANSWER } else { PACK_IDLE };
                let next = match tokio::time::timeout(wait, stream.message()).await {
                    Ok(Ok(Some(chunk))) => chunk,
                    Ok(Ok(None)) => return Ok(()),
                    Ok(Err(s)) => return Err(peer_client::refusal(&s)),
                    Err(_) => return Err(format!("the pack stream stalled for {wait:?}")),
                };
                if first {
                    lacked = next.missing;
                    first = false;
                }
                received += next.data.len() as u64;
                if received > self.max_pack_bytes {
                    let e = format!(
                        "the pack from node {source} is larger than --max-pack-bytes {}",
                        self.max_pack_bytes
                    );
                    let _ = tx.send(Err(e.clone())).await;
                    return Err(e);
                }
                if !next.data.is_empty() && tx.send(Ok(next.data)).await.is_err() {
                    return Ok(()); // the indexer stopped; it says why
                }
            }
        };
        let fed: Result<(), String> = feed.await;
        if let Err(e) = &fed {
            let _ = tx.send(Err(e.clone())).await;
        }
        drop(tx);
        let still_missing = indexer
            .await
            .map_err(|e| format!("indexing task failed: {e}"))?
            .map_err(|e| e.to_string())?;
        fed?;
        Ok(Fetched {
            lacked,
            still_missing,
        })
    }

    /// `git gc --auto` in the background, one at a time per repository:
    /// each replicated push leaves a pack, and git would never gc a
    /// repository it did not receive a push into itself.
    fn gc_soon(self: &Arc<Self>, path: &Path) {
        {
            let mut running = self.gc_running.lock().unwrap_or_else(|e| e.into_inner());
            if !running.insert(path.to_path_buf()) {
                return;
            }
        }
        let me = self.clone();
        let path = path.to_path_buf();
        tokio::spawn(async move {
            let p = path.clone();
            match blocking(move || Replica::open(&p)?.gc_auto()).await {
                Ok(()) => {}
                Err(piehole_repo::RepoError::OthersCanChange(what)) => {
                    if GC_SKIPPED.allow(&path.display().to_string()) {
                        tracing::warn!(
                            repo = %path.display(),
                            others_can_change = %what.display(),
                            "git gc skipped: git would run with this node's rights what others \
                             can change here; git runs gc --auto itself after each push it receives"
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(repo = %path.display(), error = %e, "git gc --auto failed")
                }
            }
            me.gc_running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&path);
        });
    }

    /// A pack of those `wants` this replica has complete, for a peer that
    /// already has `haves`, streamed as libgit2 writes it. The first message
    /// names the wants left out.
    pub async fn serve_pack(
        &self,
        group: &str,
        wants: Vec<String>,
        haves: Vec<String>,
    ) -> Result<mpsc::Receiver<Result<pb::PackChunk, String>>, String> {
        let path = self
            .local_path(group)
            .ok_or_else(|| format!("no replica of group {group} on this node"))?;
        let permit = tokio::time::timeout(FIRST_ANSWER, self.builds.clone().acquire_owned())
            .await
            .map_err(|_| format!("busy: {PARALLEL_BUILDS} packs are being built; try again"))?
            .map_err(|_| "shutting down".to_string())?;
        let (tx, rx) = mpsc::channel(4);
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let out = Outlet { tx, runtime };
            if let Err(e) = stream_pack(&path, &wants, &haves, &out) {
                out.send(Err(e.to_string()));
            }
        });
        Ok(rx)
    }

    /// --durability quorum: fetch `wants` of `group` from node `source` now;
    /// Ok once they are complete here (and fsynced, as every pack is).
    pub async fn store_objects(
        self: &Arc<Self>,
        group: &str,
        wants: Vec<String>,
        source: u64,
    ) -> Result<(), String> {
        let path = self
            .local_path(group)
            .ok_or_else(|| format!("no replica of group {group} on this node"))?;
        let (p, w) = (path.clone(), wants.clone());
        let (haves, already) = blocking(move || {
            let repo = Replica::open(&p)?;
            let mut checker = repo.completeness()?;
            let mut already = true;
            for want in &w {
                already &= checker.is_complete(want)?;
            }
            let haves: BTreeSet<String> = repo.refs()?.into_values().collect();
            Ok((haves.into_iter().collect::<Vec<_>>(), already))
        })
        .await
        .map_err(|e| e.to_string())?;
        // Stored by an earlier call that outlived its caller, or by replication.
        if already {
            return Ok(());
        }
        let fetched = self
            .fetch_from(source, group, &wants, &haves, &path)
            .await?;
        match fetched.still_missing.first() {
            None => Ok(()),
            Some(w) => Err(format!("node {source} could not send all of {w}")),
        }
    }
}

/// Where a pack being built goes: a bounded channel to the response
/// stream. A receiver that stops taking (a peer frozen or cut off) frees
/// the builder after PACK_IDLE instead of holding it forever.
struct Outlet {
    tx: mpsc::Sender<Result<pb::PackChunk, String>>,
    runtime: tokio::runtime::Handle,
}

impl Outlet {
    /// False once the receiver is gone or stalled.
    fn send(&self, chunk: Result<pb::PackChunk, String>) -> bool {
        self.runtime
            .block_on(tokio::time::timeout(PACK_IDLE, self.tx.send(chunk)))
            .is_ok_and(|sent| sent.is_ok())
    }
}

fn stream_pack(
    path: &Path,
    wants: &[String],
    haves: &[String],
    out: &Outlet,
) -> Result<(), piehole_repo::RepoError> {
    let repo = Replica::open(path)?;
    let mut complete = repo.completeness()?;
    let mut have = Vec::new();
    let mut missing = Vec::new();
    for w in wants {
        if complete.is_complete(w)? {
            have.push(w.clone());
        } else {
            missing.push(w.clone());
        }
    }
    drop(complete);
    let first = pb::PackChunk {
        data: Vec::new(),
        missing,
    };
    if !out.send(Ok(first)) || have.is_empty() {
        return Ok(());
    }
    let mut buf = Vec::with_capacity(PACK_CHUNK_BYTES);
    let send = |data: Vec<u8>| {
        out.send(Ok(pb::PackChunk {
            data,
            missing: Vec::new(),
        }))
    };
    let mut open = true;
    repo.write_pack(&have, haves, |piece| {
        buf.extend_from_slice(piece);
        if buf.len() >= PACK_CHUNK_BYTES {
            open = send(std::mem::take(&mut buf));
        }
        open
    })?;
    if !buf.is_empty() {
        send(buf);
    }
    Ok(())
}
