//! The fault side of a Jepsen-style test: a seeded random number
//! generator, faults that SIGKILL or SIGSTOP nodes, and a [`Nemesis`] that
//! injects them into a [`Cluster`] and heals them.
//!
//! A node frozen with SIGSTOP keeps its sockets: connections are accepted
//! by the kernel and nothing answers, which is what a stalled host or a
//! long GC pause looks like to its peers. A killed node loses everything
//! not on disk. The nemesis thaws every node it froze when dropped, so a
//! failing test never leaves a stopped process behind (the cluster's own
//! drop then kills them).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::{poll_until, Cluster};

/// xorshift64*, seeded through splitmix64 so that nearby seeds (1, 2, 3)
/// give unrelated streams. Small, reproducible, and no crate needed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // xorshift's one forbidden state.
        Rng(if z == 0 { 0x2545_f491_4f6c_dd1d } else { z })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (n > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        self.next_u64() % n
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// A duration in `lo..=hi`, to the millisecond.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let (lo, hi) = (lo.as_millis() as u64, hi.as_millis() as u64);
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// A generator of its own for another thread, derived from this one.
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
}

/// Sends `sig` (a name such as STOP, CONT) to `pid` with kill(1): libc is
/// not a dependency of the tests, and this is not a hot path.
pub fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// The state letter of a process from /proc (R, S, D, T, Z, ...); None if it is gone.
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Node `id` stopped with SIGSTOP; continued (SIGCONT) when dropped, so a
/// failing test does not leave a frozen process behind.
pub struct Frozen(u32);

impl Frozen {
    pub fn stop(c: &Cluster, id: u64) -> Frozen {
        let pid = c.node(id).pid().expect("the node is running");
        signal(pid, "STOP");
        // The signal is asynchronous; a test is meaningless until it took effect.
        super::poll_until(
            &format!("node {id} (pid {pid}) to be stopped"),
            Duration::from_secs(5),
            || (process_state(pid) == Some('T')).then_some(()),
        );
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

/// One fault: nodes to SIGKILL and nodes to SIGSTOP, disjoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub kill: Vec<u64>,
    pub pause: Vec<u64>,
}

impl Fault {
    /// One of five shapes, equally likely, on randomly chosen distinct
    /// nodes of `ids` (at least 2): kill one, kill two, pause one, pause
    /// two, or kill one and pause another. Two of three down or frozen
    /// costs the cluster its majority; one costs it a member (sometimes the
    /// leader).
    pub fn random(rng: &mut Rng, ids: &[u64]) -> Fault {
        let mut pool = ids.to_vec();
        let mut take = |rng: &mut Rng| pool.remove(rng.below(pool.len() as u64) as usize);
        match rng.below(5) {
            0 => Fault {
                kill: vec![take(rng)],
                pause: vec![],
            },
            1 => Fault {
                kill: vec![take(rng), take(rng)],
                pause: vec![],
            },
            2 => Fault {
                kill: vec![],
                pause: vec![take(rng)],
            },
            3 => Fault {
                kill: vec![],
                pause: vec![take(rng), take(rng)],
            },
            _ => Fault {
                kill: vec![take(rng)],
                pause: vec![take(rng)],
            },
        }
    }

    /// The fault and its nodes, e.g. "kill:2+pause:1,3".
    pub fn describe(&self) -> String {
        let part = |what: &str, ids: &[u64]| {
            (!ids.is_empty()).then(|| {
                let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
                format!("{what}:{}", ids.join(","))
            })
        };
        [part("kill", &self.kill), part("pause", &self.pause)]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("+")
    }

    /// A stable name for counting: "kill-1", "pause-2", "kill-1+pause-1".
    pub fn kind(&self) -> String {
        let part = |what: &str, n: usize| (n > 0).then(|| format!("{what}-{n}"));
        [
            part("kill", self.kill.len()),
            part("pause", self.pause.len()),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("+")
    }
}

/// Injects faults into a cluster and heals them; remembers what it broke.
#[derive(Default)]
pub struct Nemesis {
    /// Nodes we SIGSTOPped and have not continued: id -> pid.
    frozen: BTreeMap<u64, u32>,
    /// Nodes we SIGKILLed and have not restarted.
    killed: BTreeSet<u64>,
}

impl Nemesis {
    pub fn new() -> Nemesis {
        Nemesis::default()
    }

    /// Applies `fault`: SIGKILLs (and reaps) its `kill` nodes, SIGSTOPs its
    /// `pause` nodes and returns once the kernel shows them stopped (the
    /// signal is asynchronous; until then the fault has not begun).
    pub fn inject(&mut self, c: &mut Cluster, fault: &Fault) {
        for &id in &fault.kill {
            c.kill(id);
            self.killed.insert(id);
        }
        for &id in &fault.pause {
            let pid = c.node(id).pid().expect("a node to pause is running");
            signal(pid, "STOP");
            self.frozen.insert(id, pid);
            poll_until(
                &format!("node {id} (pid {pid}) to be stopped"),
                Duration::from_secs(5),
                || (process_state(pid)? == 'T').then_some(()),
            );
        }
    }

    /// Whether some fault is in effect.
    pub fn is_active(&self) -> bool {
        !self.frozen.is_empty() || !self.killed.is_empty()
    }

    /// Ends every fault in effect: continues the frozen nodes (returning
    /// once none shows as stopped) and restarts the killed ones (each
    /// returns once its socket answers `status`).
    pub fn heal(&mut self, c: &mut Cluster) {
        self.thaw();
        for id in std::mem::take(&mut self.killed) {
            c.restart(id);
        }
    }

    fn thaw(&mut self) {
        for (id, pid) in std::mem::take(&mut self.frozen) {
            signal(pid, "CONT");
            poll_until(
                &format!("node {id} (pid {pid}) to be continued"),
                Duration::from_secs(5),
                // Gone counts as continued: there is nothing left to stop.
                || (process_state(pid) != Some('T')).then_some(()),
            );
        }
    }
}

impl Drop for Nemesis {
    /// A test that fails mid-fault must not leave a stopped process behind.
    fn drop(&mut self) {
        for &pid in self.frozen.values() {
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
    }
}
