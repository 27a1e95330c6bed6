//! Proposals this node made and is waiting for: each is resolved when its
//! entry comes out of this node's log (or a snapshot that covers it), and
//! flagged as lost when the driver or the transport knows it was dropped,
//! so its proposer offers it again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::state::{Outcome, StateMachine};

struct Pending {
    done: oneshot::Sender<Outcome>,
    lost: Arc<AtomicBool>,
}

/// What a proposer holds while it waits.
pub struct Waiting {
    pub outcome: oneshot::Receiver<Outcome>,
    /// Set when the proposal is known to have been dropped before it reached
    /// a leader's log.
    pub lost: Arc<AtomicBool>,
}

#[derive(Default)]
pub struct Proposals(Mutex<HashMap<u64, Pending>>);

impl Proposals {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(&self, request_id: u64) -> Waiting {
        let (done, outcome) = oneshot::channel();
        let lost = Arc::new(AtomicBool::new(false));
        self.map().insert(
            request_id,
            Pending {
                done,
                lost: lost.clone(),
            },
        );
        Waiting { outcome, lost }
    }

    pub fn forget(&self, request_id: u64) {
        self.map().remove(&request_id);
    }

    pub fn resolve(&self, request_id: u64, outcome: Outcome) {
        if let Some(p) = self.map().remove(&request_id) {
            let _ = p.done.send(outcome);
        }
    }

    pub fn mark_lost(&self, request_id: u64) {
        if let Some(p) = self.map().get(&request_id) {
            p.lost.store(true, Ordering::Relaxed);
        }
    }

    /// After a snapshot was installed: our proposals it covers never come
    /// out of the log here, but the state remembers their outcomes.
    pub fn resolve_covered(&self, me: u64, state: &StateMachine) {
        let mut map = self.map();
        let covered: Vec<(u64, Outcome)> = map
            .keys()
            .filter_map(|&id| state.seen(me, id).map(|o| (id, o)))
            .collect();
        for (id, outcome) in covered {
            if let Some(p) = map.remove(&id) {
                let _ = p.done.send(outcome);
            }
        }
    }
}
