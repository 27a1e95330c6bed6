//! Fuzz targets, written as property tests (proptest): cargo-fuzz needs a
//! nightly compiler, and these run on stable in the ordinary test suite.
//!
//! Each `#[test]` below is one target, named after what it fuzzes: the
//! validators of names and ids, every protobuf message of
//! `protocol/proto/piehole.proto` and raft's own messages, the replicated
//! commands and the state machine that applies them, state snapshots, the
//! keys and values read back from etcd, and what git hands the hooks
//! (pkt-lines on the proc-receive hook's stdin, the update hook's argv).
//! Besides "never panics", every target checks properties: round trips,
//! agreement with `git check-ref-format`, the state's invariant (every stored
//! name, id and path is one the validators accept), refusals that change
//! nothing.
//!
//! A failing case is shrunk and reported with its minimal input. Nothing is
//! written to the source tree (`failure_persistence: None`).
//!
//! # How many cases
//!
//! `PIEHOLE_FUZZ_CASES` (default 2000) is the number of cases of the
//! cheapest targets (the validators); every other target runs that number
//! divided by what one of its cases costs relative to theirs, so that each
//! gets about the same time, and never fewer cases than in CI (see
//! [`Budget`]: the state machine, which opens two fsynced sled databases per
//! case, costs some 1300 validator cases). The default is CI's short pass,
//! about 15 s in a debug build. A long pass, about 4 minutes in release on
//! 2 cores, with the executions of each target printed at its end:
//!
//! ```text
//! PIEHOLE_FUZZ_CASES=1000000 cargo test --release -p piehole --test fuzz -- --nocapture
//! ```
//!
//! `PROPTEST_RNG_SEED=N` makes a run repeatable.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::io::Write as _;
use std::path::{Component, Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::sync::Arc;

use piehole_node::consensus::etcd::layout::{self, Key, Layout};
use piehole_node::disk::Disk;
use piehole_node::state::{GroupView, Outcome, RefValue, StateMachine};
use piehole_protocol::pb::{self, command::Op};
use piehole_protocol::validate::{self, MAX_COMMAND_REFS, OWN_NAMESPACE, ZERO_ID};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use prost::Message as _;

/// The hook's own pkt-line code (a private module of the `piehole` binary),
/// compiled in here so that the real parser is what gets fuzzed.
#[path = "../client/src/pkt_line.rs"]
mod pkt_line;

// ------------------------------------------------------------------ harness

/// `PIEHOLE_FUZZ_CASES`, or CI's default.
fn scale() -> u64 {
    std::env::var("PIEHOLE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SCALE)
}

const DEFAULT_SCALE: u64 = 2000;

/// How many cases a target runs.
#[derive(Debug, Clone, Copy)]
struct Budget {
    /// Its cases in CI's short pass (the default scale).
    ci: u64,
    /// What one case costs, in cases of the cheapest targets (measured in
    /// release: a validator case is some 30 µs, a state machine case with
    /// its two fsynced sled databases some 40 ms).
    cost: u64,
}

impl Budget {
    const fn new(ci: u64, cost: u64) -> Budget {
        Budget { ci, cost }
    }

    /// Below the default scale, a share of the CI pass; above it, the scale
    /// divided by the cost, so that in a long pass every target gets about
    /// the same time, and never fewer cases than CI gives it.
    fn cases(self) -> u32 {
        let n = scale();
        let cases = (self.ci * n.min(DEFAULT_SCALE) / DEFAULT_SCALE).max(n / self.cost);
        cases.clamp(1, u64::from(u32::MAX)) as u32
    }
}

/// Runs one target: `test` on `budget.cases()` inputs drawn from
/// `strategy`. A failure (a failed property or a panic) is shrunk to a
/// minimal input and reported with it.
fn fuzz<S>(
    name: &str,
    budget: Budget,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let cases = budget.cases();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    });
    let executions = Cell::new(0u64);
    let result = runner.run(&strategy, |input| {
        executions.set(executions.get() + 1);
        test(input)
    });
    eprintln!("{name}: {} executions ({cases} cases)", executions.get());
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

/// Counts what a target's inputs reached, so that a run whose inputs never
/// got to a property fails rather than passing without testing it.
#[derive(Default)]
struct Reached(RefCell<BTreeMap<&'static str, u64>>);

impl Reached {
    fn hit(&self, what: &'static str) {
        *self.0.borrow_mut().entry(what).or_default() += 1;
    }

    /// Fails unless every one of `every` was reached (in a run of at least
    /// CI's size: a smaller one may just have been unlucky).
    fn require(self, target: &str, every: &[&str]) {
        let reached = self.0.into_inner();
        eprintln!("{target}: reached {reached:?}");
        if scale() < DEFAULT_SCALE {
            return;
        }
        for what in every {
            assert!(reached.contains_key(what), "{target} never reached: {what}");
        }
    }
}

fn fail(msg: impl Into<String>) -> TestCaseError {
    TestCaseError::fail(msg.into())
}

// --------------------------------------------------------------- generators

const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const C: &str = "0123456789abcdef0123456789abcdef01234567";

/// Pieces that every check of a name or path must get right, alone or glued.
const PIECES: &[&str] = &[
    "refs/",
    "heads/",
    "tags/",
    "remotes/",
    "piehole/",
    "main",
    "a",
    "b",
    "x",
    "/",
    "//",
    ".",
    "..",
    ".lock",
    "lock",
    "@",
    "@{",
    "{",
    "}",
    "\0",
    "\x01",
    "\t",
    "\n",
    "\r",
    "\x1f",
    "\x7f",
    " ",
    "~",
    "^",
    ":",
    "?",
    "*",
    "[",
    "]",
    "\\",
    "-",
    "é",
    "\u{85}",
    "\u{a0}",
    "\u{202e}",
    "\u{feff}",
    "\u{1F600}",
    "0",
    "f",
    "A",
    "F",
    "0000000000",
    "aaaaaaaaaa",
    "srv",
    ".git",
];

fn nasty() -> BoxedStrategy<String> {
    vec(select(PIECES), 0..12).prop_map(|v| v.concat()).boxed()
}

/// Any string at all: glued pieces, any chars (control characters, lone
/// combining marks, the private use area ...), printable ASCII, and
/// lengths around the validators' limits.
fn any_text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => nasty(),
        2 => vec(any::<char>(), 0..24).prop_map(|v| v.into_iter().collect()),
        1 => "[ -~]{0,40}",
        1 => (select(&["refs/heads/", "/srv/", "g", ""][..]), 250usize..260, select(&[1usize, 4, 16][..]))
            .prop_map(|(head, n, times)| format!("{head}{}", "a".repeat(n * times))),
    ]
    .boxed()
}

fn pick(pool: &'static [&'static str]) -> BoxedStrategy<String> {
    select(pool).prop_map(String::from).boxed()
}

const GOOD_GROUPS: &[&str] = &["g", "h", "proj.v2"];
const BAD_GROUPS: &[&str] = &[
    "", ".", "..", "a/b", "-x", ".git", "a b", "x\0y", "g\0", "\0", "a..b", "a\\b", "g\n", "/etc",
];
const GOOD_REFS: &[&str] = &[
    "refs/heads/main",
    "refs/heads/a",
    "refs/heads/a/b",
    "refs/heads/a/b/c",
    "refs/heads/ab",
    "refs/tags/v1",
    "refs/notes/x",
];
const BAD_REFS: &[&str] = &[
    "",
    "HEAD",
    "main",
    "refs/heads/",
    "refs/heads/a..b",
    "refs/heads/.h",
    "refs/heads/x.lock",
    "refs/heads/a//b",
    "refs/heads/a b",
    "refs/heads/a@{1}",
    "refs/heads/end.",
    "refs/heads/a\0b",
    "refs/heads/a\0",
    "refs/heads/del\x7f",
    "refs/heads/a\n",
    "refs/remotes/o/m",
    "refs/piehole/k",
];
const GOOD_IDS: &[&str] = &[A, B, C, ""];
const BAD_IDS: &[&str] = &[
    ZERO_ID,
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "gggggggggggggggggggggggggggggggggggggggg",
    " aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "xyz",
];
const GOOD_PATHS: &[&str] = &["/srv/g.git", "/srv/h.git", "/", "/a b/c"];
const BAD_PATHS: &[&str] = &[
    "",
    "srv/a",
    "/srv/../etc",
    "/srv/./a",
    "/srv//a",
    "/srv/a/",
    "/srv/a\0b",
    "/srv/a\nb",
    ".",
    "/..",
];

fn group() -> BoxedStrategy<String> {
    prop_oneof![6 => pick(GOOD_GROUPS), 2 => pick(BAD_GROUPS), 1 => any_text()].boxed()
}

fn ref_name() -> BoxedStrategy<String> {
    prop_oneof![6 => pick(GOOD_REFS), 2 => pick(BAD_REFS), 1 => any_text()].boxed()
}

fn object_id() -> BoxedStrategy<String> {
    prop_oneof![6 => pick(GOOD_IDS), 2 => pick(BAD_IDS), 1 => any_text()].boxed()
}

fn repo_path() -> BoxedStrategy<String> {
    prop_oneof![6 => pick(GOOD_PATHS), 2 => pick(BAD_PATHS), 1 => any_text()].boxed()
}

fn node_id() -> BoxedStrategy<u64> {
    prop_oneof![6 => 1u64..4, 1 => Just(0u64), 1 => any::<u64>()].boxed()
}

/// A ref name that git and piehole both accept.
fn valid_ref() -> BoxedStrategy<String> {
    let component = "[a-zA-Z0-9_é+-]{1,5}(\\.[a-zA-Z0-9_é+-]{1,5}){0,2}";
    vec(component, 1..4)
        .prop_filter("a component ends with .lock", |cs| {
            !cs.iter().any(|c| c.ends_with(".lock"))
        })
        .prop_filter("not replicated", |cs| {
            cs[0] != "remotes" && cs[0] != "piehole"
        })
        .prop_map(|cs| format!("refs/{}", cs.join("/")))
        .boxed()
}

fn valid_group() -> BoxedStrategy<String> {
    "[a-zA-Z0-9_é][a-zA-Z0-9_.é-]{0,20}"
        .prop_filter("contains ..", |g| !g.contains(".."))
        .boxed()
}

fn valid_path() -> BoxedStrategy<String> {
    vec("[a-zA-Z0-9_ .é-]{1,10}", 0..5)
        .prop_filter(". or ..", |cs| cs.iter().all(|c| c != "." && c != ".."))
        .prop_map(|cs| format!("/{}", cs.join("/")))
        .boxed()
}

/// Bytes shaped like protobuf: fields of every wire type with field numbers
/// that messages use, nested messages, and garbage.
#[derive(Debug, Clone)]
enum Wire {
    Varint(u32, u64),
    Fixed64(u32, u64),
    Fixed32(u32, u32),
    Len(u32, Vec<u8>),
    Nested(u32, Vec<Wire>),
    Raw(Vec<u8>),
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn encode_wire(fields: &[Wire], out: &mut Vec<u8>) {
    let tag = |out: &mut Vec<u8>, field: u32, wire_type: u64| {
        put_varint(out, (u64::from(field) << 3) | wire_type)
    };
    for f in fields {
        match f {
            Wire::Varint(n, v) => {
                tag(out, *n, 0);
                put_varint(out, *v);
            }
            Wire::Fixed64(n, v) => {
                tag(out, *n, 1);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Wire::Fixed32(n, v) => {
                tag(out, *n, 5);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Wire::Len(n, bytes) => {
                tag(out, *n, 2);
                put_varint(out, bytes.len() as u64);
                out.extend_from_slice(bytes);
            }
            Wire::Nested(n, inner) => {
                let mut body = Vec::new();
                encode_wire(inner, &mut body);
                tag(out, *n, 2);
                put_varint(out, body.len() as u64);
                out.extend_from_slice(&body);
            }
            Wire::Raw(bytes) => out.extend_from_slice(bytes),
        }
    }
}

fn wire_bytes() -> BoxedStrategy<Vec<u8>> {
    let field = prop_oneof![12 => 1u32..20, 1 => Just(0u32), 1 => 0u32..(1 << 29)];
    let varint = prop_oneof![
        4 => 0u64..4,
        2 => any::<u64>(),
        1 => Just(u64::MAX),
        1 => Just(u64::from(u32::MAX)),
    ];
    let payload = prop_oneof![
        4 => prop_oneof![group(), ref_name(), object_id(), repo_path()].prop_map(String::into_bytes),
        1 => vec(any::<u8>(), 0..32),
    ];
    let leaf = prop_oneof![
        3 => (field.clone(), varint).prop_map(|(n, v)| Wire::Varint(n, v)),
        1 => (field.clone(), any::<u64>()).prop_map(|(n, v)| Wire::Fixed64(n, v)),
        1 => (field.clone(), any::<u32>()).prop_map(|(n, v)| Wire::Fixed32(n, v)),
        3 => (field.clone(), payload).prop_map(|(n, v)| Wire::Len(n, v)),
        1 => vec(any::<u8>(), 0..6).prop_map(Wire::Raw),
    ];
    let tree = leaf.prop_recursive(3, 48, 6, move |inner| {
        (field.clone(), vec(inner, 0..6)).prop_map(|(n, v)| Wire::Nested(n, v))
    });
    vec(tree, 0..8)
        .prop_map(|fields| {
            let mut out = Vec::new();
            encode_wire(&fields, &mut out);
            out
        })
        .boxed()
}

/// Any bytes: protobuf-shaped most of the time, or plain random.
fn message_bytes() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![4 => wire_bytes(), 1 => vec(any::<u8>(), 0..64)].boxed()
}

/// The strategies a command's or a snapshot's fields are drawn from.
#[derive(Clone)]
struct Fields {
    group: BoxedStrategy<String>,
    ref_name: BoxedStrategy<String>,
    /// A push's expected and new values ("" is absent).
    id: BoxedStrategy<String>,
    /// A stored ref's value.
    value: BoxedStrategy<String>,
    path: BoxedStrategy<String>,
    node: BoxedStrategy<u64>,
}

impl Fields {
    /// Anything, valid or not.
    fn fuzzed() -> Fields {
        Fields {
            group: group(),
            ref_name: ref_name(),
            id: object_id(),
            value: object_id(),
            path: repo_path(),
            node: node_id(),
        }
    }

    /// Valid names and ids from small pools, so that commands meet on the
    /// same groups and refs (and clash: refs/heads/a against refs/heads/a/b).
    fn pooled() -> Fields {
        Fields {
            group: pick(&["g", "h"]),
            ref_name: pick(GOOD_REFS),
            id: prop_oneof![2 => Just(String::new()), 3 => pick(&[A, B, C])].boxed(),
            value: pick(&[A, B, C]),
            path: pick(GOOD_PATHS),
            node: (1u64..4).boxed(),
        }
    }
}

fn op(f: &Fields) -> BoxedStrategy<Option<Op>> {
    let f = f.clone();
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(Op::Read(pb::ReadOp {}))),
        1 => (f.node.clone(), prop_oneof![Just(0u64), 1u64..3, any::<u64>()])
            .prop_map(|(node_id, nonce)| Some(Op::Claim(pb::ClaimOp { node_id, nonce }))),
        3 => (f.group.clone(), f.node.clone(), f.path.clone()).prop_map(|(group, node_id, path)| {
            Some(Op::Register(pb::RegisterOp { group, node_id, path }))
        }),
        8 => (
            f.group.clone(),
            vec((f.ref_name.clone(), f.id.clone(), f.id.clone()), 0..5),
            any::<bool>(),
            f.node.clone(),
        )
            .prop_map(|(group, updates, atomic, proposer)| {
                Some(Op::Push(pb::PushOp {
                    group,
                    updates: updates
                        .into_iter()
                        .map(|(ref_name, expected, new)| pb::RefCas { ref_name, expected, new })
                        .collect(),
                    atomic,
                    proposer,
                }))
            }),
        2 => (
            f.group.clone(),
            vec((f.ref_name.clone(), f.value.clone(), f.node.clone()), 0..4),
            f.node.clone(),
            0u64..4,
        )
            .prop_map(|(group, refs, proposer, expected_version)| {
                Some(Op::Clobber(pb::ClobberOp {
                    group,
                    refs: refs
                        .into_iter()
                        .map(|(ref_name, value, proposer)| pb::ConsensusRef {
                            ref_name,
                            value,
                            proposer,
                        })
                        .collect(),
                    proposer,
                    expected_version,
                }))
            }),
    ]
    .boxed()
}

fn command_with(f: &Fields) -> BoxedStrategy<pb::Command> {
    (1u64..4, any::<u64>(), op(f), any::<u64>())
        .prop_map(
            |(origin_node, request_id, op, proposed_after)| pb::Command {
                origin_node,
                request_id,
                op,
                proposed_after,
            },
        )
        .boxed()
}

fn command() -> BoxedStrategy<pb::Command> {
    command_with(&Fields::fuzzed())
}

/// A command every rule accepts.
fn valid_command() -> BoxedStrategy<pb::Command> {
    let id = prop_oneof![pick(GOOD_IDS), "[0-9a-f]{40}"].prop_filter("zeros", |i| i != ZERO_ID);
    let value = "[0-9a-f]{40}".prop_filter("zeros", |i| i != ZERO_ID);
    let op = prop_oneof![
        Just(Op::Read(pb::ReadOp {})),
        (1u64.., any::<u64>())
            .prop_map(|(node_id, nonce)| Op::Claim(pb::ClaimOp { node_id, nonce })),
        (valid_group(), 1u64.., valid_path()).prop_map(|(group, node_id, path)| Op::Register(
            pb::RegisterOp {
                group,
                node_id,
                path
            }
        )),
        (
            valid_group(),
            vec((valid_ref(), id.clone(), id), 1..5),
            any::<bool>(),
            any::<u64>()
        )
            .prop_map(|(group, u, atomic, proposer)| Op::Push(pb::PushOp {
                group,
                updates: u
                    .into_iter()
                    .map(|(ref_name, expected, new)| pb::RefCas {
                        ref_name,
                        expected,
                        new
                    })
                    .collect(),
                atomic,
                proposer,
            })),
        (
            valid_group(),
            vec((valid_ref(), value), 0..5),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(group, r, proposer, expected_version)| Op::Clobber(
                pb::ClobberOp {
                    group,
                    refs: r
                        .into_iter()
                        .map(|(ref_name, value)| pb::ConsensusRef {
                            ref_name,
                            value,
                            proposer: 0
                        })
                        .collect(),
                    proposer,
                    expected_version,
                }
            )),
    ];
    (any::<u64>(), any::<u64>(), op, any::<u64>())
        .prop_map(
            |(origin_node, request_id, op, proposed_after)| pb::Command {
                origin_node,
                request_id,
                op: Some(op),
                proposed_after,
            },
        )
        .boxed()
}

fn snapshot() -> BoxedStrategy<pb::StateSnapshot> {
    snapshot_with(&Fields::fuzzed())
}

fn snapshot_with(f: &Fields) -> BoxedStrategy<pb::StateSnapshot> {
    let replica =
        (f.node.clone(), f.path.clone()).prop_map(|(node_id, path)| pb::Replica { node_id, path });
    let cref = (f.ref_name.clone(), f.value.clone(), f.node.clone()).prop_map(
        |(ref_name, value, proposer)| pb::ConsensusRef {
            ref_name,
            value,
            proposer,
        },
    );
    let version = prop_oneof![Just(0u64), 1u64..5, any::<u64>()];
    let group_state = (
        f.group.clone(),
        vec(replica, 0..3),
        vec(cref, 0..5),
        version,
    )
        .prop_map(|(name, replicas, refs, version)| pb::GroupState {
            name,
            replicas,
            refs,
            version,
        });
    let ref_outcome =
        (any::<bool>(), object_id(), ref_name()).prop_map(|(applied, current, blocked_by)| {
            pb::RefOutcome {
                applied,
                current,
                blocked_by,
            }
        });
    let outcome = (
        any::<bool>(),
        vec(ref_outcome, 0..3),
        prop_oneof![Just(String::new()), any_text()],
    )
        .prop_map(|(push, refs, refused)| pb::StoredOutcome {
            push,
            refs,
            refused,
        });
    let applied = (
        1u64..4,
        0u64..8,
        any::<u64>(),
        proptest::option::of(outcome),
    )
        .prop_map(
            |(origin_node, request_id, index, outcome)| pb::AppliedRequest {
                origin_node,
                request_id,
                index,
                outcome,
            },
        );
    let member = (node_id(), any_text(), any::<bool>(), any::<u64>()).prop_map(
        |(id, addr, removed, claim)| pb::ClusterMember {
            id,
            addr,
            removed,
            claim,
        },
    );
    (
        vec(group_state, 0..4),
        vec(applied, 0..4),
        vec(member, 0..3),
    )
        .prop_map(|(groups, applied_requests, members)| pb::StateSnapshot {
            groups,
            applied_requests,
            members,
        })
        .boxed()
}

// ------------------------------------------------- 1. names, ids and paths

fn git_accepts_ref(name: &str) -> bool {
    Process::new("git")
        .args(["check-ref-format", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("git runs")
        .success()
}

#[test]
fn fuzz_ref_name_validator() {
    let input = prop_oneof![3 => any_text(), 1 => pick(BAD_REFS), 2 => valid_ref()];
    fuzz(
        "fuzz_ref_name_validator",
        Budget::new(2000, 1),
        input,
        |name| {
            let ok = validate::ref_name(&name).is_ok();
            if ok {
                prop_assert!(name.starts_with("refs/") && validate::is_replicated(&name));
                prop_assert!(name.len() <= 1024);
                prop_assert!(
                    !name.contains("..") && !name.contains("@{"),
                    "{:?} has .. or @{{",
                    name
                );
                prop_assert!(!name.chars().any(|c| c.is_ascii_control()));
                prop_assert!(!name.contains([' ', '~', '^', ':', '?', '*', '[', '\\']));
                prop_assert!(!name.ends_with('/') && !name.ends_with('.'));
                for component in name.split('/') {
                    prop_assert!(!component.is_empty());
                    prop_assert!(!component.starts_with('.'));
                    prop_assert!(!component.ends_with(".lock"));
                }
            }
            // A name git and piehole agree is fine is accepted.
            let plain = name.len() > 5
                && name.len() <= 1024
                && name.starts_with("refs/")
                && validate::is_replicated(&name)
                && name[5..].split('/').all(|c| {
                    !c.is_empty()
                        && !c.starts_with('.')
                        && !c.ends_with('.')
                        && !c.ends_with(".lock")
                        && !c.contains("..")
                        && c.chars()
                            .all(|ch| ch.is_alphanumeric() || "_-+.".contains(ch))
                });
            if plain {
                prop_assert!(ok, "plain name {:?} refused", name);
            }
            Ok(())
        },
    );
}

/// git itself is the oracle: on a name under `refs/` that piehole
/// replicates, piehole accepts exactly what `git check-ref-format` accepts.
#[test]
fn fuzz_ref_name_against_git() {
    let input = prop_oneof![
        3 => nasty().prop_map(|s| format!("refs/heads/{s}")),
        2 => any_text().prop_map(|s| format!("refs/{s}")),
        1 => pick(BAD_REFS),
        1 => valid_ref(),
    ]
    .prop_filter("argv cannot carry NUL", |s| !s.contains('\0'));
    let reached = Reached::default();
    fuzz(
        "fuzz_ref_name_against_git",
        Budget::new(200, 100),
        input,
        |name| {
            if !validate::is_replicated(&name) || name.len() > 1024 {
                prop_assert!(validate::ref_name(&name).is_err());
                return Ok(());
            }
            let git = git_accepts_ref(&name);
            reached.hit(if git { "git accepts" } else { "git refuses" });
            let ours = validate::ref_name(&name).is_ok();
            prop_assert_eq!(ours, git, "piehole and git disagree on {:?}", name);
            Ok(())
        },
    );
    reached.require("fuzz_ref_name_against_git", &["git accepts", "git refuses"]);
}

#[test]
fn fuzz_object_id_validator() {
    let hex_any_case = (38usize..43)
        .prop_flat_map(|n| vec(select(&b"0123456789abcdefABCDEF"[..]), n))
        .prop_map(|v| String::from_utf8(v).unwrap());
    let input = prop_oneof![
        2 => any_text(),
        2 => hex_any_case,
        1 => pick(GOOD_IDS),
        1 => pick(BAD_IDS),
        1 => "0{38,42}",
    ];
    fuzz(
        "fuzz_object_id_validator",
        Budget::new(2000, 1),
        input,
        |id| {
            let hex40 = |s: &str| s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit());
            let ok = validate::object_id(&id).is_ok();
            let expected =
                id.is_empty() || (hex40(&id) && id == id.to_ascii_lowercase() && id != ZERO_ID);
            prop_assert_eq!(ok, expected, "object_id({:?})", id);
            match validate::git_object_id(&id) {
                Ok(ours) => {
                    prop_assert!(hex40(&id), "git_object_id accepted {:?}", id);
                    prop_assert!(
                        validate::object_id(&ours).is_ok(),
                        "git_object_id({:?}) = {:?}, which object_id refuses",
                        id,
                        ours
                    );
                    if id == ZERO_ID {
                        prop_assert_eq!(ours, "");
                    } else {
                        prop_assert_eq!(ours, id.to_ascii_lowercase());
                    }
                }
                Err(_) => prop_assert!(!hex40(&id), "git_object_id refused {:?}", id),
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_group_name_validator() {
    let input = prop_oneof![3 => any_text(), 1 => pick(BAD_GROUPS), 2 => valid_group()];
    fuzz(
        "fuzz_group_name_validator",
        Budget::new(2000, 1),
        input,
        |name| {
            let ok = validate::group_name(&name).is_ok();
            if ok {
                prop_assert!(!name.is_empty() && name.len() <= 255);
                prop_assert!(!name.contains('/') && !name.contains('\\'));
                prop_assert!(name != "." && name != ".." && !name.contains(".."));
                prop_assert!(!name.starts_with('.') && !name.starts_with('-'));
                prop_assert!(!name.chars().any(|c| c.is_control() || c.is_whitespace()));
                // It cannot name anything but one entry of a directory.
                let parts: Vec<_> = Path::new(&name).components().collect();
                prop_assert_eq!(parts, vec![Component::Normal(name.as_ref())]);
            }
            let plain = !name.is_empty()
                && name.len() <= 255
                && !name.contains("..")
                && !name.starts_with(['.', '-'])
                && name
                    .chars()
                    .all(|c| c.is_alphanumeric() || "_.-".contains(c));
            if plain {
                prop_assert!(ok, "plain group name {:?} refused", name);
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_repo_path_validator() {
    let input = prop_oneof![
        3 => any_text(),
        2 => any_text().prop_map(|s| format!("/{s}")),
        1 => pick(BAD_PATHS),
        2 => valid_path(),
    ];
    fuzz(
        "fuzz_repo_path_validator",
        Budget::new(2000, 1),
        input,
        |path| {
            let ok = validate::repo_path(&path).is_ok();
            if ok {
                prop_assert!(path.starts_with('/') && path.len() <= 4096);
                prop_assert!(!path.chars().any(|c| c.is_control()));
                let mut parts = Path::new(&path).components();
                prop_assert_eq!(parts.next(), Some(Component::RootDir));
                for c in parts {
                    prop_assert!(
                        matches!(c, Component::Normal(_)),
                        "{:?} has a {:?} component",
                        path,
                        c
                    );
                }
                // Already normalised: rebuilding it from its components gives it back.
                let rebuilt: PathBuf = Path::new(&path).components().collect();
                prop_assert_eq!(rebuilt.to_str(), Some(path.as_str()));
            }
            let plain = path.starts_with('/')
                && path.len() <= 4096
                && (path == "/"
                    || path[1..].split('/').all(|c| {
                        !c.is_empty()
                            && c != "."
                            && c != ".."
                            && c.chars()
                                .all(|ch| ch.is_alphanumeric() || " _.-".contains(ch))
                    }));
            if plain {
                prop_assert!(ok, "plain path {:?} refused", path);
            }
            Ok(())
        },
    );
}

// ------------------------------------------------------ 2. every message

/// Calls `$then!` with every message of `protocol/proto/piehole.proto`.
macro_rules! pb_messages {
    ($then:ident) => {
        $then!(
            MemberChangeRequest,
            MemberChangeReply,
            ExportRequest,
            ConsensusExport,
            ImportReply,
            StatusRequest,
            Member,
            ReplicaLag,
            StatusReply,
            CasRequest,
            CasReply,
            ReadRefsRequest,
            ConsensusRef,
            ReadRefsReply,
            Replica,
            RegisterRequest,
            RegisterReply,
            ClobberRequest,
            ClobberReply,
            RefUpdate,
            HookPushRequest,
            RefVerdict,
            HookPushReply,
            HookPostUpdateRequest,
            HookPostUpdateReply,
            ClusterInfoRequest,
            ClusterInfoReply,
            Founder,
            ClusterMember,
            RaftBatch,
            RaftAck,
            FetchPackRequest,
            PackChunk,
            StoreObjectsRequest,
            StoreObjectsReply,
            PeerStatusRequest,
            PeerStatusReply,
            MemberProgress,
            Command,
            RegisterOp,
            PushOp,
            RefCas,
            ClobberOp,
            ClaimOp,
            ReadOp,
            StateSnapshot,
            MemberChange,
            AppliedRequest,
            StoredOutcome,
            RefOutcome,
            GroupState,
        )
    };
}

macro_rules! names {
    ($($t:ident),* $(,)?) => {
        &[$(stringify!($t)),*]
    };
}

const PB_MESSAGES: &[&str] = pb_messages!(names);

/// The list above is the proto's: a message added there and not here fails.
#[test]
fn every_proto_message_is_fuzzed() {
    let proto = include_str!("../protocol/proto/piehole.proto");
    let declared: BTreeSet<&str> = proto
        .lines()
        .filter_map(|l| l.trim().strip_prefix("message "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let fuzzed: BTreeSet<&str> = PB_MESSAGES.iter().copied().collect();
    assert_eq!(declared, fuzzed);
    assert_eq!(fuzzed.len(), PB_MESSAGES.len(), "a message is listed twice");
}

/// Decodes `bytes` as `M`; what decodes must encode to bytes that decode to
/// the same message and encode the same again. Returns whether it decoded.
fn prost_round_trip<M>(bytes: &[u8]) -> Result<bool, TestCaseError>
where
    M: prost::Message + Default + PartialEq + Debug,
{
    let Ok(m) = M::decode(bytes) else {
        return Ok(false);
    };
    let encoded = m.encode_to_vec();
    prop_assert_eq!(encoded.len(), m.encoded_len());
    let again = M::decode(&encoded[..]).map_err(|e| {
        fail(format!(
            "{}: its own encoding does not decode: {e}",
            std::any::type_name::<M>()
        ))
    })?;
    prop_assert_eq!(&again, &m);
    prop_assert_eq!(again.encode_to_vec(), encoded);
    Ok(true)
}

macro_rules! decode_every_message {
    ($($t:ident),* $(,)?) => {
        |bytes: &[u8]| -> Result<Vec<bool>, TestCaseError> {
            Ok(vec![$(prost_round_trip::<pb::$t>(bytes)?),*])
        }
    };
}

#[test]
fn fuzz_protobuf_messages() {
    let decode_all = pb_messages!(decode_every_message);
    let decoded = RefCell::new(vec![0u64; PB_MESSAGES.len()]);
    let input = prop_oneof![
        4 => message_bytes(),
        1 => command().prop_map(|c| c.encode_to_vec()),
        1 => snapshot().prop_map(|s| s.encode_to_vec()),
    ];
    fuzz(
        "fuzz_protobuf_messages",
        Budget::new(2000, 5),
        input,
        |bytes| {
            for (count, ok) in decoded.borrow_mut().iter_mut().zip(decode_all(&bytes)?) {
                *count += u64::from(ok);
            }
            // What the node does next with the two it takes from the log.
            if let Ok(cmd) = pb::Command::decode(&bytes[..]) {
                let _ = validate::command(&cmd);
            }
            if let Ok(snap) = pb::StateSnapshot::decode(&bytes[..]) {
                let _ = validate::snapshot(&snap);
            }
            Ok(())
        },
    );
    // Every message got inputs it could decode, so its fields were reached.
    for (name, count) in PB_MESSAGES.iter().zip(decoded.into_inner()) {
        assert!(count > 0, "{name} never decoded");
    }
}

/// Decodes `bytes` as raft's `M` (rust-protobuf 2); what decodes must
/// encode to bytes that decode to the same fields.
///
/// Not `again == m`: rust-protobuf keeps an emptied map of unknown fields
/// when a singular message field comes twice (the second replaces the
/// first), and `Some({})` is not equal to `None` although both encode to
/// nothing. So: the same known fields (its Debug is the text format), the
/// same encoded size, and one round trip later a fixed point.
fn raft_round_trip<M: protobuf::Message + PartialEq>(
    bytes: &[u8],
) -> Result<Option<M>, TestCaseError> {
    let name = std::any::type_name::<M>();
    let Ok(m) = M::parse_from_bytes(bytes) else {
        return Ok(None);
    };
    let encode = |m: &M| {
        m.write_to_bytes()
            .map_err(|e| fail(format!("{name}: cannot encode: {e}")))
    };
    let decode = |b: &[u8]| {
        M::parse_from_bytes(b)
            .map_err(|e| fail(format!("{name}: its own encoding does not decode: {e}")))
    };
    let encoded = encode(&m)?;
    let again = decode(&encoded)?;
    prop_assert_eq!(format!("{again:?}"), format!("{m:?}"), "{}", name);
    let encoded_again = encode(&again)?;
    prop_assert_eq!(encoded_again.len(), encoded.len(), "{}", name);
    prop_assert_eq!(&decode(&encoded_again)?, &again, "{}", name);
    Ok(Some(m))
}

/// raft's own messages, as a peer sends them in a `RaftBatch` (Message) and
/// as the node reads its log and snapshots back from disk.
#[test]
fn fuzz_raft_messages() {
    use raft::prelude::{
        ConfChange, ConfChangeSingle, ConfChangeV2, ConfState, Entry, HardState, Message,
        MessageType, Snapshot, SnapshotMetadata,
    };
    let decoded = Cell::new(0u64);
    fuzz(
        "fuzz_raft_messages",
        Budget::new(2000, 5),
        message_bytes(),
        |bytes| {
            if let Some(m) = raft_round_trip::<Message>(&bytes)? {
                decoded.set(decoded.get() + 1);
                // The peer API's gate on snapshots.
                if m.get_msg_type() == MessageType::MsgSnapshot {
                    prost_round_trip::<pb::StateSnapshot>(&m.get_snapshot().data)?;
                }
                for e in m.get_entries() {
                    prost_round_trip::<pb::Command>(&e.data)?;
                    prost_round_trip::<pb::MemberChange>(&e.context)?;
                }
            }
            if let Some(e) = raft_round_trip::<Entry>(&bytes)? {
                prost_round_trip::<pb::Command>(&e.data)?;
                prost_round_trip::<pb::MemberChange>(&e.context)?;
                raft_round_trip::<ConfChange>(&e.data)?;
                raft_round_trip::<ConfChangeV2>(&e.data)?;
            }
            raft_round_trip::<Snapshot>(&bytes)?;
            raft_round_trip::<SnapshotMetadata>(&bytes)?;
            raft_round_trip::<HardState>(&bytes)?;
            raft_round_trip::<ConfState>(&bytes)?;
            raft_round_trip::<ConfChange>(&bytes)?;
            raft_round_trip::<ConfChangeV2>(&bytes)?;
            raft_round_trip::<ConfChangeSingle>(&bytes)?;
            Ok(())
        },
    );
    assert!(decoded.get() > 0, "no raft message ever decoded");
}

// ------------------------------------------- 3. commands and snapshots

/// What `validate::command` must demand, rule by rule (SPEC: everything in
/// the log is checked as if it had just arrived).
fn command_fields_valid(cmd: &pb::Command) -> bool {
    let id = |s: &str| validate::object_id(s).is_ok();
    let rn = |s: &str| validate::ref_name(s).is_ok();
    match &cmd.op {
        None => false,
        Some(Op::Read(_)) => true,
        Some(Op::Claim(c)) => c.node_id != 0,
        Some(Op::Register(r)) => {
            validate::group_name(&r.group).is_ok()
                && r.node_id != 0
                && validate::repo_path(&r.path).is_ok()
        }
        Some(Op::Push(p)) => {
            validate::group_name(&p.group).is_ok()
                && (1..=MAX_COMMAND_REFS).contains(&p.updates.len())
                && p.updates
                    .iter()
                    .all(|u| rn(&u.ref_name) && id(&u.expected) && id(&u.new))
        }
        Some(Op::Clobber(c)) => {
            validate::group_name(&c.group).is_ok()
                && c.refs.len() <= MAX_COMMAND_REFS
                && c.refs
                    .iter()
                    .all(|r| rn(&r.ref_name) && !r.value.is_empty() && id(&r.value))
        }
    }
}

fn snapshot_fields_valid(s: &pb::StateSnapshot) -> bool {
    s.groups.iter().all(|g| {
        validate::group_name(&g.name).is_ok()
            && g.refs.iter().all(|r| {
                validate::ref_name(&r.ref_name).is_ok()
                    && !r.value.is_empty()
                    && validate::object_id(&r.value).is_ok()
            })
            && g.replicas
                .iter()
                .all(|r| r.node_id != 0 && validate::repo_path(&r.path).is_ok())
    })
}

#[test]
fn fuzz_command_validator() {
    // Now and then a push or clobber past the size limit.
    let oversize = command().prop_map(|mut c| {
        match &mut c.op {
            Some(Op::Push(p)) if !p.updates.is_empty() => {
                p.updates = vec![p.updates[0].clone(); MAX_COMMAND_REFS + 1]
            }
            Some(Op::Clobber(k)) if !k.refs.is_empty() => {
                k.refs = vec![k.refs[0].clone(); MAX_COMMAND_REFS + 1]
            }
            _ => {}
        }
        c
    });
    let input = prop_oneof![
        400 => command().prop_map(|c| (c, false)),
        100 => valid_command().prop_map(|c| (c, true)),
        1 => oversize.prop_map(|c| (c, false)),
    ];
    fuzz(
        "fuzz_command_validator",
        Budget::new(2000, 7),
        input,
        |(cmd, valid)| {
            let verdict = validate::command(&cmd);
            if verdict.is_ok() {
                prop_assert!(command_fields_valid(&cmd), "accepted {:?}", cmd);
            }
            if valid {
                prop_assert!(verdict.is_ok(), "refused {:?}: {:?}", cmd, verdict);
            }
            // The log carries it encoded: it arrives as it left.
            let decoded =
                pb::Command::decode(&cmd.encode_to_vec()[..]).map_err(|e| fail(e.to_string()))?;
            prop_assert_eq!(&decoded, &cmd);
            prop_assert_eq!(validate::command(&decoded), verdict);
            Ok(())
        },
    );
}

#[test]
fn fuzz_snapshot_validator() {
    fuzz(
        "fuzz_snapshot_validator",
        Budget::new(2000, 1),
        snapshot(),
        |snap| {
            let verdict = validate::snapshot(&snap);
            if verdict.is_ok() {
                prop_assert!(snapshot_fields_valid(&snap), "accepted {:?}", snap);
            }
            let decoded = pb::StateSnapshot::decode(&snap.encode_to_vec()[..])
                .map_err(|e| fail(e.to_string()))?;
            prop_assert_eq!(&decoded, &snap);
            prop_assert_eq!(validate::snapshot(&decoded), verdict);
            Ok(())
        },
    );
}

// ---------------------------------------------- 4. the state machine

fn open_state() -> Result<(tempfile::TempDir, StateMachine), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| fail(e.to_string()))?;
    let disk = Disk::open(&dir.path().join("db")).map_err(|e| fail(format!("{e:#}")))?;
    let sm = StateMachine::open(Arc::new(disk)).map_err(|e| fail(format!("{e:#}")))?;
    Ok((dir, sm))
}

/// What the state holds, without its memory of applied requests.
fn state_of(sm: &StateMachine) -> Result<pb::StateSnapshot, TestCaseError> {
    let (_, data) = sm
        .snapshot()
        .map_err(|e| fail(format!("the state cannot be snapshotted: {e:#}")))?;
    let mut snap = pb::StateSnapshot::decode(&data[..])
        .map_err(|e| fail(format!("the state's snapshot does not decode: {e}")))?;
    snap.applied_requests.clear();
    Ok(snap)
}

/// The state's invariant: every name, id and path in it is one the
/// validators accept, whatever the log held.
fn check_invariant(sm: &StateMachine) -> Result<(), TestCaseError> {
    let groups = sm.groups();
    let mut refs = 0u64;
    for g in &groups {
        prop_assert!(
            validate::group_name(g).is_ok(),
            "group {:?} in the state",
            g
        );
        let view = sm
            .group(g)
            .map_err(|e| fail(format!("group {g:?} cannot be read: {e:#}")))?;
        for (name, v) in &view.refs {
            prop_assert!(
                validate::ref_name(name).is_ok(),
                "ref {:?} in group {:?}",
                name,
                g
            );
            prop_assert!(
                !v.value.is_empty(),
                "{} of {:?} has an empty value",
                name,
                g
            );
            prop_assert!(
                validate::object_id(&v.value).is_ok(),
                "{} of {:?} is {:?}",
                name,
                g,
                v.value
            );
        }
        for (node, path) in &view.replicas {
            prop_assert!(*node != 0, "a replica of {:?} on node 0", g);
            prop_assert!(
                validate::repo_path(path).is_ok(),
                "replica path {:?} of {:?}",
                path,
                g
            );
        }
        refs += view.refs.len() as u64;
    }
    prop_assert_eq!(
        sm.counts(),
        (groups.len() as u64, refs),
        "counts disagree with the groups"
    );
    Ok(())
}

#[derive(Debug, Clone)]
enum Step {
    /// A command proposed now; `late`: proposed long before this index.
    Apply {
        cmd: pb::Command,
        late: bool,
    },
    /// A second copy of an earlier command (a proposal offered twice).
    Replay(usize),
    Member(pb::MemberChange),
    Skip,
}

fn step() -> BoxedStrategy<Step> {
    let change = (
        prop_oneof![0i32..4, any::<i32>()],
        node_id(),
        prop_oneof![Just("127.0.0.1:7420".to_string()), any_text()],
    )
        .prop_map(|(kind, node_id, addr)| pb::MemberChange {
            origin_node: 1,
            request_id: 0,
            kind,
            node_id,
            addr,
        });
    prop_oneof![
        9 => (command_with(&Fields::pooled()), proptest::bool::weighted(0.1))
            .prop_map(|(cmd, late)| Step::Apply { cmd, late }),
        3 => (command(), proptest::bool::weighted(0.1)).prop_map(|(cmd, late)| Step::Apply { cmd, late }),
        2 => any::<usize>().prop_map(Step::Replay),
        2 => change.prop_map(Step::Member),
        1 => Just(Step::Skip),
    ]
    .boxed()
}

/// Two sled databases per case (the second restores the first's snapshot):
/// one case costs about eight of a cheap target.
#[test]
fn fuzz_state_machine_apply() {
    let first_index = prop_oneof![
        Just(0u64),
        Just(3 * piehole_node::state::DEDUP_WINDOW),
        Just(u64::MAX - 1000)
    ];
    let input = (first_index, vec(step(), 1..24));
    let reached = Reached::default();
    fuzz(
        "fuzz_state_machine_apply",
        Budget::new(250, 1300),
        input,
        |(base, steps)| {
            let (_dir, sm) = open_state()?;
            let mut applied: Vec<(pb::Command, Outcome)> = Vec::new();
            let mut index = base;
            for step in steps {
                index += 1;
                let before = state_of(&sm)?;
                match step {
                    Step::Apply { mut cmd, late } => {
                        cmd.request_id = index;
                        cmd.proposed_after = if late { 0 } else { index - 1 };
                        let out = sm
                            .apply(index, &cmd)
                            .map_err(|e| fail(format!("apply failed: {e:#}")))?;
                        if validate::command(&cmd).is_err() {
                            prop_assert!(
                                matches!(out, Outcome::Refused(_)),
                                "an invalid command was not refused: {:?}",
                                out
                            );
                            reached.hit("invalid command refused");
                        }
                        match &out {
                            Outcome::Refused(_) => {
                                prop_assert_eq!(
                                    &state_of(&sm)?,
                                    &before,
                                    "a refusal changed the state"
                                )
                            }
                            Outcome::Push(refs) => {
                                if refs.iter().any(|r| r.blocked_by.is_some()) {
                                    reached.hit("ref blocked by another");
                                }
                                if state_of(&sm)? != before {
                                    reached.hit("push moved refs");
                                }
                                let Some(Op::Push(p)) = &cmd.op else {
                                    return Err(fail("a push outcome for another command"));
                                };
                                prop_assert_eq!(refs.len(), p.updates.len());
                                let names: BTreeSet<_> =
                                    p.updates.iter().map(|u| &u.ref_name).collect();
                                if names.len() == p.updates.len() {
                                    for (u, r) in p.updates.iter().zip(refs) {
                                        prop_assert_eq!(
                                            sm.ref_value(&p.group, &u.ref_name),
                                            r.current.clone(),
                                            "the outcome of {} is not its value",
                                            &u.ref_name
                                        );
                                    }
                                }
                            }
                            Outcome::Done => {
                                if let Some(Op::Clobber(_)) = cmd.op {
                                    reached.hit("clobber applied");
                                }
                            }
                        }
                        applied.push((cmd, out));
                    }
                    Step::Replay(k) => {
                        if applied.is_empty() {
                            sm.skip(index).map_err(|e| fail(format!("{e:#}")))?;
                        } else {
                            let (cmd, first) = applied[k % applied.len()].clone();
                            let out = sm
                                .apply(index, &cmd)
                                .map_err(|e| fail(format!("apply of a copy failed: {e:#}")))?;
                            prop_assert_eq!(
                                out,
                                first,
                                "a copy was not answered as the first time"
                            );
                            prop_assert_eq!(&state_of(&sm)?, &before, "a copy changed the state");
                            reached.hit("copy answered");
                        }
                    }
                    Step::Member(change) => sm
                        .apply_member_change(index, &change)
                        .map_err(|e| fail(format!("member change failed: {e:#}")))?,
                    Step::Skip => sm.skip(index).map_err(|e| fail(format!("{e:#}")))?,
                }
                prop_assert_eq!(sm.applied(), index);
            }
            check_invariant(&sm)?;
            if sm.counts().1 > 0 && !sm.members().unwrap_or_default().is_empty() {
                reached.hit("state with refs and members");
            }

            // The state travels as a snapshot: valid, and restored as it was.
            let (at, data) = sm.snapshot().map_err(|e| fail(format!("{e:#}")))?;
            prop_assert_eq!(at, index);
            let snap = pb::StateSnapshot::decode(&data[..]).map_err(|e| fail(e.to_string()))?;
            prop_assert_eq!(validate::snapshot(&snap), Ok(()));
            let (_dir2, other) = open_state()?;
            other
                .restore(at, &data, b"fuzz")
                .map_err(|e| fail(format!("restoring the state's own snapshot failed: {e:#}")))?;
            prop_assert_eq!(other.applied(), at);
            prop_assert_eq!(state_of(&other)?, state_of(&sm)?);
            for (cmd, out) in applied
                .iter()
                .filter(|(c, _)| !matches!(c.op, Some(Op::Read(_)) | None))
            {
                prop_assert_eq!(
                    other.seen(cmd.origin_node, cmd.request_id),
                    sm.seen(cmd.origin_node, cmd.request_id),
                    "the memory of {:?} ({:?}) did not survive the snapshot",
                    cmd,
                    out
                );
            }
            Ok(())
        },
    );
    reached.require(
        "fuzz_state_machine_apply",
        &[
            "invalid command refused",
            "push moved refs",
            "ref blocked by another",
            "clobber applied",
            "copy answered",
            "state with refs and members",
        ],
    );
}

// ------------------------------------------------------- 5. snapshots

/// The state a valid snapshot must give: later entries win, as in a batch.
fn expected_groups(snap: &pb::StateSnapshot) -> BTreeMap<String, GroupView> {
    let mut out: BTreeMap<String, GroupView> = BTreeMap::new();
    for g in &snap.groups {
        let view = out.entry(g.name.clone()).or_default();
        if g.version != 0 {
            view.version = g.version;
        }
        for r in &g.replicas {
            view.replicas.insert(r.node_id, r.path.clone());
        }
        for r in &g.refs {
            view.refs.insert(
                r.ref_name.clone(),
                RefValue {
                    value: r.value.clone(),
                    proposer: r.proposer,
                },
            );
        }
    }
    out
}

#[test]
fn fuzz_snapshot_restore() {
    let data = prop_oneof![
        2 => snapshot_with(&Fields::pooled()).prop_map(|s| s.encode_to_vec()),
        2 => snapshot().prop_map(|s| s.encode_to_vec()),
        1 => message_bytes(),
    ];
    let index = prop_oneof![1u64..100, any::<u64>()];
    let input = (data, index, vec(any::<u8>(), 0..16));
    let reached = Reached::default();
    fuzz(
        "fuzz_snapshot_restore",
        Budget::new(250, 700),
        input,
        |(data, index, origin)| {
            let (_dir, sm) = open_state()?;
            let first = pb::Command {
                origin_node: 1,
                request_id: 1,
                op: Some(Op::Push(pb::PushOp {
                    group: "g".into(),
                    updates: vec![pb::RefCas {
                        ref_name: "refs/heads/main".into(),
                        expected: String::new(),
                        new: A.into(),
                    }],
                    atomic: false,
                    proposer: 1,
                })),
                proposed_after: 0,
            };
            sm.apply(1, &first).map_err(|e| fail(format!("{e:#}")))?;
            let before = state_of(&sm)?;

            let result = sm.restore(index, &data, &origin);
            let decoded = pb::StateSnapshot::decode(&data[..]);
            reached.hit(match (&decoded, &result) {
                (Err(_), _) => "undecodable",
                (Ok(s), Err(_)) if validate::snapshot(s).is_err() => "invalid refused",
                (Ok(s), Ok(())) if !s.groups.is_empty() => "restored with groups",
                _ => "other",
            });
            match &result {
                Err(_) => {
                    // Refused whole: nothing of it was applied.
                    prop_assert_eq!(
                        &state_of(&sm)?,
                        &before,
                        "a refused snapshot changed the state"
                    );
                    prop_assert_eq!(sm.applied(), 1);
                }
                Ok(()) => {
                    prop_assert!(decoded.is_ok(), "an undecodable snapshot was restored");
                    check_invariant(&sm)?;
                    prop_assert_eq!(sm.applied(), index);
                    let restored_from = sm.restored_from().map_err(|e| fail(format!("{e:#}")))?;
                    prop_assert_eq!(restored_from, Some(origin.clone()));
                }
            }
            if let Ok(snap) = decoded {
                if validate::snapshot(&snap).is_ok() {
                    prop_assert!(result.is_ok(), "a valid snapshot was refused: {:?}", result);
                    let expected = expected_groups(&snap);
                    let groups: BTreeSet<String> = sm.groups().into_iter().collect();
                    prop_assert_eq!(&groups, &expected.keys().cloned().collect::<BTreeSet<_>>());
                    for (name, view) in &expected {
                        let got = sm.group(name).map_err(|e| fail(format!("{e:#}")))?;
                        prop_assert_eq!(&got, view, "group {}", name);
                    }
                    let members: BTreeMap<u64, pb::ClusterMember> =
                        snap.members.iter().map(|m| (m.id, m.clone())).collect();
                    prop_assert_eq!(sm.members().map_err(|e| fail(format!("{e:#}")))?, members);
                    for r in &snap.applied_requests {
                        prop_assert!(
                            sm.seen(r.origin_node, r.request_id).is_some(),
                            "request {:?} forgotten",
                            r
                        );
                    }
                }
            }
            Ok(())
        },
    );
    reached.require(
        "fuzz_snapshot_restore",
        &["undecodable", "invalid refused", "restored with groups"],
    );
}

// ------------------------------------------- etcd keys and values

/// What the etcd backend reads back from etcd (its watch and its loads):
/// keys and ref values, possibly written by anyone with access to etcd.
#[test]
fn fuzz_etcd_keys_and_values() {
    let prefix = prop_oneof![pick(&["/piehole/", "/p/", "", "/"]), any_text()];
    let segment = prop_oneof![
        group(),
        Just("head".to_string()),
        Just("gen".to_string()),
        any_text()
    ];
    let key = prop_oneof![
        2 => vec(prop_oneof![
            segment.clone(),
            pick(&["groups", "nodes", "replicas", "addr", "alive", "gen", "head", "7", "007", "+7", "-1", "18446744073709551616"]),
        ], 0..6)
            .prop_map(|parts| parts.join("/").into_bytes()),
        1 => vec(any::<u8>(), 0..32),
    ];
    let value = prop_oneof![
        (object_id(), any::<u64>()).prop_map(|(v, p)| layout::encode_ref(&v, p).into_bytes()),
        any_text().prop_map(String::into_bytes),
        vec(any::<u8>(), 0..24),
    ];
    let input = (
        prefix,
        key,
        value,
        segment.clone(),
        segment.clone(),
        ref_name(),
        any::<u64>(),
    );
    fuzz(
        "fuzz_etcd_keys_and_values",
        Budget::new(2000, 1),
        input,
        |(prefix, raw, value, group, gen, name, node)| {
            let l = Layout::new(&prefix);
            // Any key under the prefix: what parses renders back to itself.
            let mut full = prefix.clone().into_bytes();
            full.extend_from_slice(&raw);
            for k in [&raw, &full] {
                if let Some(parsed) = l.parse(k) {
                    let rendered = match &parsed {
                        Key::Head { group } => l.head(group),
                        Key::Ref { group, gen, name } => l.ref_key(group, gen, name),
                        Key::Replica { group, node } => l.replica(group, *node),
                        Key::NodeAddr { node } => l.node_addr(*node),
                        Key::NodeAlive { node } => l.node_alive(*node),
                    };
                    prop_assert_eq!(l.parse(rendered.as_bytes()), Some(parsed));
                }
            }
            // Every key piehole writes parses back to what made it.
            if !group.contains('/') {
                prop_assert_eq!(
                    l.parse(l.head(&group).as_bytes()),
                    Some(Key::Head {
                        group: group.clone()
                    })
                );
                prop_assert_eq!(
                    l.parse(l.replica(&group, node).as_bytes()),
                    Some(Key::Replica {
                        group: group.clone(),
                        node
                    })
                );
                if !gen.contains('/') && !name.is_empty() {
                    prop_assert_eq!(
                        l.parse(l.ref_key(&group, &gen, &name).as_bytes()),
                        Some(Key::Ref {
                            group: group.clone(),
                            gen: gen.clone(),
                            name: name.clone()
                        })
                    );
                }
            }
            prop_assert_eq!(
                l.parse(l.node_addr(node).as_bytes()),
                Some(Key::NodeAddr { node })
            );
            prop_assert_eq!(
                l.parse(l.node_alive(node).as_bytes()),
                Some(Key::NodeAlive { node })
            );
            // Values.
            if let Some((v, p)) = layout::decode_ref(&value) {
                prop_assert_eq!(
                    layout::decode_ref(layout::encode_ref(&v, p).as_bytes()),
                    Some((v, p))
                );
            }
            if !gen.contains(' ') {
                prop_assert_eq!(
                    layout::decode_ref(layout::encode_ref(&gen, node).as_bytes()),
                    Some((gen.clone(), node))
                );
            }
            // A prefix's range end bounds every key under the prefix.
            if !prefix.is_empty() {
                let end = layout::prefix_end(&prefix);
                prop_assert!(
                    full < end,
                    "{:?} is not below the end {:?} of {:?}",
                    full,
                    end,
                    prefix
                );
                prop_assert!(prefix.as_bytes() < &end[..]);
            }
            Ok(())
        },
    );
}

// --------------------------------------------- 6. what git hands the hooks

#[derive(Debug, Clone)]
enum Frame {
    Data(Vec<u8>),
    Flush,
    /// Anything at all where a packet should start.
    Garbage(Vec<u8>),
}

fn frame() -> BoxedStrategy<Frame> {
    let payload = prop_oneof![
        8 => vec(any::<u8>(), 0..40),
        4 => any_text().prop_map(String::into_bytes),
        1 => vec(any::<u8>(), pkt_line::MAX_PAYLOAD - 2..pkt_line::MAX_PAYLOAD + 3),
    ];
    prop_oneof![
        8 => payload.prop_map(Frame::Data),
        3 => Just(Frame::Flush),
        1 => prop_oneof![
            pick(&["0001", "0002", "0003", "zzzz", "ffff", "fff1", "00", "0", "+004", " 004", "-004", "0x04"])
                .prop_map(String::into_bytes),
            vec(any::<u8>(), 0..8),
        ]
        .prop_map(Frame::Garbage),
    ]
    .boxed()
}

fn pkt(out: &mut Vec<u8>, payload: &[u8]) {
    pkt_line::write(out, payload).expect("writing to a Vec");
}

/// What git's reader makes of a payload we wrote: one trailing LF dropped.
fn as_read(payload: &[u8]) -> Vec<u8> {
    let p = &payload[..payload.len().min(pkt_line::MAX_PAYLOAD)];
    p.strip_suffix(b"\n").unwrap_or(p).to_vec()
}

#[test]
fn fuzz_pkt_line_reader() {
    fuzz(
        "fuzz_pkt_line_reader",
        Budget::new(1000, 12),
        vec(frame(), 0..8),
        |frames| {
            let mut input = Vec::new();
            for f in &frames {
                match f {
                    Frame::Data(p) => pkt(&mut input, p),
                    Frame::Flush => pkt_line::flush(&mut input).expect("writing to a Vec"),
                    Frame::Garbage(g) => input.extend_from_slice(g),
                }
            }
            // Packet by packet: each consumes exactly its length.
            let mut r = &input[..];
            loop {
                let left = r.len();
                match pkt_line::read(&mut r) {
                    Ok(Some(p)) => {
                        let len = usize::from_str_radix(
                            std::str::from_utf8(&input[input.len() - left..][..4]).unwrap(),
                            16,
                        )
                        .unwrap();
                        prop_assert_eq!(left - r.len(), len);
                        prop_assert!(p.len() == len - 4 || p.len() == len - 5);
                        prop_assert!(p.len() <= pkt_line::MAX_PAYLOAD);
                    }
                    Ok(None) => prop_assert_eq!(left - r.len(), 4),
                    Err(_) => break,
                }
            }
            // Section by section, against what was written.
            let mut expected: Vec<Vec<Vec<u8>>> = vec![vec![]];
            let mut garbled = false;
            for f in &frames {
                match f {
                    Frame::Data(p) => expected.last_mut().unwrap().push(as_read(p)),
                    Frame::Flush => expected.push(vec![]),
                    Frame::Garbage(_) => {
                        garbled = true;
                        break;
                    }
                }
            }
            let complete = expected.len() - 1;
            let mut r = &input[..];
            for (i, section) in expected.iter().enumerate() {
                match pkt_line::read_section(&mut r) {
                    Ok(got) => {
                        prop_assert!(
                            i < complete || garbled,
                            "section {} read without its flush",
                            i
                        );
                        if i < complete {
                            prop_assert_eq!(&got, section, "section {}", i);
                        }
                    }
                    Err(_) => {
                        prop_assert!(i >= complete, "section {} is whole but not read", i);
                        break;
                    }
                }
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_pkt_line_round_trip() {
    let payload = prop_oneof![
        8 => vec(any::<u8>(), 0..64),
        1 => vec(any::<u8>(), pkt_line::MAX_PAYLOAD - 2..pkt_line::MAX_PAYLOAD + 3),
    ];
    fuzz(
        "fuzz_pkt_line_round_trip",
        Budget::new(1000, 20),
        vec(payload, 0..6),
        |payloads| {
            let mut buf = Vec::new();
            for p in &payloads {
                pkt(&mut buf, p);
            }
            pkt_line::flush(&mut buf).expect("writing to a Vec");
            let mut r = &buf[..];
            let got = pkt_line::read_section(&mut r).map_err(|e| fail(e.to_string()))?;
            prop_assert!(r.is_empty());
            let want: Vec<Vec<u8>> = payloads.iter().map(|p| as_read(p)).collect();
            prop_assert_eq!(got, want);
            Ok(())
        },
    );
}

/// A bare repository directory and a socket path nothing listens on: the
/// hooks run for real, and every ref they would take to the node fails to
/// reach it, which tells exactly what each ref's answer must be.
struct HookEnv {
    dir: tempfile::TempDir,
}

impl HookEnv {
    fn new() -> HookEnv {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("repo.git")).expect("mkdir");
        HookEnv { dir }
    }

    fn run(&self, args: &[&str], stdin: &[u8]) -> Result<std::process::Output, TestCaseError> {
        let mut child = Process::new(env!("CARGO_BIN_EXE_piehole"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("GIT_DIR", self.dir.path().join("repo.git"))
            .env("PIEHOLE_NODE", self.dir.path().join("nobody.sock"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("cannot run the hook: {e}")))?;
        let mut pipe = child.stdin.take().expect("piped");
        // The hook may stop reading early (bad input): a broken pipe is fine.
        let _ = pipe.write_all(stdin);
        drop(pipe);
        let out = child
            .wait_with_output()
            .map_err(|e| fail(format!("the hook vanished: {e}")))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        prop_assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "hook {:?} exited with {:?}: {}",
            args,
            out.status,
            stderr
        );
        prop_assert!(
            !stderr.contains("internal error"),
            "the hook panicked: {}",
            stderr
        );
        Ok(out)
    }
}

/// One command line of proc-receive's input: "OLD NEW REF", or garbage.
fn command_line() -> BoxedStrategy<Vec<u8>> {
    let id = prop_oneof![
        3 => pick(&[ZERO_ID, A, B, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"]),
        1 => object_id(),
    ];
    let name = prop_oneof![
        3 => ref_name().prop_map(String::into_bytes),
        2 => pick(&[
            "HEAD",
            "main",
            "refs/remotes/origin/x",
            "refs/remotes/",
            "refs/piehole/x",
            "refs/heads/a b c",
            "refs/heads/x\n",
            "refs/heads/x\r\n",
        ])
        .prop_map(String::into_bytes),
        1 => vec(any::<u8>(), 0..12).prop_map(|b| [b"refs/heads/".to_vec(), b].concat()),
    ];
    prop_oneof![
        8 => (id.clone(), id, name).prop_map(|(o, n, r)| [o.as_bytes(), b" ", n.as_bytes(), b" ", &r[..]].concat()),
        1 => vec(any::<u8>(), 0..48),
    ]
    .boxed()
}

#[derive(Debug, PartialEq)]
enum Answer {
    /// Not piehole's: git moves it itself.
    FallThrough,
    /// Refused by the hook itself.
    Ng,
    /// Taken to the node (which is not there).
    ToNode,
}

/// The hook's verdict on one command when the node cannot be reached: only
/// refs it lets git handle can pass.
fn expected_answer(line: &[u8]) -> Option<(String, Answer)> {
    let lossy = String::from_utf8_lossy(line);
    let mut parts = lossy.splitn(3, ' ');
    let (old, new, name) = (parts.next()?, parts.next()?, parts.next()?.to_string());
    let answer = if std::str::from_utf8(line).is_err() {
        Answer::Ng
    } else if !name.starts_with("refs/") || name.starts_with("refs/remotes/") {
        Answer::FallThrough
    } else if name.starts_with(OWN_NAMESPACE)
        || validate::git_object_id(old).is_err()
        || validate::git_object_id(new).is_err()
    {
        Answer::Ng
    } else {
        Answer::ToNode
    };
    Some((name, answer))
}

#[test]
fn fuzz_proc_receive_hook_input() {
    let env = HookEnv::new();
    let caps = pick(&[
        "",
        "atomic",
        "atomic",
        "report-status atomic",
        "atomic push-options",
        "atomicx",
        "push-options",
        "atomic\n",
    ]);
    let version = prop_oneof![
        6 => caps.prop_map(|c| vec![format!("version=1\0{c}").into_bytes()]),
        1 => vec(vec(any::<u8>(), 0..16), 0..3),
    ];
    // Cut the input short, or let it run past its flushes.
    let tail = prop_oneof![
        6 => Just((None, vec![])),
        1 => (any::<prop::sample::Index>(), Just(vec![])).prop_map(|(i, t)| (Some(i), t)),
        1 => vec(any::<u8>(), 1..16).prop_map(|t| (None, t)),
    ];
    let input = (version, vec(command_line(), 0..6), tail);
    let reached = Reached::default();
    fuzz(
        "fuzz_proc_receive_hook_input",
        Budget::new(200, 160),
        input,
        |(version, commands, (cut, tail))| {
            let mut stdin = Vec::new();
            for v in &version {
                pkt(&mut stdin, v);
            }
            pkt_line::flush(&mut stdin).expect("Vec");
            for c in &commands {
                pkt(&mut stdin, c);
            }
            pkt_line::flush(&mut stdin).expect("Vec");
            if let Some(i) = cut {
                stdin.truncate(i.index(stdin.len() + 1));
            }
            stdin.extend_from_slice(&tail);
            let out = env.run(&["hook", "proc-receive"], &stdin)?;

            // What the hook was given, as it reads it.
            let mut r = &stdin[..];
            let Ok(version) = pkt_line::read_section(&mut r) else {
                return Ok(());
            };
            let mut reply = &out.stdout[..];
            let greeting =
                pkt_line::read_section(&mut reply).map_err(|e| fail(format!("bad reply {e}")))?;
            prop_assert_eq!(greeting, vec![b"version=1\0".to_vec()]);
            let Ok(commands) = pkt_line::read_section(&mut r) else {
                prop_assert_eq!(out.status.code(), Some(1));
                reached.hit("input cut short");
                return Ok(());
            };
            let Some(expected) = commands
                .iter()
                .map(|c| expected_answer(c))
                .collect::<Option<Vec<_>>>()
            else {
                // A line it cannot read fails the whole push.
                prop_assert_eq!(out.status.code(), Some(1));
                prop_assert!(reply.is_empty(), "verdicts after an unreadable command");
                reached.hit("unreadable command");
                return Ok(());
            };
            let atomic = version.iter().any(|line| {
                line.split(|&b| b == 0)
                    .nth(1)
                    .is_some_and(|caps| caps.split(|&b| b == b' ').any(|c| c == b"atomic"))
            });
            // An atomic push cannot be half git's, half piehole's.
            let mixed = expected.iter().any(|(_, a)| *a == Answer::FallThrough)
                && expected.iter().any(|(_, a)| *a == Answer::ToNode);
            if atomic && mixed {
                reached.hit("atomic mix refused");
            }
            let verdicts = pkt_line::read_section(&mut reply)
                .map_err(|e| fail(format!("bad verdicts {e}")))?;
            prop_assert!(reply.is_empty(), "more after the verdicts");
            let mut lines = verdicts.iter();
            let mut all_ok = true;
            for (name, answer) in &expected {
                let line = lines
                    .next()
                    .ok_or_else(|| fail(format!("no verdict for {name:?}")))?;
                let text = String::from_utf8_lossy(line);
                let ok_line = as_read(format!("ok {name}").as_bytes());
                reached.hit(match answer {
                    Answer::FallThrough => "fell through",
                    Answer::Ng => "refused by the hook",
                    Answer::ToNode => "taken to the node",
                });
                if *answer == Answer::FallThrough && !(atomic && mixed) {
                    prop_assert_eq!(line, &ok_line, "{:?}", name);
                    let option = lines.next().map(|l| l.as_slice());
                    prop_assert_eq!(option, Some(&b"option fall-through"[..]));
                } else {
                    all_ok = false;
                    prop_assert!(
                        text.starts_with(&format!("ng {name}")),
                        "{:?} answered {:?}",
                        name,
                        text
                    );
                }
            }
            prop_assert!(lines.next().is_none(), "more verdicts than commands");
            prop_assert_eq!(out.status.code(), Some(if all_ok { 0 } else { 1 }));
            Ok(())
        },
    );
    reached.require(
        "fuzz_proc_receive_hook_input",
        &[
            "input cut short",
            "unreadable command",
            "atomic mix refused",
            "fell through",
            "refused by the hook",
            "taken to the node",
        ],
    );
}

#[test]
fn fuzz_update_hook_arguments() {
    let env = HookEnv::new();
    let id = prop_oneof![3 => pick(&[ZERO_ID, A, B, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"]), 1 => object_id(), 1 => any_text()];
    let name = prop_oneof![
        3 => ref_name(),
        1 => pick(&["HEAD", "refs/remotes/origin/x", "refs/piehole/x", "-h", "--help"]),
        1 => any_text(),
    ];
    let input = (name, id.clone(), id).prop_map(|(r, o, n)| {
        let no_nul = |s: String| s.replace('\0', "");
        (no_nul(r), no_nul(o), no_nul(n))
    });
    let reached = Reached::default();
    fuzz(
        "fuzz_update_hook_arguments",
        Budget::new(200, 130),
        input,
        |(name, old, new)| {
            let out = env.run(&["hook", "update", "--", &name, &old, &new], b"")?;
            // It passes only refs git keeps alone, with ids git could have sent.
            let passes = validate::git_object_id(&old).is_ok()
                && validate::git_object_id(&new).is_ok()
                && !validate::is_replicated(&name)
                && !name.starts_with(OWN_NAMESPACE);
            reached.hit(if passes { "passed" } else { "refused" });
            prop_assert_eq!(
                out.status.code(),
                Some(if passes { 0 } else { 1 }),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        },
    );
    reached.require("fuzz_update_hook_arguments", &["passed", "refused"]);
}
