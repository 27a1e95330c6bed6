//! This node's copy of piehole's keys in etcd, fed by one prefix watch.
//!
//! It plays the part the applied state machine plays in Raft mode: local
//! reads, the replicator's view, the base the update rule decides on. It
//! moves only forward: a full load replaces it at one revision, then watch
//! events apply in revision order, and `revision` says how far it is.

use std::collections::{BTreeMap, BTreeSet};

use super::layout::{decode_ref, Key, Layout, FIRST_GEN};
use crate::state::{GroupView, RefValue};

#[derive(Debug, Clone, Default)]
struct Head {
    gen: String,
    /// The head key's mod_revision: the group's version.
    mod_revision: i64,
}

#[derive(Debug, Clone, Default)]
pub struct NodeEntry {
    pub addr: Option<String>,
    pub alive: bool,
}

#[derive(Debug, Default)]
pub struct Cache {
    heads: BTreeMap<String, Head>,
    /// (group, generation) -> refs; generations other than the head are
    /// being written (or were abandoned by a writer that died).
    gens: BTreeMap<(String, String), BTreeMap<String, RefValue>>,
    replicas: BTreeMap<String, BTreeMap<u64, String>>,
    pub nodes: BTreeMap<u64, NodeEntry>,
    /// Every change up to this revision is applied.
    pub revision: i64,
}

/// One change as the watch or a load reports it.
pub enum Change<'a> {
    Put {
        key: &'a [u8],
        value: &'a [u8],
        mod_revision: i64,
    },
    Delete {
        key: &'a [u8],
    },
}

impl Cache {
    /// Applies one change; returns the group it touched, if any.
    pub fn apply(&mut self, layout: &Layout, change: Change) -> Option<String> {
        let (key, put) = match change {
            Change::Put {
                key,
                value,
                mod_revision,
            } => (key, Some((value, mod_revision))),
            Change::Delete { key } => (key, None),
        };
        match layout.parse(key)? {
            Key::Head { group } => {
                match put {
                    Some((value, mod_revision)) => {
                        let gen = String::from_utf8_lossy(value).into_owned();
                        self.heads.insert(group.clone(), Head { gen, mod_revision });
                    }
                    None => {
                        self.heads.remove(&group);
                    }
                }
                Some(group)
            }
            Key::Ref { group, gen, name } => {
                let slot = (group.clone(), gen);
                let visible = self.head_gen(&group) == slot.1;
                match put.and_then(|(value, _)| decode_ref(value)) {
                    Some((value, proposer)) => {
                        self.gens
                            .entry(slot)
                            .or_default()
                            .insert(name, RefValue { value, proposer });
                    }
                    None => {
                        if let Some(refs) = self.gens.get_mut(&slot) {
                            refs.remove(&name);
                            if refs.is_empty() {
                                self.gens.remove(&slot);
                            }
                        }
                    }
                }
                // Only the head generation is visible.
                visible.then_some(group)
            }
            Key::Replica { group, node } => {
                match put {
                    Some((value, _)) => {
                        let path = String::from_utf8_lossy(value).into_owned();
                        self.replicas
                            .entry(group.clone())
                            .or_default()
                            .insert(node, path);
                    }
                    None => {
                        if let Some(r) = self.replicas.get_mut(&group) {
                            r.remove(&node);
                        }
                    }
                }
                Some(group)
            }
            Key::NodeAddr { node } => {
                let addr = put.map(|(v, _)| String::from_utf8_lossy(v).into_owned());
                self.nodes.entry(node).or_default().addr = addr;
                None
            }
            Key::NodeAlive { node } => {
                self.nodes.entry(node).or_default().alive = put.is_some();
                None
            }
        }
    }

    /// The generation `group`'s refs are read from.
    pub fn head_gen(&self, group: &str) -> String {
        self.heads
            .get(group)
            .map(|h| h.gen.clone())
            .unwrap_or_else(|| FIRST_GEN.to_string())
    }

    /// Generations that can never become a head, with the head's version
    /// they were judged against: (group, generation, head version). A
    /// generation is named after the head version it was written against,
    /// and its flip holds only if the head is still at that version; once
    /// the head moved on (versions only grow) it is dead.
    pub fn dead_generations(&self) -> Vec<(String, String, i64)> {
        self.gens
            .keys()
            .filter_map(|(group, gen)| {
                let head = self.heads.get(group);
                let head_gen = head.map_or(FIRST_GEN, |h| h.gen.as_str());
                let version = head.map_or(0, |h| h.mod_revision);
                let written_at: Option<i64> = gen.split('-').next().and_then(|v| v.parse().ok());
                (gen != head_gen && written_at != Some(version))
                    .then(|| (group.clone(), gen.clone(), version))
            })
            .collect()
    }

    /// The group's refs, replicas and version (the head's mod_revision).
    pub fn group(&self, group: &str) -> GroupView {
        let head = self.heads.get(group).cloned().unwrap_or_default();
        let gen = if head.gen.is_empty() {
            FIRST_GEN.to_string()
        } else {
            head.gen
        };
        GroupView {
            refs: self
                .gens
                .get(&(group.to_string(), gen))
                .cloned()
                .unwrap_or_default(),
            replicas: self.replicas.get(group).cloned().unwrap_or_default(),
            version: head.mod_revision.max(0) as u64,
        }
    }

    pub fn value(&self, group: &str, name: &str) -> Option<String> {
        self.gens
            .get(&(group.to_string(), self.head_gen(group)))?
            .get(name)
            .map(|v| v.value.clone())
    }

    pub fn groups(&self) -> Vec<String> {
        let mut names: BTreeSet<String> = self.heads.keys().cloned().collect();
        names.extend(self.replicas.keys().cloned());
        names.into_iter().collect()
    }

    pub fn hosted_by(&self, node: u64) -> BTreeMap<String, String> {
        self.replicas
            .iter()
            .filter_map(|(g, r)| r.get(&node).map(|p| (g.clone(), p.clone())))
            .collect()
    }

    /// (groups, visible consensus refs)
    pub fn counts(&self) -> (u64, u64) {
        let groups = self.groups();
        let refs = groups
            .iter()
            .map(|g| {
                self.gens
                    .get(&(g.clone(), self.head_gen(g)))
                    .map_or(0, |r| r.len() as u64)
            })
            .sum();
        (groups.len() as u64, refs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(c: &mut Cache, l: &Layout, key: &str, value: &str, rev: i64) -> Option<String> {
        c.apply(
            l,
            Change::Put {
                key: key.as_bytes(),
                value: value.as_bytes(),
                mod_revision: rev,
            },
        )
    }

    #[test]
    fn a_new_generation_is_invisible_until_the_head_flips_to_it() {
        let l = Layout::new("/p/");
        let mut c = Cache::default();
        put(
            &mut c,
            &l,
            &l.ref_key("g", "0", "refs/heads/main"),
            "a 1",
            2,
        );
        put(&mut c, &l, &l.head("g"), "0", 2);
        assert_eq!(c.group("g").version, 2);
        assert_eq!(c.value("g", "refs/heads/main").as_deref(), Some("a"));
        // A clobber writes generation "5-x" in chunks...
        let touched = put(
            &mut c,
            &l,
            &l.ref_key("g", "5-x", "refs/heads/other"),
            "b 2",
            5,
        );
        assert_eq!(
            touched, None,
            "an unseen generation changes nothing visible"
        );
        assert_eq!(c.value("g", "refs/heads/other"), None);
        // ...then flips the head and deletes the old one.
        put(&mut c, &l, &l.head("g"), "5-x", 6);
        c.apply(
            &l,
            Change::Delete {
                key: l.ref_key("g", "0", "refs/heads/main").as_bytes(),
            },
        );
        let view = c.group("g");
        assert_eq!(view.version, 6);
        assert_eq!(view.refs.len(), 1);
        assert_eq!(view.refs["refs/heads/other"].value, "b");
        assert_eq!(view.refs["refs/heads/other"].proposer, 2);
        assert_eq!(c.counts(), (1, 1));
    }

    #[test]
    fn a_generation_is_dead_once_the_head_moved_past_its_version() {
        let l = Layout::new("/p/");
        let mut c = Cache::default();
        put(
            &mut c,
            &l,
            &l.ref_key("g", "0", "refs/heads/main"),
            "a 1",
            2,
        );
        put(&mut c, &l, &l.head("g"), "0", 2);
        // Written against version 2: it may still be flipped to.
        put(
            &mut c,
            &l,
            &l.ref_key("g", "2-1-aa", "refs/heads/x"),
            "b 1",
            3,
        );
        assert!(c.dead_generations().is_empty());
        // A push moves the head: that writer can never flip now.
        put(&mut c, &l, &l.head("g"), "0", 4);
        assert_eq!(
            c.dead_generations(),
            vec![("g".to_string(), "2-1-aa".to_string(), 4)]
        );
    }

    #[test]
    fn replicas_and_nodes_follow_their_keys() {
        let l = Layout::new("/p/");
        let mut c = Cache::default();
        assert_eq!(
            put(&mut c, &l, &l.replica("g", 2), "/srv/g.git", 3).as_deref(),
            Some("g")
        );
        put(&mut c, &l, &l.node_addr(2), "127.0.0.1:7002", 3);
        put(&mut c, &l, &l.node_alive(2), "", 4);
        assert_eq!(
            c.hosted_by(2).get("g").map(String::as_str),
            Some("/srv/g.git")
        );
        assert!(c.nodes[&2].alive);
        c.apply(
            &l,
            Change::Delete {
                key: l.node_alive(2).as_bytes(),
            },
        );
        assert!(!c.nodes[&2].alive);
        assert_eq!(c.groups(), vec!["g".to_string()]);
    }
}
