//! The compare-and-swap rule of one push, over any view of a group's refs.
//!
//! The embedded state machine applies it to its sled tree as a log entry
//! comes out; the etcd backend applies it to its watch-fed copy and commits
//! the result on condition that the group has not changed since. One rule,
//! so the two backends cannot drift apart.

use std::collections::{BTreeMap, BTreeSet};

use crate::state::{RefOutcome, RefValue};

/// One ref's compare-and-swap; "" is "absent", as on the wire.
#[derive(Debug, Clone, Copy)]
pub struct Cas<'a> {
    pub name: &'a str,
    pub expected: &'a str,
    pub new: &'a str,
}

/// What the rule reads of a group.
pub trait RefView {
    fn value(&self, name: &str) -> anyhow::Result<Option<String>>;
    /// A ref under `dir` (which ends in '/') that is not in `skip`.
    fn child(&self, dir: &str, skip: &BTreeSet<String>) -> anyhow::Result<Option<String>>;
}

impl RefView for BTreeMap<String, RefValue> {
    fn value(&self, name: &str) -> anyhow::Result<Option<String>> {
        Ok(self.get(name).map(|v| v.value.clone()))
    }

    fn child(&self, dir: &str, skip: &BTreeSet<String>) -> anyhow::Result<Option<String>> {
        Ok(self
            .range(dir.to_string()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(dir))
            .find(|k| !skip.contains(*k))
            .cloned())
    }
}

/// The rule's verdict: one outcome per update, in order, and the indices of
/// the updates that move their ref.
#[derive(Debug, Default)]
pub struct Decision {
    pub outcomes: Vec<RefOutcome>,
    pub moves: Vec<usize>,
}

/// Per ref: equal to `new` already is success (a retried or replayed
/// update), equal to `expected` moves it, anything else fails and reports
/// the current value. A ref that would need another ref's name as a
/// directory (or the reverse) is refused. Atomic: all move or none does.
pub fn decide(updates: &[Cas], atomic: bool, view: &impl RefView) -> anyhow::Result<Decision> {
    let mut currents = Vec::with_capacity(updates.len());
    // Names this push deletes (whatever their order in it, as in git's own
    // transactions) and creates, as seen by the clash check.
    let mut deleted = BTreeSet::new();
    for u in updates {
        let current = view.value(u.name)?;
        if u.new.is_empty() && current.as_deref().unwrap_or_default() == u.expected {
            deleted.insert(u.name.to_string());
        }
        currents.push(current);
    }
    let mut created = BTreeSet::new();
    let mut decision = Decision::default();
    for (i, (u, current)) in updates.iter().zip(currents).enumerate() {
        let current_or_empty = current.as_deref().unwrap_or_default();
        let outcome = if current_or_empty == u.new {
            RefOutcome {
                applied: true,
                current,
                blocked_by: None,
            }
        } else if current_or_empty != u.expected {
            RefOutcome {
                applied: false,
                current,
                blocked_by: None,
            }
        } else if let Some(other) = (current.is_none() && !u.new.is_empty())
            .then(|| name_clash(view, u.name, &created, &deleted))
            .transpose()?
            .flatten()
        {
            RefOutcome {
                applied: false,
                current,
                blocked_by: Some(other),
            }
        } else {
            if !u.new.is_empty() {
                created.insert(u.name.to_string());
            }
            decision.moves.push(i);
            RefOutcome {
                applied: true,
                current: (!u.new.is_empty()).then(|| u.new.to_string()),
                blocked_by: None,
            }
        };
        decision.outcomes.push(outcome);
    }
    if atomic && decision.outcomes.iter().any(|o| !o.applied) {
        // Nothing moves; report every ref's present value.
        for (o, u) in decision.outcomes.iter_mut().zip(updates) {
            if o.applied {
                o.applied = false;
                o.current = view.value(u.name)?;
            }
        }
        decision.moves.clear();
    }
    Ok(decision)
}

/// A ref that creating `name` would clash with: one whose name is a leading
/// directory of `name`, or one under `name/`. Refs this push creates count,
/// refs it deletes do not.
fn name_clash(
    view: &impl RefView,
    name: &str,
    created: &BTreeSet<String>,
    deleted: &BTreeSet<String>,
) -> anyhow::Result<Option<String>> {
    for (i, _) in name.match_indices('/') {
        let parent = &name[..i];
        if created.contains(parent) || (!deleted.contains(parent) && view.value(parent)?.is_some())
        {
            return Ok(Some(parent.to_string()));
        }
    }
    let below = format!("{name}/");
    if let Some(c) = created
        .range(below.clone()..)
        .next()
        .filter(|c| c.starts_with(&below))
    {
        return Ok(Some(c.clone()));
    }
    view.child(&below, deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(refs: &[(&str, &str)]) -> BTreeMap<String, RefValue> {
        refs.iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    RefValue {
                        value: v.to_string(),
                        proposer: 1,
                    },
                )
            })
            .collect()
    }

    fn cas<'a>(name: &'a str, expected: &'a str, new: &'a str) -> Cas<'a> {
        Cas {
            name,
            expected,
            new,
        }
    }

    #[test]
    fn a_map_view_finds_children_but_not_siblings_or_skipped_ones() {
        let v = view(&[
            ("refs/heads/a", "1"),
            ("refs/heads/a/b", "2"),
            ("refs/heads/ab", "3"),
        ]);
        let none = BTreeSet::new();
        assert_eq!(
            v.child("refs/heads/a/", &none).unwrap().as_deref(),
            Some("refs/heads/a/b")
        );
        let skip: BTreeSet<String> = ["refs/heads/a/b".to_string()].into();
        assert_eq!(v.child("refs/heads/a/", &skip).unwrap(), None);
        assert_eq!(v.child("refs/heads/ab/", &none).unwrap(), None);
    }

    #[test]
    fn deleting_a_directory_ref_makes_room_whatever_the_order() {
        let v = view(&[("refs/heads/a/b", "1")]);
        for updates in [
            vec![cas("refs/heads/a", "", "2"), cas("refs/heads/a/b", "1", "")],
            vec![cas("refs/heads/a/b", "1", ""), cas("refs/heads/a", "", "2")],
        ] {
            let d = decide(&updates, true, &v).unwrap();
            assert!(d.outcomes.iter().all(|o| o.applied), "{d:?}");
            assert_eq!(d.moves.len(), 2);
        }
        let d = decide(&[cas("refs/heads/a", "", "2")], false, &v).unwrap();
        assert_eq!(d.outcomes[0].blocked_by.as_deref(), Some("refs/heads/a/b"));
        assert!(d.moves.is_empty());
    }

    #[test]
    fn an_atomic_push_with_one_loser_moves_nothing_and_reports_present_values() {
        let v = view(&[("refs/heads/x", "1"), ("refs/heads/y", "5")]);
        let d = decide(
            &[cas("refs/heads/x", "1", "2"), cas("refs/heads/y", "4", "6")],
            true,
            &v,
        )
        .unwrap();
        assert!(d.moves.is_empty());
        assert_eq!(d.outcomes[0].current.as_deref(), Some("1"));
        assert!(!d.outcomes[0].applied && !d.outcomes[1].applied);
        let d = decide(
            &[cas("refs/heads/x", "1", "2"), cas("refs/heads/y", "4", "6")],
            false,
            &v,
        )
        .unwrap();
        assert_eq!(d.moves, vec![0]);
    }
}
