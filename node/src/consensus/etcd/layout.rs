//! Where piehole keeps things in etcd, under a prefix P (`--etcd-prefix`,
//! default `/piehole/`). Readable with `etcdctl get --prefix /piehole/`:
//!
//! ```text
//! P groups/<group>/head                 generation name; its mod_revision is the group's version
//! P groups/<group>/gen/<gen>/<ref>      "<object id> <proposing node>", one key per consensus ref
//! P groups/<group>/replicas/<node id>   repository path on that node's host
//! P nodes/<node id>/addr                peer API address
//! P nodes/<node id>/alive               present while the node's lease lives
//! ```
//!
//! A group's refs are the keys of the generation `head` names. A push that
//! fits one transaction (etcd allows 128 operations) changes them in place,
//! on condition that `head` is unchanged since the node decided; a bigger
//! one, and every clobber, writes a whole new generation in chunks nobody
//! reads yet, then flips `head` and deletes the old generation in one
//! transaction. No reader ever sees half an update.

/// What a key under the prefix is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Head {
        group: String,
    },
    Ref {
        group: String,
        gen: String,
        name: String,
    },
    Replica {
        group: String,
        node: u64,
    },
    NodeAddr {
        node: u64,
    },
    NodeAlive {
        node: u64,
    },
}

/// The generation of a group that has never had a head.
pub const FIRST_GEN: &str = "0";

#[derive(Debug, Clone)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    /// `prefix` ends with '/'.
    pub fn new(prefix: &str) -> Layout {
        Layout {
            prefix: prefix.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn head(&self, group: &str) -> String {
        format!("{}groups/{group}/head", self.prefix)
    }

    /// The prefix of every ref key of one generation.
    pub fn gen(&self, group: &str, gen: &str) -> String {
        format!("{}groups/{group}/gen/{gen}/", self.prefix)
    }

    pub fn ref_key(&self, group: &str, gen: &str, name: &str) -> String {
        format!("{}{name}", self.gen(group, gen))
    }

    pub fn replica(&self, group: &str, node: u64) -> String {
        format!("{}groups/{group}/replicas/{node}", self.prefix)
    }

    pub fn node_addr(&self, node: u64) -> String {
        format!("{}nodes/{node}/addr", self.prefix)
    }

    pub fn node_alive(&self, node: u64) -> String {
        format!("{}nodes/{node}/alive", self.prefix)
    }

    /// What `key` is; None for a key piehole does not write (left alone).
    pub fn parse(&self, key: &[u8]) -> Option<Key> {
        let key = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        if let Some(rest) = key.strip_prefix("groups/") {
            let (group, rest) = rest.split_once('/')?;
            let group = group.to_string();
            if rest == "head" {
                return Some(Key::Head { group });
            }
            if let Some(rest) = rest.strip_prefix("gen/") {
                let (gen, name) = rest.split_once('/')?;
                return (!name.is_empty()).then(|| Key::Ref {
                    group,
                    gen: gen.to_string(),
                    name: name.to_string(),
                });
            }
            let node = rest.strip_prefix("replicas/")?.parse().ok()?;
            return Some(Key::Replica { group, node });
        }
        let (node, what) = key.strip_prefix("nodes/")?.split_once('/')?;
        let node = node.parse().ok()?;
        match what {
            "addr" => Some(Key::NodeAddr { node }),
            "alive" => Some(Key::NodeAlive { node }),
            _ => None,
        }
    }
}

/// A ref key's value: the object id and the node whose push set it.
pub fn encode_ref(value: &str, proposer: u64) -> String {
    format!("{value} {proposer}")
}

pub fn decode_ref(bytes: &[u8]) -> Option<(String, u64)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (value, proposer) = text.split_once(' ')?;
    Some((value.to_string(), proposer.parse().ok()?))
}

/// The smallest key after every key starting with `prefix` (etcd's range
/// end for a prefix).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses_back_to_what_made_it() {
        let l = Layout::new("/p/");
        assert_eq!(
            l.parse(l.head("g").as_bytes()),
            Some(Key::Head { group: "g".into() })
        );
        assert_eq!(
            l.parse(l.ref_key("g", "7-1-ab", "refs/heads/a/b").as_bytes()),
            Some(Key::Ref {
                group: "g".into(),
                gen: "7-1-ab".into(),
                name: "refs/heads/a/b".into()
            })
        );
        assert_eq!(
            l.parse(l.replica("g", 3).as_bytes()),
            Some(Key::Replica {
                group: "g".into(),
                node: 3
            })
        );
        assert_eq!(
            l.parse(l.node_addr(2).as_bytes()),
            Some(Key::NodeAddr { node: 2 })
        );
        assert_eq!(
            l.parse(l.node_alive(2).as_bytes()),
            Some(Key::NodeAlive { node: 2 })
        );
        for stranger in [
            "/other/x",
            "/p/groups/g",
            "/p/nodes/x/addr",
            "/p/groups/g/gen/1/",
        ] {
            assert_eq!(l.parse(stranger.as_bytes()), None, "{stranger}");
        }
    }

    #[test]
    fn ref_values_round_trip_and_prefix_ends_bound_the_prefix() {
        assert_eq!(
            decode_ref(encode_ref("abc", 4).as_bytes()),
            Some(("abc".into(), 4))
        );
        assert_eq!(decode_ref(b"garbage"), None);
        assert_eq!(prefix_end("/p/"), b"/p0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
