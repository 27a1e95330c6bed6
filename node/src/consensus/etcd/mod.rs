//! The compatibility backend: consensus refs in an existing etcd v3 cluster
//! (`--etcd`), behind the same [`Consensus`] trait as the embedded Raft.
//!
//! Writes are optimistic: the node decides a push with the same rule the
//! Raft state machine applies ([`crate::ref_rule`]), on its watch-fed copy
//! of the group, and commits the result in one etcd transaction that holds
//! only if the group's `head` key is unchanged since that copy. If another
//! push got there first, the node waits until its copy has seen it and
//! decides again. Key layout and chunking: [`layout`].

mod cache;
pub mod layout;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    Identity, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
    WatchRequestSender,
};
use tokio::sync::{broadcast, watch};

use self::cache::{Cache, Change};
use self::layout::{encode_ref, prefix_end, Layout};
use super::{
    ClusterStatus, Consensus, ConsensusError, GroupView, MemberStatus, RefOutcome, RefUpdate,
};
use crate::config::{EtcdConfig, NodeConfig};
use crate::ref_rule::{self, Cas};
use crate::state::RefValue;

/// Writes per transaction: etcd refuses more than 128 operations in one
/// (`--max-txn-ops`), and the head and a compare take their share.
const CHUNK: usize = 100;
/// Keys per page of a full load.
const PAGE: i64 = 1000;
/// The liveness lease. etcd's smallest TTL is a few seconds; `status`
/// calls a node dead this long after it stopped renewing.
const LEASE_TTL_SECS: i64 = 10;
const KEEPALIVE_EVERY: Duration = Duration::from_secs(3);
/// Watch responses can carry a whole generation's deletions.
const MAX_WATCH_MESSAGE: usize = 256 << 20;
/// Failed watches in a row before the node loads everything again.
const WATCH_ATTEMPTS: u32 = 5;
/// How often a node waiting to see a revision asks etcd for progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(300);
/// How long before a request that found no connection is sent again.
const RESEND_AFTER: Duration = Duration::from_millis(50);
/// How often dead generations are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// How long the node tries to reach etcd when it starts.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);
/// A write needs at least this long to be seen committing.
const MIN_TIME_TO_WRITE: Duration = Duration::from_millis(100);

pub struct EtcdConsensus {
    id: u64,
    layout: Layout,
    client: Client,
    cache: RwLock<Cache>,
    /// The cache's revision, for waiters.
    applied: watch::Sender<i64>,
    changes: broadcast::Sender<String>,
    request_timeout: Duration,
    endpoints: String,
    /// Why etcd could not be reached the last time the node tried; None
    /// while it answers.
    trouble: std::sync::Mutex<Option<String>>,
    /// The peer address registered for this node.
    advertise: String,
    /// The running watch's request side, to ask etcd for a progress
    /// notification: the only way to learn that the copy is current when
    /// the last change in etcd was outside the prefix.
    progress: tokio::sync::Mutex<Option<WatchRequestSender>>,
}

/// A failed claim of this node's id: another node holds it.
struct IdTaken(String);

/// The running backend and the task that keeps its copy current (it ends
/// only with the node).
pub struct Started {
    pub consensus: Arc<EtcdConsensus>,
    pub background: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl EtcdConsensus {
    /// Connects (and logs in), claims this node's id, loads the consensus
    /// and starts the watch and the liveness lease.
    pub async fn start(config: &NodeConfig, etcd: &EtcdConfig) -> anyhow::Result<Started> {
        let endpoints = etcd.endpoints.join(",");
        let client = connect(etcd, config.request_timeout)
            .await
            .with_context(|| format!("cannot use etcd at {endpoints}"))?;
        let layout = Layout::new(&etcd.prefix);
        let (applied, _) = watch::channel(0);
        let (changes, _) = broadcast::channel(1024);
        let consensus = Arc::new(EtcdConsensus {
            id: config.id,
            layout,
            client,
            cache: RwLock::default(),
            applied,
            changes,
            request_timeout: config.request_timeout,
            endpoints,
            trouble: std::sync::Mutex::default(),
            advertise: etcd.advertise.clone(),
            progress: tokio::sync::Mutex::default(),
        });
        let instance = instance_token(&config.data_dir)?;
        let lease = consensus
            .claim_id(&instance)
            .await
            .with_context(|| format!("cannot register node {} in etcd", config.id))?
            .map_err(|IdTaken(why)| anyhow::anyhow!(why))?;
        consensus.load().await.with_context(|| {
            format!(
                "cannot read piehole's keys from etcd at {}",
                consensus.endpoints
            )
        })?;
        let watcher = tokio::spawn(consensus.clone().follow());
        let keeper = tokio::spawn(consensus.clone().keep_alive(lease, instance));
        tokio::spawn(consensus.clone().sweep());
        let background = tokio::spawn(async move {
            tokio::select! {
                r = watcher => r.context("etcd watch task")?,
                r = keeper => r.context("etcd lease task")?,
            }
        });
        Ok(Started {
            consensus,
            background,
        })
    }

    fn set_trouble(&self, why: Option<String>) {
        *self.trouble.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    fn kv(&self) -> etcd_client::KvClient {
        self.client.kv_client()
    }

    fn read_cache(&self) -> std::sync::RwLockReadGuard<'_, Cache> {
        self.cache.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers this node's address and its liveness key under a new
    /// lease. Another live node under the same id (one that is not an
    /// earlier run of this data dir) is refused: Ok(Err). Returns the lease.
    async fn claim_id(&self, instance: &str) -> anyhow::Result<Result<i64, IdTaken>> {
        let mut lease_client = self.client.lease_client();
        let lease = resend(|| {
            let mut c = lease_client.clone();
            async move { c.grant(LEASE_TTL_SECS, None).await }
        })
        .await?
        .id();
        let alive = self.layout.node_alive(self.id);
        let writes = || {
            vec![
                TxnOp::put(
                    alive.clone(),
                    instance,
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::put(self.layout.node_addr(self.id), self.advertise.clone(), None),
            ]
        };
        // Free, or ours: an earlier run of this data dir, killed before its
        // lease ran out, or this run renewing after etcd forgot its lease.
        for held in [
            Compare::version(alive.clone(), CompareOp::Equal, 0),
            Compare::value(alive.clone(), CompareOp::Equal, instance),
        ] {
            let txn = Txn::new().when(vec![held]).and_then(writes());
            let sent = resend(|| {
                let (mut kv, txn) = (self.kv(), txn.clone());
                async move { kv.txn(txn).await }
            });
            if sent.await?.succeeded() {
                return Ok(Ok(lease));
            }
        }
        let _ = lease_client.revoke(lease).await;
        Ok(Err(IdTaken(format!(
            "another node runs as id {} under {} in etcd (its liveness key is held); \
             each node needs its own --id",
            self.id,
            self.layout.prefix()
        ))))
    }

    /// Keeps the liveness lease alive; after etcd forgot it (etcd was away
    /// longer than its TTL), takes a new one.
    async fn keep_alive(self: Arc<Self>, mut lease: i64, instance: String) -> anyhow::Result<()> {
        loop {
            let kept = async {
                let (mut keeper, mut stream) = self.client.lease_client().keep_alive(lease).await?;
                loop {
                    keeper.keep_alive().await?;
                    match tokio::time::timeout(KEEPALIVE_EVERY, stream.message()).await {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => self.set_trouble(None),
                        Ok(Ok(Some(_))) => anyhow::bail!("lease expired"),
                        Ok(Ok(None)) => anyhow::bail!("keep-alive stream ended"),
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => anyhow::bail!("no keep-alive answer"),
                    }
                    tokio::time::sleep(KEEPALIVE_EVERY).await;
                }
            };
            let e: anyhow::Result<()> = kept.await;
            tracing::debug!(error = ?e, "etcd lease keep-alive interrupted");
            if let Err(e) = e {
                self.set_trouble(Some(format!("{e:#}")));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            // The lease may be gone: a new one, and the key under it, as
            // long as no other node took the id meanwhile.
            match self.claim_id(&instance).await {
                Ok(Ok(id)) => lease = id,
                Ok(Err(IdTaken(why))) => anyhow::bail!(why),
                Err(e) => tracing::debug!(error = %e, "etcd lease not renewed yet"),
            }
        }
    }

    /// Deletes generations no flip can ever reach (left by a writer that
    /// died between chunks, or lost the race to another push), each on
    /// condition that the head is still where this node saw it.
    async fn sweep(self: Arc<Self>) {
        loop {
            tokio::time::sleep(SWEEP_EVERY).await;
            let dead = self.read_cache().dead_generations();
            for (group, gen, version) in dead {
                let txn = Txn::new()
                    .when(vec![Compare::mod_revision(
                        self.layout.head(&group),
                        CompareOp::Equal,
                        version,
                    )])
                    .and_then(vec![TxnOp::delete(
                        self.layout.gen(&group, &gen),
                        Some(DeleteOptions::new().with_prefix()),
                    )]);
                match self.kv().txn(txn).await {
                    Ok(r) if r.succeeded() => {
                        tracing::info!(group, gen, "removed a generation no flip can reach")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "sweeping generations"),
                }
            }
        }
    }

    /// Replaces the cache with every key under the prefix, read in pages at
    /// one revision.
    async fn load(&self) -> anyhow::Result<()> {
        let kv = self.kv();
        let end = prefix_end(self.layout.prefix());
        let mut fresh = Cache::default();
        let mut from = self.layout.prefix().as_bytes().to_vec();
        let mut revision = 0;
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let resp = resend(|| {
                let (mut kv, from, options) = (kv.clone(), from.clone(), options.clone());
                async move { kv.get(from, Some(options)).await }
            })
            .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for item in resp.kvs() {
                fresh.apply(
                    &self.layout,
                    Change::Put {
                        key: item.key(),
                        value: item.value(),
                        mod_revision: item.mod_revision(),
                    },
                );
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        fresh.revision = revision;
        let mut touched = fresh.groups();
        {
            let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
            if revision < cache.revision {
                anyhow::bail!(
                    "etcd is at revision {revision}, behind the {} this node has seen: \
                     was it restored from a backup?",
                    cache.revision
                );
            }
            touched.extend(cache.groups());
            *cache = fresh;
        }
        self.applied.send_replace(revision);
        for g in touched {
            let _ = self.changes.send(g);
        }
        tracing::debug!(revision, "loaded piehole's keys from etcd");
        Ok(())
    }

    /// Applies the watch to the cache for as long as the node runs:
    /// reconnects from the last revision applied, and loads everything
    /// again when that revision was compacted away.
    async fn follow(self: Arc<Self>) -> anyhow::Result<()> {
        let mut must_load = false;
        // Watches in a row that ended without applying anything: one that
        // keeps failing on the same revision (a response too large to
        // decode, say) is given up for a full load.
        let mut fruitless = 0;
        loop {
            if fruitless >= WATCH_ATTEMPTS {
                tracing::warn!("the etcd watch keeps failing; loading everything again");
                must_load = true;
                fruitless = 0;
            }
            if must_load {
                if let Err(e) = self.load().await {
                    tracing::warn!(error = %e, "etcd resync failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                must_load = false;
            }
            let start = self.read_cache().revision + 1;
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(start)
                .with_progress_notify();
            let watched = self
                .client
                .watch_client()
                .max_decoding_message_size(MAX_WATCH_MESSAGE)
                .watch(self.layout.prefix(), Some(options))
                .await;
            let (sender, mut stream) = match watched {
                Ok(s) => s.split(),
                Err(e) => {
                    tracing::debug!(error = %e, "etcd watch not started; retrying");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
            };
            *self.progress.lock().await = Some(sender);
            fruitless += 1;
            loop {
                let resp = match stream.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "etcd watch interrupted; resuming");
                        break;
                    }
                };
                if resp.canceled() {
                    if resp.compact_revision() > 0 {
                        tracing::warn!(
                            from = start,
                            compacted = resp.compact_revision(),
                            "etcd compacted past this node's revision; loading everything again"
                        );
                        must_load = true;
                    }
                    break;
                }
                if resp.events().is_empty() {
                    // A progress notification: every change up to its
                    // header's revision has been sent. (An event response's
                    // header may run ahead of the events still to come.)
                    if !resp.created() {
                        if let Some(h) = resp.header() {
                            self.advance_to(h.revision());
                        }
                    }
                } else {
                    self.apply_events(resp.events());
                    fruitless = 0;
                }
            }
            *self.progress.lock().await = None;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn apply_events(&self, events: &[etcd_client::Event]) {
        if events.is_empty() {
            return;
        }
        let mut touched = Vec::new();
        let revision = {
            let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
            for event in events {
                let Some(kv) = event.kv() else { continue };
                let change = match event.event_type() {
                    EventType::Put => Change::Put {
                        key: kv.key(),
                        value: kv.value(),
                        mod_revision: kv.mod_revision(),
                    },
                    EventType::Delete => Change::Delete { key: kv.key() },
                };
                if let Some(g) = cache.apply(&self.layout, change) {
                    touched.push(g);
                }
                cache.revision = cache.revision.max(kv.mod_revision());
            }
            cache.revision
        };
        self.applied.send_replace(revision);
        touched.dedup();
        for g in touched {
            let _ = self.changes.send(g);
        }
    }

    fn advance_to(&self, revision: i64) {
        let revision = {
            let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
            cache.revision = cache.revision.max(revision);
            cache.revision
        };
        self.applied.send_replace(revision);
    }

    /// Until the cache has applied `revision` (asking etcd for progress
    /// notifications, since the revision may be of a change outside the
    /// prefix), or `deadline`.
    async fn wait_seen(&self, revision: i64, deadline: Instant) -> bool {
        loop {
            let step = deadline.min(Instant::now() + PROGRESS_EVERY);
            if self.wait_applied(revision, step).await {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            if let Some(sender) = self.progress.lock().await.as_mut() {
                let _ = sender.request_progress().await;
            }
        }
    }

    /// Until the cache has applied `revision`, or `deadline`.
    async fn wait_applied(&self, revision: i64, deadline: Instant) -> bool {
        let mut rx = self.applied.subscribe();
        let reached = async { rx.wait_for(|&r| r >= revision).await.is_ok() };
        tokio::time::timeout_at(deadline.into(), reached)
            .await
            .unwrap_or(false)
    }

    /// One transaction, bounded by `deadline`. Errors name etcd, and say
    /// whether the write may have happened.
    async fn txn(
        &self,
        txn: Txn,
        deadline: Instant,
        writes: bool,
    ) -> Result<TxnResponse, ConsensusError> {
        // The client balances over every endpoint, a dead one included; a
        // request it could not even connect for went nowhere, so it is
        // sent again (to whichever endpoint comes next) until the deadline.
        let attempt = async {
            loop {
                match self.kv().txn(txn.clone()).await {
                    Err(e) if never_sent(&e) && Instant::now() + RESEND_AFTER < deadline => {
                        tracing::debug!(error = %e, "etcd request not sent; again");
                        tokio::time::sleep(RESEND_AFTER).await;
                    }
                    other => return other,
                }
            }
        };
        match tokio::time::timeout_at(deadline.into(), attempt).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(self.failed(e, writes)),
            Err(_) if writes => Err(ConsensusError::Uncertain(format!(
                "etcd at {} did not answer in time",
                self.endpoints
            ))),
            Err(_) => Err(ConsensusError::Unavailable(format!(
                "etcd at {} did not answer in time",
                self.endpoints
            ))),
        }
    }

    fn failed(&self, e: etcd_client::Error, writes: bool) -> ConsensusError {
        let detail = match &e {
            etcd_client::Error::GRpcStatus(s) => s.message().to_string(),
            other => other.to_string(),
        };
        // Refused before etcd proposed it: nothing happened. etcd also says
        // "unavailable" for a proposal that timed out or lost its leader,
        // which may still commit: only "no leader" is certain.
        let unsent = match &e {
            etcd_client::Error::GRpcStatus(s) => match s.code() {
                tonic::Code::Unauthenticated
                | tonic::Code::PermissionDenied
                | tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition
                | tonic::Code::ResourceExhausted => true,
                tonic::Code::Unavailable => s.message().contains("no leader") || never_sent(&e),
                _ => false,
            },
            _ => never_sent(&e),
        };
        let text = format!("etcd at {} failed: {detail}", self.endpoints);
        if unsent || !writes {
            ConsensusError::Unavailable(text)
        } else {
            ConsensusError::Uncertain(text)
        }
    }

    /// Writes `refs` as a new generation of `group` and makes it the head,
    /// if the group is still at `version`. Ok(None): it was not, nothing
    /// changed. Ok(Some(revision)) of the flip.
    async fn replace_group(
        &self,
        group: &str,
        version: u64,
        refs: &BTreeMap<String, RefValue>,
        deadline: Instant,
    ) -> Result<Option<i64>, ConsensusError> {
        let head = self.layout.head(group);
        let unchanged = || Compare::mod_revision(head.clone(), CompareOp::Equal, version as i64);
        let old = self.read_cache().head_gen(group);
        let gen = format!("{version}-{}-{:08x}", self.id, rand::random::<u32>());
        let items: Vec<(&String, &RefValue)> = refs.iter().collect();
        for chunk in items.chunks(CHUNK) {
            let puts: Vec<TxnOp> = chunk
                .iter()
                .map(|(name, v)| {
                    TxnOp::put(
                        self.layout.ref_key(group, &gen, name),
                        encode_ref(&v.value, v.proposer),
                        None,
                    )
                })
                .collect();
            let txn = Txn::new().when(vec![unchanged()]).and_then(puts);
            match self.txn(txn, deadline, true).await {
                Ok(r) if r.succeeded() => {}
                Ok(_) => {
                    self.discard(group, &gen).await;
                    return Ok(None);
                }
                Err(e) => {
                    self.discard(group, &gen).await;
                    return Err(nothing_visible(e));
                }
            }
        }
        let flip = Txn::new().when(vec![unchanged()]).and_then(vec![
            TxnOp::put(head.clone(), gen.clone(), None),
            TxnOp::delete(
                self.layout.gen(group, &old),
                Some(DeleteOptions::new().with_prefix()),
            ),
        ]);
        match self.txn(flip, deadline, true).await {
            Ok(r) if r.succeeded() => Ok(Some(revision_of(&r))),
            Ok(_) => {
                self.discard(group, &gen).await;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Removes a generation that never became the head (best effort: a
    /// leftover is invisible and only costs space).
    async fn discard(&self, group: &str, gen: &str) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.kv().delete(
                self.layout.gen(group, gen),
                Some(DeleteOptions::new().with_prefix()),
            ),
        )
        .await;
    }

    /// After a committed write: Ok once this node's copy has it, so that
    /// nothing here acts on a copy older than what it just acknowledged.
    async fn seen_or_uncertain(
        &self,
        revision: i64,
        deadline: Instant,
    ) -> Result<(), ConsensusError> {
        if self.wait_applied(revision, deadline).await {
            Ok(())
        } else {
            Err(ConsensusError::Uncertain(format!(
                "etcd at {} took the update at revision {revision}, but this node's copy \
                 has not seen it in time",
                self.endpoints
            )))
        }
    }

    /// When the cache saw `group` at `version` but etcd has moved on: wait
    /// until the cache has caught up with what the failed transaction saw.
    async fn catch_up(&self, resp: &TxnResponse, deadline: Instant) -> Result<(), ConsensusError> {
        let seen = first_get(resp)
            .and_then(|kvs| kvs.first().map(|kv| kv.mod_revision()))
            .unwrap_or_else(|| revision_of(resp));
        if self.wait_seen(seen, deadline).await {
            Ok(())
        } else {
            Err(ConsensusError::Unavailable(format!(
                "this node's copy of etcd at {} stays behind (its watch is not delivering)",
                self.endpoints
            )))
        }
    }
}

/// `call` again while it fails without having been sent (the client tried
/// a dead endpoint), a few times.
async fn resend<T, F, Fut>(mut call: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut tries = 0;
    loop {
        match call().await {
            Err(e) if never_sent(&e) && tries < 20 => {
                tries += 1;
                tokio::time::sleep(RESEND_AFTER).await;
            }
            other => return other,
        }
    }
}

/// The request never left this node: no connection to an endpoint.
fn never_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable
                && (s.message().contains("connect error")
                    || s.message().contains("transport error"))
        }
        _ => false,
    }
}

/// A chunk of a new generation failed: nobody can see that generation.
fn nothing_visible(e: ConsensusError) -> ConsensusError {
    match e {
        ConsensusError::Uncertain(text) => ConsensusError::Unavailable(text),
        other => other,
    }
}

fn revision_of(resp: &TxnResponse) -> i64 {
    resp.header().map_or(0, |h| h.revision())
}

/// The keys of the first get among a transaction's answers.
fn first_get(resp: &TxnResponse) -> Option<Vec<etcd_client::KeyValue>> {
    resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => Some(g.kvs().to_vec()),
        _ => None,
    })
}

async fn connect(etcd: &EtcdConfig, request_timeout: Duration) -> anyhow::Result<Client> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(request_timeout)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true)
        // etcd's auth tokens expire (5 minutes unused by default).
        .with_auto_token_refresh(true);
    if let Some((user, password)) = &etcd.auth {
        options = options.with_user(user.clone(), password.clone());
    }
    if etcd.ca.is_some() || etcd.identity.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &etcd.ca {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &etcd.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        options = options.with_tls(tls);
    }
    let started = Instant::now();
    loop {
        let attempt = async {
            let mut client = Client::connect(etcd.endpoints.clone(), Some(options.clone())).await?;
            // connect() may succeed without talking to anyone: ask.
            client.status().await?;
            Ok::<_, etcd_client::Error>(client)
        };
        match attempt.await {
            Ok(client) => return Ok(client),
            Err(e) if is_refusal(&e) => return Err(refusal(e)),
            Err(e) if started.elapsed() >= CONNECT_PATIENCE => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, "etcd not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// etcd answered and said no (credentials, permissions, a certificate it
/// or we refuse): retrying is useless.
fn is_refusal(e: &etcd_client::Error) -> bool {
    let tls = |text: &str| {
        let text = text.to_ascii_lowercase();
        text.contains("certificate") || text.contains("fatal alert")
    };
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            matches!(
                s.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::Unauthenticated
                    | tonic::Code::PermissionDenied
            ) || tls(s.message())
        }
        other => tls(&format!("{other:?}")),
    }
}

fn refusal(e: etcd_client::Error) -> anyhow::Error {
    match e {
        etcd_client::Error::GRpcStatus(s) => anyhow::anyhow!("etcd refused: {}", s.message()),
        other => other.into(),
    }
}

/// This data dir's token in etcd: tells a restart of this node (whose
/// lease etcd has not expired yet) from another node under the same id.
fn instance_token(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("etcd-instance");
    if let Ok(token) = std::fs::read_to_string(&path) {
        let token = token.trim().to_string();
        if !token.is_empty() {
            return Ok(token);
        }
    }
    let token = format!("{:016x}", rand::random::<u64>());
    let tmp = data_dir.join("etcd-instance.tmp");
    std::fs::write(&tmp, &token).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(token)
}

fn cas_list(updates: &[RefUpdate]) -> Vec<Cas<'_>> {
    updates
        .iter()
        .map(|u| Cas {
            name: &u.ref_name,
            expected: u.expected.as_deref().unwrap_or_default(),
            new: u.new.as_deref().unwrap_or_default(),
        })
        .collect()
}

#[async_trait]
impl Consensus for EtcdConsensus {
    fn node_id(&self) -> u64 {
        self.id
    }

    fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    async fn update_refs(
        &self,
        group: &str,
        updates: Vec<RefUpdate>,
        atomic: bool,
        deadline: Instant,
    ) -> Result<Vec<RefOutcome>, ConsensusError> {
        let deadline = deadline.min(Instant::now() + self.request_timeout);
        let cas = cas_list(&updates);
        let head = self.layout.head(group);
        loop {
            if deadline.saturating_duration_since(Instant::now()) < MIN_TIME_TO_WRITE {
                return Err(ConsensusError::OutOfTime);
            }
            let (view, gen) = {
                let cache = self.read_cache();
                (cache.group(group), cache.head_gen(group))
            };
            let decision = ref_rule::decide(&cas, atomic, &view.refs)
                .map_err(|e| ConsensusError::Refused(format!("deciding the push: {e}")))?;
            let unchanged =
                Compare::mod_revision(head.clone(), CompareOp::Equal, view.version as i64);
            let current_head = TxnOp::get(head.clone(), None);
            if decision.moves.len() >= CHUNK {
                let mut refs = view.refs.clone();
                for &i in &decision.moves {
                    let u = &updates[i];
                    match &u.new {
                        Some(new) => {
                            refs.insert(
                                u.ref_name.clone(),
                                RefValue {
                                    value: new.clone(),
                                    proposer: self.id,
                                },
                            );
                        }
                        None => {
                            refs.remove(&u.ref_name);
                        }
                    }
                }
                match self
                    .replace_group(group, view.version, &refs, deadline)
                    .await?
                {
                    Some(revision) => {
                        self.seen_or_uncertain(revision, deadline).await?;
                        return Ok(decision.outcomes);
                    }
                    None => {
                        // Changed meanwhile: see the change, decide again.
                        self.group(group, true).await?;
                        continue;
                    }
                }
            }
            let mut writes: Vec<TxnOp> = decision
                .moves
                .iter()
                .map(|&i| {
                    let u = &updates[i];
                    let key = self.layout.ref_key(group, &gen, &u.ref_name);
                    match &u.new {
                        Some(new) => TxnOp::put(key, encode_ref(new, self.id), None),
                        None => TxnOp::delete(key, None),
                    }
                })
                .collect();
            let wrote = !writes.is_empty();
            if wrote {
                // Bumps the group's version (the head's mod_revision).
                writes.push(TxnOp::put(head.clone(), gen.clone(), None));
            }
            // With nothing to write, the transaction only proves the copy
            // the rule read is current.
            let txn = Txn::new()
                .when(vec![unchanged])
                .and_then(writes)
                .or_else(vec![current_head]);
            let resp = self.txn(txn, deadline, wrote).await?;
            if resp.succeeded() {
                if wrote {
                    self.seen_or_uncertain(revision_of(&resp), deadline).await?;
                }
                return Ok(decision.outcomes);
            }
            self.catch_up(&resp, deadline).await?;
        }
    }

    async fn clobber(
        &self,
        group: &str,
        refs: BTreeMap<String, String>,
        expected_version: u64,
    ) -> Result<(), ConsensusError> {
        let deadline = Instant::now() + self.request_timeout;
        let refs = refs
            .into_iter()
            .map(|(name, value)| {
                (
                    name,
                    RefValue {
                        value,
                        proposer: self.id,
                    },
                )
            })
            .collect();
        match self
            .replace_group(group, expected_version, &refs, deadline)
            .await?
        {
            Some(revision) => self.seen_or_uncertain(revision, deadline).await,
            None => Err(ConsensusError::Refused(
                "the group changed while clobber ran (a push landed); nothing was changed, run it again"
                    .into(),
            )),
        }
    }

    async fn register(&self, group: &str, node_id: u64, path: &str) -> Result<(), ConsensusError> {
        let deadline = Instant::now() + self.request_timeout;
        let txn = Txn::new().and_then(vec![TxnOp::put(
            self.layout.replica(group, node_id),
            path,
            None,
        )]);
        let resp = self.txn(txn, deadline, true).await?;
        self.seen_or_uncertain(revision_of(&resp), deadline).await
    }

    async fn group(&self, group: &str, linearizable: bool) -> Result<GroupView, ConsensusError> {
        if linearizable {
            // The group's head as etcd has it now; the copy must have seen
            // at least that.
            let deadline = Instant::now() + self.request_timeout;
            let txn = Txn::new().and_then(vec![TxnOp::get(self.layout.head(group), None)]);
            let resp = self.txn(txn, deadline, false).await?;
            self.catch_up(&resp, deadline).await?;
        }
        self.local_group(group)
    }

    fn local_group(&self, group: &str) -> Result<GroupView, ConsensusError> {
        Ok(self.read_cache().group(group))
    }

    fn peers(&self) -> BTreeMap<u64, String> {
        self.read_cache()
            .nodes
            .iter()
            .filter_map(|(&id, n)| n.addr.clone().map(|a| (id, a)))
            .collect()
    }

    fn groups(&self) -> Vec<String> {
        self.read_cache().groups()
    }

    fn local_value(&self, group: &str, ref_name: &str) -> Option<String> {
        self.read_cache().value(group, ref_name)
    }

    fn hosted(&self) -> BTreeMap<String, String> {
        self.read_cache().hosted_by(self.id)
    }

    fn subscribe(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    async fn wait_replayed(&self) {
        // start() loaded everything before returning.
    }

    fn status(&self) -> ClusterStatus {
        let cache = self.read_cache();
        ClusterStatus {
            node_id: self.id,
            backend: "etcd",
            leader_id: 0,
            term: 0,
            commit_index: cache.revision.max(0) as u64,
            applied_index: cache.revision.max(0) as u64,
            first_log_index: 0,
            snapshot_index: 0,
            snapshots_installed: 0,
            members: cache
                .nodes
                .iter()
                .filter_map(|(&id, n)| {
                    n.addr.clone().map(|addr| MemberStatus {
                        id,
                        addr,
                        reachable: id == self.id || n.alive,
                        ..Default::default()
                    })
                })
                .collect(),
            store: match &*self.trouble.lock().unwrap_or_else(|e| e.into_inner()) {
                None => format!(
                    "etcd at {}, prefix {}, read up to revision {}",
                    self.endpoints,
                    self.layout.prefix(),
                    cache.revision
                ),
                Some(why) => format!(
                    "etcd at {} UNREACHABLE ({why}); read up to revision {}",
                    self.endpoints, cache.revision
                ),
            },
            cluster_id: 0,
        }
    }

    fn counts(&self) -> (u64, u64) {
        self.read_cache().counts()
    }
}
