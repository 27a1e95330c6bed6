//! Cluster membership (SPEC §10, §6; issue 9): safe bootstrap, refusing a
//! wiped or foreign data dir, `piehole member list|add|remove`, `--join`,
//! growing and shrinking the cluster while pushes run, and catching up
//! through a snapshot with 100,000 refs in the state machine.
//!
//! Real `piehole node` processes and real git. A continuous pusher (a
//! thread that commits and pushes its own branch to replica 1 in a loop)
//! runs through the changes; every push it saw acknowledged must end up in
//! every replica's history of that branch, and every push it saw fail must
//! have failed with one of the README's "try again" messages.

#![allow(dead_code)]

#[path = "harness/mod.rs"]
mod harness;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use harness::git::{self, Work};
use harness::*;

const GROUP: &str = "proj";
const MAIN: &str = "refs/heads/main";
/// The pusher's branch (pushed by the pusher alone).
const BRANCH: &str = "pusher";

/// Every test cluster: short request timeout (pushes refused rather than
/// held when a majority is missing), reconcile every second.
const ARGS: &[&str] = &[
    "--request-timeout-ms",
    "3000",
    "--reconcile-interval-ms",
    "1000",
];

/// How long a refused node may take to exit: it asks its peers first (2 s
/// per call at most), then exits; "within seconds", with room for a loaded
/// machine.
const REFUSAL: Duration = Duration::from_secs(30);
/// A learner with a small state catches up and is promoted.
const PROMOTION: Duration = Duration::from_secs(60);
/// A learner that needs a snapshot of 100,000 refs.
const BIG_PROMOTION: Duration = Duration::from_secs(300);
/// The election bound: the election timeout is 10 to 20 ticks of 100 ms
/// (node/src/consensus/raft/driver.rs), pre-vote adds one round trip; a
/// handed-over or re-elected leadership is in place well within a few
/// election timeouts.
const ELECTION_BOUND: Duration = Duration::from_secs(10);
/// The pusher gets more pushes acknowledged, and replicas converge.
const PUSHES_GO_ON: Duration = Duration::from_secs(60);
/// Far beyond a push's own bound (request timeout 3 s + 3 s margin in the
/// hook): a push still running then has hung.
const PUSH_BOUND: Duration = Duration::from_secs(60);
/// A `member add|remove` refused because another change is still in
/// progress is tried again for this long.
const CHANGE_RETRY: Duration = Duration::from_secs(30);

/// The refusals the README documents as "try again" that a push may meet
/// while the node it pushes to stays up (classified by [`git::failure_kind`]).
const RETRY: &[&str] = &[
    "catching-up",
    "lost-quorum",
    "no-quorum",
    "no-answer",
    "timed-out",
];
/// ... and those it meets while that node itself is down.
const RETRY_NODE_DOWN: &[&str] = &[
    "catching-up",
    "lost-quorum",
    "no-quorum",
    "no-answer",
    "timed-out",
    "unreachable",
    "node-went-away",
    "shutting-down",
];

// ---------------------------------------------------------------------------
// Must show 1: a wiped node is refused.

/// Node 3 is killed and its data dir deleted; started again with its
/// original flags it exits 1 with one line naming the data dir and the
/// replacement procedure (`member remove`, `--join`), and the others' term
/// and commit index are exactly what they were before it started: it never
/// campaigned, voted or took part.
#[test]
fn a_wiped_node_restarted_with_its_original_flags_is_refused_and_leaves_term_and_commit_unchanged()
{
    let mut c = Cluster::start_with(3, ARGS);
    c.cas_ok(1, "g", MAIN, ZERO, &oid(1));
    poll_until("node 3 applied the write", PUSHES_GO_ON, || {
        (c.try_refs(3, "g", true)?.get(MAIN)? == &oid(1)).then_some(())
    });
    c.kill(3);
    c.wipe(3);
    let before = settled_raft(&c, &[1, 2]);

    let o = c.run_node_expect_exit(3, REFUSAL);
    let line = assert_one_line_error(&o, 1);
    for needle in ["data dir", "member remove", "--join"] {
        assert!(
            line.contains(needle),
            "the refusal must contain {needle:?}: {line}"
        );
    }
    assert_eq!(
        raft_now(&c, &[1, 2]),
        before,
        "(term, commit index) of nodes 1 and 2 changed while the wiped node ran"
    );
}

// ---------------------------------------------------------------------------
// Must show 2: replacing a lost node while pushes run.

/// A pusher pushes to replica 1 throughout. Node 3 is lost with its data
/// dir and its replica; `member remove 3`, `member add 4=...`, node 4
/// started with `--join` and its replica installed. Node 4 becomes a voter,
/// every replica (1, 2, 4) converges on the consensus, every acknowledged
/// push is in every replica, and every failed push failed with a
/// documented retry message.
#[test]
fn replacing_a_lost_node_under_pushes_makes_the_new_node_a_voter_converges_and_loses_no_push() {
    let mut c = Cluster::start_with(3, ARGS);
    let mut reps = git::replicas(&c, GROUP);
    let pusher = Pusher::start(&c, &reps[0]);
    pusher.wait_for_more(3, "pushes before node 3 is lost");

    // The host of node 3 is lost: process, data dir and repositories.
    c.kill(3);
    c.wipe(3);
    let lost_replica = reps.pop().expect("replica 3");
    std::fs::remove_dir_all(
        lost_replica
            .parent()
            .expect("node 3's repository directory"),
    )
    .expect("delete node 3's repositories");
    pusher.wait_for_more(1, "pushes with node 3 lost");

    // The README's "Replacing a dead host", step by step: remove the lost
    // id and add a new one on a live member, start the new node with an
    // empty data dir and --join, wait until it is a voter, then create and
    // install its repository.
    member_change_ok("member remove 3", || c.member_remove(1, 3));
    let new = c.new_node(&[1]);
    member_change_ok(&format!("member add {new}"), || c.member_add(1, new));
    c.start_node(new);
    c.wait_role(1, new, "voter", PROMOTION);
    let rep = git::bare_repo(&c, new, GROUP);
    git::install_ok(&c, new, &rep);
    reps.push(rep);
    pusher.wait_for_more(3, "pushes with the new node a voter");

    let log = pusher.stop();
    log.assert_failures_within(RETRY);
    let roles = c.try_roles(1).expect("member list through node 1");
    assert_eq!(
        roles,
        BTreeMap::from([
            (1, "voter".to_string()),
            (2, "voter".to_string()),
            (3, "removed".to_string()),
            (new, "voter".to_string()),
        ]),
        "the members after the replacement"
    );
    wait_replicas_hold_consensus(&c, 1, &reps);
    assert_acks_kept(&reps, &log.acked);
}

// ---------------------------------------------------------------------------
// Must show 3: growing from 3 to 5 and shrinking back, under pushes.

/// Grown from 3 to 5 (each new node added, joined, promoted, its replica
/// installed) while the pusher pushes to replica 1; then, for each of the
/// ten pairs of nodes in turn, both are SIGKILLed and a push to a replica
/// of a surviving node is accepted (after documented retries at most),
/// then both come back. No acknowledged push is lost, every replica holds
/// every probe push, and the pusher saw only documented retry messages
/// (including "unreachable" while node 1 itself was down).
#[test]
fn a_cluster_grown_from_3_to_5_under_pushes_takes_pushes_with_any_two_nodes_killed() {
    let mut c = Cluster::start_with(3, ARGS);
    let mut reps = git::replicas(&c, GROUP);
    let pusher = Pusher::start(&c, &reps[0]);
    pusher.wait_for_more(3, "pushes before the cluster grows");
    grow_to_five(&mut c, &mut reps);
    pusher.wait_for_more(3, "pushes with five voters");

    let probe = Work::new(&c, "probe");
    let mut probes = BTreeMap::new();
    for a in 1..=5u64 {
        for b in a + 1..=5 {
            c.kill(a);
            c.kill(b);
            let target = (1..=5).find(|id| *id != a && *id != b).unwrap();
            let branch = format!("refs/heads/probe-{a}-{b}");
            let commit = probe.commit(&format!("nodes {a} and {b} are down"));
            push_until_accepted(
                &probe,
                &reps[(target - 1) as usize],
                &format!("HEAD:{branch}"),
                &format!("a push to replica {target} with nodes {a} and {b} killed"),
            );
            probes.insert(branch, commit);
            c.restart(a);
            c.restart(b);
            wait_all_caught_up(&c);
        }
    }
    pusher.wait_for_more(3, "pushes after the kills");

    let log = pusher.stop();
    log.assert_failures_within(RETRY_NODE_DOWN);
    let agreed = wait_replicas_hold_consensus(&c, 1, &reps);
    for (branch, commit) in &probes {
        assert_eq!(
            agreed.get(branch),
            Some(commit),
            "the accepted probe push of {branch}"
        );
    }
    assert_acks_kept(&reps, &log.acked);
}

/// Grown from 3 to 5 under pushes, then shrunk back to 3 by removing a
/// founding member (2) and an added one (4), both live, while the pusher
/// pushes to replica 1: the members are then voters 1, 3, 5 with 2 and 4
/// removed, pushes go on, no acknowledged push is lost in the remaining
/// replicas, and the removed nodes, started again with their old data
/// dirs and flags, exit 1 saying they were removed.
#[test]
fn shrinking_from_5_to_3_under_pushes_loses_no_push_and_refuses_the_removed_data_dirs() {
    let mut c = Cluster::start_with(3, ARGS);
    let mut reps = git::replicas(&c, GROUP);
    let pusher = Pusher::start(&c, &reps[0]);
    pusher.wait_for_more(3, "pushes before the cluster grows");
    grow_to_five(&mut c, &mut reps);
    pusher.wait_for_more(3, "pushes with five voters");

    let mut members = vec![1, 2, 3, 4, 5];
    for gone in [2, 4] {
        member_change_ok(&format!("member remove {gone}"), || {
            c.member_remove(1, gone)
        });
        // A removed leader hands over; the next change goes to its successor.
        members.retain(|&id| id != gone);
        leader_among(&c, &members, ELECTION_BOUND);
    }
    let expected: BTreeMap<u64, String> = [
        (1, "voter"),
        (2, "removed"),
        (3, "voter"),
        (4, "removed"),
        (5, "voter"),
    ]
    .into_iter()
    .map(|(id, role)| (id, role.to_string()))
    .collect();
    poll_until_showing(
        "node 1's member list shows voters 1, 3, 5 and 2, 4 removed",
        PROMOTION,
        || (c.try_roles(1)? == expected).then_some(()),
        || format!("{:?}", c.try_member_list(1)),
    );
    // Whatever the removed processes did on their own, they are gone now.
    c.kill(2);
    c.kill(4);
    pusher.wait_for_more(3, "pushes with three voters again");

    let log = pusher.stop();
    log.assert_failures_within(RETRY);
    let kept: Vec<PathBuf> = [1, 3, 5].iter().map(|&id| reps[id - 1].clone()).collect();
    wait_replicas_hold_consensus(&c, 1, &kept);
    assert_acks_kept(&kept, &log.acked);

    for gone in [2, 4] {
        let o = c.run_node_expect_exit(gone, REFUSAL);
        let line = assert_one_line_error(&o, 1);
        assert!(
            line.contains("was removed"),
            "node {gone} restarted after its removal: {line}"
        );
    }
}

// ---------------------------------------------------------------------------
// Must show 4: removing the current leader.

/// `member remove` of the leader (asked through a follower) completes, and
/// within the election bound the two others agree on a new leader among
/// themselves, which shows the old one as removed and takes a write.
#[test]
fn removing_the_current_leader_completes_and_the_others_elect_a_new_leader() {
    let mut c = Cluster::start_with(3, ARGS);
    c.cas_ok(1, "g", MAIN, ZERO, &oid(1));
    let old = c.wait_leader();
    let rest: Vec<u64> = c.ids().into_iter().filter(|&id| id != old).collect();
    let o = c.member_remove(rest[0], old);
    assert!(
        o.status.success(),
        "member remove of the leader {old} through node {}: {}",
        rest[0],
        show(&o)
    );
    let new = leader_among(&c, &rest, ELECTION_BOUND);
    // Whatever the removed leader did after handing over, it is gone now.
    c.kill(old);
    assert_eq!(
        c.try_roles(new)
            .and_then(|r| r.get(&old).cloned())
            .as_deref(),
        Some("removed"),
        "the new leader {new}'s member list: {:?}",
        c.try_member_list(new)
    );
    assert_eq!(c.cas_ok(rest[1], "g", MAIN, &oid(1), &oid(2)), oid(2));
}

/// The leader is removed while a pusher pushes to a replica of another
/// node. The leader hands over first (raft-rs cannot go on leading a
/// configuration it is not in), so it never panics: it exits with the
/// removal message once it applied the change as a follower. The others
/// elect a leader, the pusher sees only documented retries, and nothing
/// acknowledged is lost.
#[test]
fn removing_the_leader_while_pushes_run_elects_another_and_loses_no_push() {
    let c = Cluster::start_with(3, ARGS);
    let old = c.wait_leader();
    let rest: Vec<u64> = c.ids().into_iter().filter(|&id| id != old).collect();
    let reps = git::replicas(&c, GROUP);
    let kept: Vec<PathBuf> = rest
        .iter()
        .map(|&id| reps[(id - 1) as usize].clone())
        .collect();
    let pusher = Pusher::start(&c, &kept[0]);
    pusher.wait_for_more(3, "pushes before the leader is removed");

    member_change_ok(&format!("member remove {old} (the leader)"), || {
        c.member_remove(rest[0], old)
    });
    leader_among(&c, &rest, ELECTION_BOUND);
    poll_until(&format!("the removed leader {old} exits"), REFUSAL, || {
        (!c.is_running(old)).then_some(())
    });
    let log = c.log(old);
    assert!(
        !log.contains("panicked") && !log.contains("internal error"),
        "the removed leader must stop cleanly: {}",
        tail(&c.node(old).log_path(), 3000)
    );
    assert!(log.contains("was removed from the cluster"), "{log}");
    pusher.wait_for_more(3, "pushes after the leader was removed");
    let acks = pusher.stop();
    acks.assert_failures_within(RETRY);
    wait_replicas_hold_consensus(&c, rest[0], &kept);
    assert_acks_kept(&kept, &acks.acked);
}

/// Node 3 is down while nodes 4 and 5 are added and promoted; then nodes 1
/// and 2 stop and node 3 comes back. The only majority left is {3, 4, 5}
/// and node 3's state has never heard of 4 and 5: it must still take their
/// raft messages (they introduce themselves), answer them, vote, and catch
/// up from whichever of them leads.
#[test]
fn a_node_that_missed_members_being_added_catches_up_from_them() {
    let mut c = Cluster::start_with(3, ARGS);
    c.cas_ok(1, "g", MAIN, ZERO, &oid(1));
    c.kill(3);
    c.wait_leader();
    for _ in 0..2 {
        let id = c.new_node(&[1]);
        member_change_ok(&format!("member add {id}"), || c.member_add(1, id));
        c.start_node(id);
        c.wait_role(1, id, "voter", PROMOTION);
    }
    c.cas_ok(1, "g", MAIN, &oid(1), &oid(2));
    c.kill(1);
    c.kill(2);
    c.restart(3);
    leader_among(&c, &[3, 4, 5], ELECTION_BOUND * 3);
    poll_until("node 3 applied what it missed", PUSHES_GO_ON, || {
        (c.try_refs(3, "g", true)?.get(MAIN)? == &oid(2)).then_some(())
    });
    assert_eq!(c.cas_ok(3, "g", MAIN, &oid(2), &oid(3)), oid(3));
    let roles = c.try_roles(3).expect("member list through node 3");
    assert_eq!(
        roles.get(&4).map(String::as_str),
        Some("voter"),
        "{roles:?}"
    );
    assert_eq!(
        roles.get(&5).map(String::as_str),
        Some("voter"),
        "{roles:?}"
    );
}

/// The leader is removed while writes are proposed through it without a
/// pause: raft-rs would need the removed leader's own progress for the
/// entries it appends meanwhile. It hands over instead, and stops cleanly
/// (no panic), with the removal message.
#[test]
fn removing_the_leader_while_it_takes_writes_stops_it_cleanly() {
    let c = Cluster::start_with(3, ARGS);
    let old = c.wait_leader();
    let rest: Vec<u64> = c.ids().into_iter().filter(|&id| id != old).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let sock = c.socket(old);
        std::thread::spawn(move || {
            let rt = runtime();
            rt.block_on(async {
                let Ok(mut client) = piehole_client::LocalClient::connect(&sock).await else {
                    return 0;
                };
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("refs/heads/w{n}");
                    if client
                        .cas("g", &name, None, Some(&oid(n + 1)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    n += 1;
                }
                n
            })
        })
    };
    poll_until("writes go through the leader", PUSHES_GO_ON, || {
        (c.try_status(old)?["refs"].as_u64()? >= 20).then_some(())
    });
    assert!(
        !writer.is_finished(),
        "the writer stopped before the removal: {}",
        c.log(old)
    );
    member_change_ok(&format!("member remove {old} (the leader)"), || {
        c.member_remove(rest[0], old)
    });
    leader_among(&c, &rest, ELECTION_BOUND);
    poll_until(&format!("the removed leader {old} exits"), REFUSAL, || {
        (!c.is_running(old)).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread");
    let log = c.log(old);
    assert!(
        !log.contains("panicked") && !log.contains("internal error"),
        "the removed leader must stop cleanly: {}",
        tail(&c.node(old).log_path(), 3000)
    );
    assert!(log.contains("was removed from the cluster"), "{log}");
}

/// A voter that joined with `--join`, then lost its data dir, started again
/// with the same flags (`--join` included) is refused: the id was claimed
/// by its first data dir. So is a founder whose data dir was wiped and that
/// tries `--join`. Neither changes the others' term or commit index.
#[test]
fn a_wiped_node_is_refused_also_when_started_with_join() {
    let mut c = Cluster::start_with(3, ARGS);
    let new = c.join_node(1);
    c.wait_role(1, new, "voter", PROMOTION);
    c.cas_ok(1, "g", MAIN, ZERO, &oid(1));

    c.kill(new);
    c.wipe(new);
    let before = settled_raft(&c, &[1, 2, 3]);
    let line = assert_one_line_error(&c.run_node_expect_exit(new, REFUSAL), 1);
    for needle in ["already started", "data dir", "member remove", "--join"] {
        assert!(line.contains(needle), "refusal without {needle:?}: {line}");
    }
    assert_eq!(
        raft_now(&c, &[1, 2, 3]),
        before,
        "a wiped joined node took part"
    );

    // A founder, wiped, trying --join instead of its original --peers
    // (the lost node goes first, so that 1 and 2 remain a majority).
    member_change_ok(&format!("member remove {new}"), || c.member_remove(1, new));
    c.kill(3);
    c.wipe(3);
    let before = settled_raft(&c, &[1, 2]);
    let mut args = c.node_args(3);
    let peers = args.iter().position(|a| a == "--peers").expect("--peers");
    args[peers] = "--join".into();
    args[peers + 1] = c.node(1).addr.clone();
    let mut cmd = std::process::Command::new(piehole());
    cmd.args(&args).env_remove("RUST_LOG");
    let line = assert_one_line_error(&run_expect_exit(cmd, REFUSAL), 1);
    assert!(line.contains("already started"), "{line}");
    assert_eq!(raft_now(&c, &[1, 2]), before, "a wiped founder took part");
}

/// With node 3 down, a learner that is added but never started must not be
/// promoted (it has caught up with nothing): with four voters of which two
/// answer, the cluster would stop. Writes go on, each through the log,
/// and the learner stays a learner.
#[test]
fn a_learner_that_never_started_is_not_promoted() {
    let mut c = Cluster::start_with(3, ARGS);
    c.kill(3);
    c.wait_leader();
    let new = c.new_node(&[1]);
    member_change_ok(&format!("member add {new}"), || c.member_add(1, new));
    // Each write is a round through the leader, which looks for learners
    // to promote every 200 ms: writes for 2 s span ten looks.
    let mut value = ZERO.to_string();
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(2) {
        i += 1;
        value = c.cas_ok(1, "g", MAIN, &value, &oid(i));
    }
    let roles = c.try_roles(1).expect("member list");
    assert_eq!(
        roles.get(&new).map(String::as_str),
        Some("learner"),
        "{roles:?}"
    );
}

// ---------------------------------------------------------------------------
// Must show 5: a member add while a minority is down.

/// With node 3 down, `member add 4` either completes (node 4 then joins and
/// becomes a voter, and writes work) or is refused with one line and
/// changes nothing (node 4 then cannot join). Either way, once node 3 is
/// back every node shows the same members, those of a whole change or of
/// none.
#[test]
fn a_member_add_while_a_minority_is_down_completes_or_is_refused_and_is_never_half_done() {
    let mut c = Cluster::start_with(3, ARGS);
    c.cas_ok(1, "g", MAIN, ZERO, &oid(1));
    c.kill(3);
    c.wait_leader();
    let before = members_of(&c.member_list(1));

    let new = c.new_node(&[1]);
    let o = c.member_add(1, new);
    let expected: BTreeMap<u64, String> = if o.status.success() {
        eprintln!("member add {new} with node 3 down: completed");
        c.start_node(new);
        c.wait_role(1, new, "voter", PROMOTION);
        assert_eq!(c.cas_ok(new, "g", MAIN, &oid(1), &oid(2)), oid(2));
        (1..=new).map(|id| (id, "voter".to_string())).collect()
    } else {
        let line = assert_one_line_error(&o, 1);
        eprintln!("member add {new} with node 3 down: refused: {line}");
        assert_eq!(
            members_of(&c.member_list(1)),
            before,
            "a refused member add changed the members"
        );
        let j = c.run_node_expect_exit(new, REFUSAL);
        let line = assert_one_line_error(&j, 1);
        assert!(line.contains("member add"), "node {new} --join: {line}");
        assert_eq!(c.cas_ok(2, "g", MAIN, &oid(1), &oid(2)), oid(2));
        before
            .iter()
            .map(|(&id, (_, role))| (id, role.clone()))
            .collect()
    };
    c.restart(3);
    let running = c.running_ids();
    poll_until_showing(
        &format!("nodes {running:?} all show the members {expected:?}"),
        PROMOTION,
        || {
            running
                .iter()
                .all(|&id| c.try_roles(id).as_ref() == Some(&expected))
                .then_some(())
        },
        || {
            running
                .iter()
                .map(|&id| format!("node {id}: {:?}\n", c.try_member_list(id)))
                .collect()
        },
    );
}

// ---------------------------------------------------------------------------
// Must show 6: catching up through a snapshot, with 100,000 refs.

/// The must-show-6 clusters: a request timeout that lets one log entry of
/// 100,000 refs (the import) commit on a loaded machine, and a small
/// snapshot interval.
const BULK_ARGS: &[&str] = &[
    "--request-timeout-ms",
    "30000",
    "--reconcile-interval-ms",
    "1000",
    "--snapshot-interval",
    "100",
];
/// Log entries between snapshots in the must-show-6 clusters (as in
/// [`BULK_ARGS`]).
const SNAPSHOT_INTERVAL: u64 = 100;
/// Refs loaded by [`load_bulk`] with `consensus import`.
const BULK: u64 = 100_000;
/// CAS writes after the import: more than two snapshot intervals, so the
/// log is compacted past everything a node down since before them holds.
const AFTER_IMPORT: u64 = 3 * SNAPSHOT_INTERVAL;

/// Node 3 goes down; 100,000 refs are imported and then more entries
/// written than the log keeps, so nodes 1 and 2 compact their logs past
/// node 3's last entry. Node 3 restarted catches up by installing a
/// snapshot, and its state is then exactly the cluster's: every ref, and
/// it is still a voter.
#[test]
fn a_long_down_node_behind_the_compacted_log_rejoins_through_a_snapshot_with_100k_refs() {
    let mut c = Cluster::start_with(3, BULK_ARGS);
    let last3 = c.status(3)["commit_index"].as_u64().unwrap();
    c.kill(3);
    c.wait_leader();

    let expected = load_bulk(&c, 1);
    let leader = c.wait_leader();
    poll_until_showing(
        "nodes 1 and 2 compacted their logs past node 3's last entry",
        PUSHES_GO_ON,
        || {
            [1, 2]
                .iter()
                .all(|&id| {
                    c.try_status(id)
                        .and_then(|s| s["first_log_index"].as_u64())
                        .is_some_and(|first| first > last3 + 1)
                })
                .then_some(())
        },
        || {
            format!(
                "node 3 had {last3}; {:?} {:?}",
                c.try_status(1),
                c.try_status(2)
            )
        },
    );
    let commit = c.status(leader)["commit_index"].as_u64().unwrap();

    c.restart(3);
    let total = expected.len() as u64;
    let s3 = poll_until("node 3 catches up", BIG_PROMOTION, || {
        let s = c.try_status(3)?;
        (s["refs"].as_u64()? == total && s["applied_index"].as_u64()? >= commit).then_some(s)
    });
    assert!(
        s3["snapshots_installed"].as_u64().unwrap_or(0) >= 1,
        "node 3 caught up without installing a snapshot: {s3}"
    );
    assert_bulk_refs(&c, 3, &expected);
    assert_eq!(
        c.try_roles(3).and_then(|r| r.get(&3).cloned()).as_deref(),
        Some("voter"),
        "node 3 after rejoining: {:?}",
        c.try_member_list(3)
    );
}

/// With 100,000 refs in the state machine and a compacted log, `member add
/// 4` and node 4 started with `--join`: it becomes a voter, having caught
/// up by installing a snapshot, and holds every ref. The time from `member
/// add` to voter is printed (not judged).
#[test]
fn a_node_added_to_a_cluster_with_100k_refs_becomes_a_voter_through_a_snapshot() {
    let mut c = Cluster::start_with(3, BULK_ARGS);
    let expected = load_bulk(&c, 1);
    let leader = c.wait_leader();
    poll_until("the leader compacted its log", PUSHES_GO_ON, || {
        (c.try_status(leader)?["first_log_index"].as_u64()? > 1).then_some(())
    });

    let new = c.new_node(&[1]);
    let began = Instant::now();
    member_change_ok(&format!("member add {new}"), || c.member_add(1, new));
    c.start_node(new);
    c.wait_role(1, new, "voter", BIG_PROMOTION);
    let took = began.elapsed();
    eprintln!(
        "membership: member add to voter with {} refs in the state machine: {:.1} s",
        expected.len(),
        took.as_secs_f64()
    );

    let s = c.status(new);
    assert!(
        s["snapshots_installed"].as_u64().unwrap_or(0) >= 1,
        "node {new} became a voter without installing a snapshot: {s}"
    );
    // Promoted within 64 entries of the leader: let it apply the rest.
    let leader = c.wait_leader();
    let commit = c.status(leader)["commit_index"].as_u64().unwrap();
    poll_until(
        &format!("node {new} applied up to {commit}"),
        PUSHES_GO_ON,
        || (c.try_status(new)?["applied_index"].as_u64()? >= commit).then_some(()),
    );
    assert_bulk_refs(&c, new, &expected);
}

// ---------------------------------------------------------------------------
// Refusals and what `member list` and `status` show.

/// A node started with `--join` whose id no `member add` announced exits 1
/// with one line that says to run `member add`, and the members are
/// unchanged.
#[test]
fn joining_with_an_id_that_was_not_added_is_refused() {
    let mut c = Cluster::start_with(3, ARGS);
    let before = members_of(&c.member_list(1));
    let new = c.new_node(&[1, 2]);
    let o = c.run_node_expect_exit(new, REFUSAL);
    let line = assert_one_line_error(&o, 1);
    assert!(line.contains("member add"), "{line}");
    assert_eq!(members_of(&c.member_list(1)), before);
}

/// `member add 2=...` of an existing member (at another address) is
/// refused with one line; every node shows the same members, addresses and
/// roles as before.
#[test]
fn member_add_of_an_existing_id_is_refused_and_changes_nothing() {
    let c = Cluster::start_with(3, ARGS);
    let before = members_of(&c.member_list(1));
    let sock = c.socket(1);
    let spec = format!("2=127.0.0.1:{}", free_port());
    let o = c.run(&["member", "add", &spec, "--node", sock.to_str().unwrap()]);
    let line = assert_one_line_error(&o, 1);
    assert!(line.contains("already a member"), "{line}");
    for id in c.ids() {
        assert_eq!(members_of(&c.member_list(id)), before, "node {id}");
    }
}

/// `member add 3=...` after node 3 was removed (ids are never reused) is
/// refused with one line; the members stay as they were.
#[test]
fn member_add_of_a_removed_id_is_refused_and_changes_nothing() {
    let mut c = Cluster::start_with(3, ARGS);
    member_change_ok("member remove 3", || c.member_remove(1, 3));
    c.kill(3);
    c.wait_role(1, 3, "removed", PROMOTION);
    // Had node 3 led, its successor is in place: the refusal below is
    // about the id, not about a missing leader.
    c.wait_leader();
    let before = members_of(&c.member_list(1));
    let o = c.member_add(1, 3);
    let line = assert_one_line_error(&o, 1);
    assert!(line.contains("never reused"), "{line}");
    for id in [1, 2] {
        assert_eq!(members_of(&c.member_list(id)), before, "node {id}");
    }
}

/// A node whose data dir belongs to another cluster (B, whose term is
/// above ours, so that any message of it we took in would move our term)
/// is started at our node 3's address with `--peers` naming our members.
/// It exits 1 saying it belongs to another cluster, and our cluster's id,
/// members and (term, commit index) are unchanged.
#[test]
fn a_node_of_another_cluster_leaves_our_members_and_term_unchanged() {
    let mut ours = Cluster::start_with(3, ARGS);
    let mut theirs = Cluster::start_with(3, ARGS);
    let our_term = settled_raft(&ours, &[1, 2, 3])
        .values()
        .map(|&(term, _)| term)
        .max()
        .unwrap();
    for _ in 0..10 {
        let leader = theirs.wait_leader();
        if theirs.status(leader)["term"].as_u64().unwrap() > our_term + 1 {
            break;
        }
        theirs.kill(leader);
        theirs.wait_leader();
        theirs.restart(leader);
    }
    let their_term = theirs.status(theirs.wait_leader())["term"]
        .as_u64()
        .unwrap();
    assert!(
        their_term > our_term + 1,
        "cluster B's term {their_term} should be above ours, {our_term}"
    );
    // B's node 3 must find nobody of its own cluster.
    for id in theirs.ids() {
        theirs.kill(id);
    }

    ours.kill(3);
    let before_raft = settled_raft(&ours, &[1, 2]);
    let before_list = ours.member_list(1);

    let mut args = theirs.node_args(3);
    let set = |args: &mut Vec<String>, flag: &str, value: String| {
        let at = args.iter().position(|a| a == flag).unwrap() + 1;
        args[at] = value;
    };
    set(&mut args, "--listen", ours.node(3).addr.clone());
    let our_args = ours.node_args(3);
    let peers = our_args.iter().position(|a| a == "--peers").unwrap() + 1;
    set(&mut args, "--peers", our_args[peers].clone());
    // Our secret: what keeps it out must be the cluster id, not the secret.
    let (_, our_secret) = ours.secret.clone().expect("our cluster's secret");
    set(
        &mut args,
        "--cluster-secret-file",
        our_secret.display().to_string(),
    );
    let log = theirs.node(3).log_path();
    let logged_before = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) as usize;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut foreign = ChildGuard::spawn_piehole(&args, &log);
    // It asks our members who they are before raft starts, finds only
    // another cluster, and exits.
    let status = poll(POLL_EVERY, REFUSAL, || foreign.0.try_wait().ok().flatten())
        .unwrap_or_else(|| panic!("the foreign node still runs after {REFUSAL:?}"));
    let text = std::fs::read(&log).unwrap_or_default();
    let said = String::from_utf8_lossy(&text[logged_before.min(text.len())..]).into_owned();
    assert_eq!(status.code(), Some(1), "the foreign node: {said}");
    assert!(
        said.contains("another cluster"),
        "the foreign node must say it belongs to another cluster: {said}"
    );
    assert_eq!(
        raft_now(&ours, &[1, 2]),
        before_raft,
        "(term, commit index) of nodes 1 and 2 moved"
    );
    let after_list = ours.member_list(1);
    assert_eq!(after_list["cluster_id"], before_list["cluster_id"]);
    assert_eq!(members_of(&after_list), members_of(&before_list));
    drop(foreign);
}

/// `member list --json` and `status --json` show the cluster id (16 hex
/// digits, the same on every node), voters, a learner (announced but never
/// started, so it never catches up) and a removed member; on the leader
/// every member that is not removed has its progress (`matched`, `lag`),
/// and the learner that has nothing lags.
#[test]
fn member_list_and_status_show_voters_a_learner_progress_and_a_removed_member() {
    let mut c = Cluster::start_with(3, ARGS);
    c.cas_ok(1, "g", MAIN, ZERO, &oid(1));
    member_change_ok("member remove 3", || c.member_remove(1, 3));
    c.kill(3);
    // Had node 3 led, the next change goes to its successor.
    c.wait_leader();
    let learner = c.new_node(&[1]);
    member_change_ok(&format!("member add {learner}"), || {
        c.member_add(1, learner)
    });
    let leader = c.wait_leader();
    let expected: BTreeMap<u64, String> = [
        (1, "voter"),
        (2, "voter"),
        (3, "removed"),
        (learner, "learner"),
    ]
    .into_iter()
    .map(|(id, role)| (id, role.to_string()))
    .collect();

    let list = poll_until_showing(
        "the leader's member list shows the expected roles and progress",
        PROMOTION,
        || {
            let list = c.try_member_list(leader)?;
            (roles_of(&list)? == expected && list["leader_id"].as_u64() == Some(leader))
                .then_some(list)
        },
        || format!("{:?}", c.try_member_list(leader)),
    );
    let cluster_id = list["cluster_id"].as_str().expect("cluster_id").to_string();
    assert!(
        cluster_id.len() == 16 && cluster_id.chars().all(|ch| ch.is_ascii_hexdigit()),
        "cluster_id {cluster_id:?} is not 16 hex digits"
    );
    for m in list["members"].as_array().unwrap() {
        let id = m["id"].as_u64().unwrap();
        assert_eq!(
            m["addr"].as_str(),
            Some(c.node(id).addr.as_str()),
            "member {id}: {m}"
        );
        if m["role"] == "removed" {
            continue;
        }
        assert!(
            m["matched"].is_u64() && m["lag"].is_u64(),
            "the leader knows member {id}'s progress: {m}"
        );
    }
    let learner_entry = list["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"].as_u64() == Some(learner))
        .unwrap();
    assert!(
        learner_entry["lag"].as_u64().unwrap() > 0,
        "a learner that never started lags: {learner_entry}"
    );

    for id in [1, 2] {
        let s = c.status(id);
        assert_eq!(
            s["cluster_id"].as_str(),
            Some(cluster_id.as_str()),
            "node {id}: {s}"
        );
        let roles: BTreeMap<u64, String> = s["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["id"].as_u64().unwrap(),
                    m["role"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        assert_eq!(roles, expected, "node {id}'s status: {s}");
        let other = c.try_member_list(id).expect("member list");
        assert_eq!(other["cluster_id"].as_str(), Some(cluster_id.as_str()));
        assert_eq!(
            roles_of(&other).as_ref(),
            Some(&expected),
            "node {id}: {other}"
        );
    }
}

/// Removing node 3 deletes its replica registrations: the group's replicas
/// in the consensus (`consensus export`) are then only those of nodes 1
/// and 2, which keep replicating between them.
#[test]
fn a_removed_members_replicas_are_no_longer_registered_sources() {
    let mut c = Cluster::start_with(3, ARGS);
    let reps = git::replicas(&c, GROUP);
    assert_eq!(registered_replicas(&c, 1), vec![1, 2, 3]);
    let user = Work::new(&c, "alice");
    let first = user.commit("before the removal");
    user.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&first));

    member_change_ok("member remove 3", || c.member_remove(1, 3));
    c.kill(3);
    poll_until_showing(
        "the group's registered replicas are those of nodes 1 and 2",
        PROMOTION,
        || (try_registered_replicas(&c, 1)? == vec![1, 2]).then_some(()),
        || format!("{:?}", try_registered_replicas(&c, 1)),
    );
    let next = user.commit("after the removal");
    user.push_ok(&reps[1], &["main"]);
    git::wait_converged(&c, &reps[..2], MAIN, Some(&next));
}

// ---------------------------------------------------------------------------
// Helpers

/// Polls until `(term, commit index)` of each of `ids` is the same twice
/// in a row, with a leader among `ids`, every node's applied index at its
/// commit index and all commit indexes equal: nothing in flight. Returns
/// them.
fn settled_raft(c: &Cluster, ids: &[u64]) -> BTreeMap<u64, (u64, u64)> {
    let mut last = None;
    poll_until_showing(
        &format!("nodes {ids:?} settle (same term and commit twice, all applied)"),
        PUSHES_GO_ON,
        || {
            let mut now = BTreeMap::new();
            for &id in ids {
                let s = c.try_status(id)?;
                let (term, commit) = (s["term"].as_u64()?, s["commit_index"].as_u64()?);
                let leader = s["leader_id"].as_u64();
                if s["applied_index"].as_u64()? != commit
                    || !leader.is_some_and(|l| ids.contains(&l))
                {
                    last = None;
                    return None;
                }
                now.insert(id, (term, commit));
            }
            let commits: HashSet<u64> = now.values().map(|&(_, commit)| commit).collect();
            if commits.len() != 1 {
                last = None;
                return None;
            }
            if last.as_ref() == Some(&now) {
                return Some(now);
            }
            last = Some(now);
            None
        },
        || {
            format!(
                "{:?}",
                ids.iter().map(|&id| c.try_status(id)).collect::<Vec<_>>()
            )
        },
    )
}

/// Polls until the nodes `ids` all name the same leader, one of them;
/// returns it.
fn leader_among(c: &Cluster, ids: &[u64], timeout: Duration) -> u64 {
    poll_until_showing(
        &format!("nodes {ids:?} agree on a leader among themselves"),
        timeout,
        || {
            let mut leader = None;
            for &id in ids {
                let l = c.try_status(id)?["leader_id"].as_u64()?;
                if !ids.contains(&l) || leader.is_some_and(|x| x != l) {
                    return None;
                }
                leader = Some(l);
            }
            leader
        },
        || {
            ids.iter()
                .map(|&id| {
                    let s = c.try_status(id);
                    format!(
                        "node {id}: leader {:?} term {:?}\n",
                        s.as_ref().map(|s| s["leader_id"].clone()),
                        s.as_ref().map(|s| s["term"].clone())
                    )
                })
                .collect()
        },
    )
}

/// `(term, commit index)` of each of `ids`, now.
fn raft_now(c: &Cluster, ids: &[u64]) -> BTreeMap<u64, (u64, u64)> {
    ids.iter()
        .map(|&id| {
            let s = c.status(id);
            (
                id,
                (
                    s["term"].as_u64().unwrap(),
                    s["commit_index"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

/// Member id -> (address, role) from `member list --json`.
fn members_of(list: &serde_json::Value) -> BTreeMap<u64, (String, String)> {
    list["members"]
        .as_array()
        .unwrap_or_else(|| panic!("member list without members: {list}"))
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap(),
                (
                    m["addr"].as_str().unwrap_or("").to_string(),
                    m["role"].as_str().unwrap_or("").to_string(),
                ),
            )
        })
        .collect()
}

/// Runs a `member add|remove` until it exits 0; a refusal that says to try
/// again (another change in progress, leadership moving) is tried again,
/// any other failure panics.
fn member_change_ok(what: &str, f: impl Fn() -> Output) {
    poll_until(&format!("{what} succeeds"), CHANGE_RETRY, || {
        let o = f();
        if o.status.success() {
            return Some(());
        }
        let err = stderr(&o);
        assert!(
            err.contains("in progress") || err.contains("try again"),
            "{what}: {}",
            show(&o)
        );
        None
    })
}

/// Adds nodes 4 and 5 one after the other: `member add` through node 1,
/// started with `--join`, promoted to voter, replica installed.
fn grow_to_five(c: &mut Cluster, reps: &mut Vec<PathBuf>) {
    while c.nodes.len() < 5 {
        let id = c.new_node(&[1]);
        member_change_ok(&format!("member add {id}"), || c.member_add(1, id));
        c.start_node(id);
        c.wait_role(1, id, "voter", PROMOTION);
        let rep = git::bare_repo(c, id, GROUP);
        git::install_ok(c, id, &rep);
        reps.push(rep);
    }
}

/// Until the running nodes agree on a leader and each has applied what
/// the leader had committed when asked.
fn wait_all_caught_up(c: &Cluster) {
    let leader = c.wait_leader();
    let running = c.running_ids();
    poll_until(
        &format!("nodes {running:?} applied the leader's commit"),
        PUSHES_GO_ON,
        || {
            let commit = c.try_status(leader)?["commit_index"].as_u64()?;
            running
                .iter()
                .all(|&id| {
                    c.try_status(id)
                        .and_then(|s| s["applied_index"].as_u64())
                        .is_some_and(|applied| applied >= commit)
                })
                .then_some(())
        },
    )
}

/// Pushes `refspec` from `work` to `replica` until it is accepted; every
/// failure on the way must be a documented retry message (the node pushed
/// to is up).
fn push_until_accepted(work: &Work, replica: &Path, refspec: &str, what: &str) {
    poll_until(what, PUSHES_GO_ON, || {
        let out = work.push(replica, &[refspec]);
        if out.status.success() {
            return Some(());
        }
        let kind = git::failure_kind(&stderr(&out));
        assert!(
            RETRY.contains(&kind),
            "{what}: failed other than with a documented retry message: {}",
            show(&out)
        );
        None
    })
}

/// Until every replica's refs equal the group's consensus (a linearizable
/// read through node `via`); returns the consensus.
fn wait_replicas_hold_consensus(
    c: &Cluster,
    via: u64,
    reps: &[PathBuf],
) -> BTreeMap<String, String> {
    poll_until_showing(
        "every replica holds the group's consensus refs",
        PUSHES_GO_ON,
        || {
            let agreed = c.try_refs(via, GROUP, false)?;
            reps.iter()
                .all(|r| git::replicated_refs(r) == agreed)
                .then_some(agreed)
        },
        || {
            let mut s = format!("consensus: {:?}\n", c.try_refs(via, GROUP, false));
            for r in reps {
                s.push_str(&format!("{}: {:?}\n", r.display(), git::replicated_refs(r)));
            }
            s
        },
    )
}

/// Every acknowledged commit is in the history of the pusher's branch in
/// every replica.
fn assert_acks_kept(reps: &[PathBuf], acked: &[String]) {
    assert!(!acked.is_empty(), "no push was acknowledged");
    for r in reps {
        let history: HashSet<String> =
            git::git_ok(r, &["rev-list", &format!("refs/heads/{BRANCH}")])
                .lines()
                .map(str::to_string)
                .collect();
        let lost: Vec<&String> = acked.iter().filter(|c| !history.contains(*c)).collect();
        assert!(
            lost.is_empty(),
            "{} of {} acknowledged pushes are not in {BRANCH} of {}: {lost:?}",
            lost.len(),
            acked.len(),
            r.display()
        );
    }
}

/// The node ids with a replica of [`GROUP`] in the consensus, from
/// `piehole consensus export` through node `via`; None on failure.
fn try_registered_replicas(c: &Cluster, via: u64) -> Option<Vec<u64>> {
    let sock = c.socket(via);
    let o = c.run(&["consensus", "export", "--node", sock.to_str()?]);
    if !o.status.success() {
        return None;
    }
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    let replicas = doc["groups"][GROUP]["replicas"].as_object()?;
    let mut ids: Vec<u64> = replicas.keys().filter_map(|k| k.parse().ok()).collect();
    ids.sort_unstable();
    Some(ids)
}

fn registered_replicas(c: &Cluster, via: u64) -> Vec<u64> {
    try_registered_replicas(c, via).expect("consensus export")
}

/// Loads [`BULK`] refs of group "bulk" into the (empty) consensus with
/// `piehole consensus import` through node `via`, then [`AFTER_IMPORT`]
/// more refs one CAS (one log entry) each. Returns every ref of "bulk".
fn load_bulk(c: &Cluster, via: u64) -> BTreeMap<String, String> {
    let mut expected: BTreeMap<String, String> = (0..BULK)
        .map(|i| (format!("refs/tags/bulk/t{i}"), oid(i)))
        .collect();
    let doc = serde_json::json!({
        "format": "piehole-consensus/1",
        "groups": { "bulk": { "replicas": {}, "refs": &expected } },
    });
    let file = c.dir.path().join("bulk.json");
    std::fs::write(&file, serde_json::to_vec(&doc).unwrap()).expect("write the import");
    let sock = c.socket(via);
    let began = Instant::now();
    let o = c.run(&[
        "consensus",
        "import",
        file.to_str().unwrap(),
        "--node",
        sock.to_str().unwrap(),
    ]);
    git::assert_ok(&o, "piehole consensus import");
    eprintln!("imported {BULK} refs in {:?}", began.elapsed());

    let extra: Vec<(String, String)> = (0..AFTER_IMPORT)
        .map(|i| (format!("refs/heads/after/r{i}"), oid(BULK + i)))
        .collect();
    runtime().block_on(async {
        let mut client = c.client(via).await;
        for (name, value) in &extra {
            let out = client
                .cas("bulk", name, None, Some(value))
                .await
                .unwrap_or_else(|e| panic!("cas {name}: {e}"));
            assert!(out.applied, "cas {name}: {out:?}");
        }
    });
    expected.extend(extra);
    expected
}

/// Node `id`'s own copy of group "bulk" (a local read) is `expected`.
fn assert_bulk_refs(c: &Cluster, id: u64, expected: &BTreeMap<String, String>) {
    let got = runtime().block_on(async {
        c.client(id)
            .await
            .refs("bulk", false)
            .await
            .unwrap_or_else(|e| panic!("refs of bulk on node {id}: {e}"))
    });
    if &got != expected {
        let missing = expected.keys().filter(|k| !got.contains_key(*k)).count();
        let differ = expected
            .iter()
            .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
            .count();
        panic!(
            "node {id} holds {} refs of bulk, expected {}: {missing} missing, {differ} differ, {} extra",
            got.len(),
            expected.len(),
            got.keys().filter(|k| !expected.contains_key(*k)).count()
        );
    }
}

// ---------------------------------------------------------------------------
// The pusher

/// What the pusher saw.
#[derive(Default)]
struct PushLog {
    /// Commits whose push git reported successful, in order.
    acked: Vec<String>,
    /// Failed pushes: kind (see [`git::failure_kind`]) and git's stderr.
    failed: Vec<(&'static str, String)>,
}

impl PushLog {
    /// Every failed push failed with one of the `allowed` kinds.
    fn assert_failures_within(&self, allowed: &[&str]) {
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for (kind, _) in &self.failed {
            *kinds.entry(kind).or_insert(0) += 1;
        }
        eprintln!(
            "pusher: {} acknowledged, failed by kind {kinds:?}",
            self.acked.len()
        );
        let unexpected: Vec<&(&str, String)> = self
            .failed
            .iter()
            .filter(|(kind, _)| !allowed.contains(kind))
            .collect();
        assert!(
            unexpected.is_empty(),
            "{} pushes failed other than with a documented retry message; the first: {:#?}",
            unexpected.len(),
            unexpected.iter().take(3).collect::<Vec<_>>()
        );
    }
}

/// A thread that commits and pushes [`BRANCH`] to one replica in a loop
/// (each commit on top of the last, so every push is a fast-forward of
/// whatever the last one did), until stopped.
struct Pusher {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    thread: Option<JoinHandle<PushLog>>,
}

impl Pusher {
    fn start(c: &Cluster, replica: &Path) -> Pusher {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let path = c.dir.path().join("work-pusher");
        let replica = replica.to_path_buf();
        let thread = {
            let (stop, acked) = (stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let work = Work::init(&path);
                let err_path = path.join(".git").join("push.stderr");
                let mut log = PushLog::default();
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let commit = work.commit_file(
                        "pushes.txt",
                        format!("push {n}\n").as_bytes(),
                        &format!("push {n}"),
                    );
                    let refspec = format!("HEAD:refs/heads/{BRANCH}");
                    let args = ["push", replica.to_str().expect("UTF-8 path"), &refspec];
                    let (status, err) = git::push_bounded(&work, &err_path, &args, PUSH_BOUND);
                    match status {
                        Some(s) if s.success() => {
                            log.acked.push(commit);
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        Some(_) => {
                            log.failed.push((git::failure_kind(&err), err));
                            // Pacing the workload, not a wait for any
                            // state: a refusal comes fast while the node
                            // is down, and the loop need not spin.
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        None => log.failed.push(("hung", err)),
                    }
                }
                log
            })
        };
        Pusher {
            stop,
            acked,
            thread: Some(thread),
        }
    }

    /// Polls until `more` further pushes are acknowledged.
    fn wait_for_more(&self, more: usize, what: &str) {
        let from = self.acked.load(Ordering::SeqCst);
        poll_until(
            &format!("{what}: {more} more pushes acknowledged"),
            PUSHES_GO_ON,
            || {
                let finished = self.thread.as_ref().is_none_or(|t| t.is_finished());
                assert!(!finished, "the pusher stopped ({what})");
                (self.acked.load(Ordering::SeqCst) >= from + more).then_some(())
            },
        )
    }

    /// Stops the loop after the push in progress; what it saw.
    fn stop(mut self) -> PushLog {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("the pusher's thread")
            .join()
            .expect("the pusher panicked")
    }
}

impl Drop for Pusher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
