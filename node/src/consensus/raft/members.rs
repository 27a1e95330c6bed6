//! Who the members are and where to dial them.
//!
//! The replicated state holds each member's address (from bootstrap or
//! `member add`) and a tombstone for each removed one; raft's configuration
//! holds who votes. This book is the state's list as of the last applied
//! change, refreshed by the driver, and read by the transport, the peer
//! gate and the replicator without touching the state machine.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use piehole_protocol::pb;

use crate::config::NodeConfig;
use crate::state::StateMachine;

pub struct MemberBook {
    /// From --peers: where this node dials a member, whatever the cluster
    /// recorded (another network path, a proxy).
    overrides: BTreeMap<u64, String>,
    known: RwLock<BTreeMap<u64, pb::ClusterMember>>,
    /// Members this node's state does not know yet (it is behind the
    /// `member add`), as they introduced themselves in raft calls: without
    /// them it could not answer the leader that brings it that entry.
    learned: RwLock<BTreeMap<u64, String>>,
    /// Bumped by every refresh, so readers can tell the list changed.
    generation: AtomicU64,
}

impl MemberBook {
    pub fn new(config: &NodeConfig, state: &StateMachine) -> anyhow::Result<MemberBook> {
        let book = MemberBook {
            overrides: config.peers.clone(),
            known: RwLock::default(),
            learned: RwLock::default(),
            generation: AtomicU64::new(0),
        };
        book.refresh(state)?;
        Ok(book)
    }

    /// Reads the members again after the state changed them.
    pub fn refresh(&self, state: &StateMachine) -> anyhow::Result<()> {
        let members = state.members()?;
        self.learned
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| !members.contains_key(id));
        *self.known.write().unwrap_or_else(|e| e.into_inner()) = members;
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn known(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, pb::ClusterMember>> {
        self.known.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Where to dial `id`; None if it is not (or no longer) a member.
    pub fn addr(&self, id: u64) -> Option<String> {
        let recorded = match self.known().get(&id) {
            Some(m) if m.removed => return None,
            Some(m) => m.addr.clone(),
            None => self.learned().get(&id)?.clone(),
        };
        Some(self.overrides.get(&id).cloned().unwrap_or(recorded))
    }

    /// A member's address as the cluster recorded it (ours, for introductions).
    pub fn recorded_addr(&self, id: u64) -> String {
        self.known()
            .get(&id)
            .map(|m| m.addr.clone())
            .unwrap_or_default()
    }

    fn learned(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, String>> {
        self.learned.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A member this node's state does not know yet introduced itself. A
    /// removed one stays removed.
    pub fn learn(&self, id: u64, addr: &str) {
        if addr.is_empty() || self.known().contains_key(&id) {
            return;
        }
        let mut learned = self.learned.write().unwrap_or_else(|e| e.into_inner());
        if learned.get(&id).map(String::as_str) != Some(addr) {
            tracing::info!(
                id,
                addr,
                "a member this node's state does not know yet introduced itself"
            );
            learned.insert(id, addr.to_string());
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// The current members (not removed): id -> address to dial.
    pub fn current(&self) -> BTreeMap<u64, String> {
        let mut ids: Vec<u64> = self
            .known()
            .values()
            .filter(|m| !m.removed)
            .map(|m| m.id)
            .collect();
        ids.extend(self.learned().keys().copied());
        ids.into_iter()
            .filter_map(|id| self.addr(id).map(|a| (id, a)))
            .collect()
    }

    /// Every member ever known: (id, recorded address, removed).
    pub fn all(&self) -> Vec<(u64, String, bool)> {
        self.known()
            .values()
            .map(|m| (m.id, m.addr.clone(), m.removed))
            .collect()
    }

    pub fn is_removed(&self, id: u64) -> bool {
        self.known().get(&id).is_some_and(|m| m.removed)
    }

    pub fn contains(&self, id: u64) -> bool {
        self.known().contains_key(&id)
    }
}
