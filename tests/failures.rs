//! SPEC §7 failure scenarios 2–8, each against a real three-node cluster
//! with bare replicas, piehole's hooks and real `git push`; plus a node
//! SIGKILLed in the middle of a large replication.

#[path = "harness/mod.rs"]
mod harness;

use std::time::Duration;

use harness::git::{self, Work};
use harness::Cluster;

const GROUP: &str = "proj";
const MAIN: &str = "refs/heads/main";

/// Three nodes that reconcile every second.
fn cluster() -> Cluster {
    Cluster::start_with(3, &["--reconcile-interval-ms", "1000"])
}

/// The retry message of update rule 4, as git shows it to the pusher.
#[track_caller]
fn assert_told_to_retry(out: &std::process::Output, group_has: &str) {
    git::assert_failed_with(
        out,
        "push to a replica that is behind",
        "remote: refs/heads/main: this replica is catching up (the group has ",
    );
    let err = harness::stderr(out);
    assert!(
        err.contains("pull and push again"),
        "{}",
        harness::show(out)
    );
    assert!(
        err.contains(&group_has[..12]),
        "the message names the group's value {group_has}:\n{}",
        harness::show(out)
    );
}

/// Scenario 2, deterministic: replica 3's ref is behind the consensus while
/// its node runs (rewound behind piehole's back; the periodic reconcile is
/// slowed down so it stays behind). A push based on the stale value is told
/// to retry, the replica is pulled forward on the spot, and pull + push works.
/// A push that already builds on the group's value is accepted at once (rule 3).
#[test]
fn out_of_date_replica_rejects_stale_push_then_pull_and_push_works() {
    let c = Cluster::start_with(3, &["--reconcile-interval-ms", "60000"]);
    let reps = git::replicas(&c, GROUP);
    let alice = Work::new(&c, "alice");
    let c1 = alice.commit("c1");
    alice.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c1));
    let bob = Work::clone_from(&c, "bob", &reps[2]);

    let c2 = alice.commit("c2");
    alice.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c2));
    // Replica 3 falls behind: its main goes back to c1 (objects of c2 stay).
    git::git_ok(&reps[2], &["update-ref", MAIN, &c1, &c2]);

    // Bob, stale at c1, commits and pushes to replica 3, which agrees with him.
    let b1 = bob.commit("bob on c1");
    let out = bob.push(&reps[2], &["main"]);
    assert_told_to_retry(&out, &c2);
    // Nothing moved to Bob's commit anywhere; replica 3 was brought to c2.
    assert_eq!(git::consensus(&c, 3, GROUP).get(MAIN), Some(&c2));
    git::wait_converged(&c, &reps, MAIN, Some(&c2));

    // Pull and push again, as told.
    let out = bob.git(&[
        "pull",
        "--quiet",
        "--rebase",
        reps[2].to_str().unwrap(),
        "main",
    ]);
    git::assert_ok(&out, "bob: git pull --rebase");
    let b2 = bob.head();
    assert_ne!(b2, b1);
    bob.push_ok(&reps[2], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&b2));

    // Rule 3: replica 2 is behind again, but Alice's push descends from the
    // group's value and carries its objects: accepted on the first try.
    git::git_ok(&reps[1], &["update-ref", MAIN, &c2, &b2]);
    alice.pull(&reps[2], "main");
    assert_eq!(alice.head(), b2);
    let a3 = alice.commit("alice on top of the group");
    alice.push_ok(&reps[1], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&a3));
    assert_eq!(git::consensus(&c, 1, GROUP).get(MAIN), Some(&a3));
}

/// Scenario 2, as it happens: node 3 is down while the group moves on; the
/// moment it is back, pushes reach its replica before or while it catches up.
/// Work that builds on the group's value is accepted (rule 3 or plain CAS);
/// stale work is told to retry (by the hook, or by git if the replica has
/// already caught up); after a pull, the push works.
#[test]
fn replica_whose_node_was_down_accepts_descendants_and_rejects_stale_work() {
    let mut c = cluster();
    let reps = git::replicas(&c, GROUP);
    let alice = Work::new(&c, "alice");
    let c1 = alice.commit("c1");
    alice.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c1));
    let stale = Work::clone_from(&c, "stale", &reps[2]);

    c.kill(3);
    let c2 = alice.commit("c2");
    alice.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps[..2], MAIN, Some(&c2));
    assert_eq!(git::rev_parse_ref(&reps[2], MAIN), Some(c1.clone()));

    let a3 = alice.commit("a3 on c2");
    let u1 = stale.commit("u1 on c1");
    c.restart(3);
    // At once: Alice's work descends from the group's value.
    alice.push_ok(&reps[2], &["main"]);
    // The stale user's work does not.
    let out = stale.push(&reps[2], &["main"]);
    assert!(
        !out.status.success(),
        "a stale push must not win:\n{}",
        harness::show(&out)
    );
    let err = harness::stderr(&out);
    assert!(
        err.contains("pull and push again")
            || err.contains("fetch first")
            || err.contains("non-fast-forward"),
        "the stale pusher is told to pull first:\n{err}"
    );
    git::wait_converged(&c, &reps, MAIN, Some(&a3));

    let out = stale.git(&[
        "pull",
        "--quiet",
        "--rebase",
        reps[2].to_str().unwrap(),
        "main",
    ]);
    git::assert_ok(&out, "stale: git pull --rebase");
    let u2 = stale.head();
    assert_ne!(u2, u1);
    stale.push_ok(&reps[2], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&u2));
    for r in &reps {
        git::fsck(r);
    }
}

/// Scenario 3, for real: the origin's node is SIGKILLed right after the push
/// and its repository destroyed. The user pushes the same commit to another
/// replica (accepted), then newer work (accepted); replicas 2 and 3 converge.
#[test]
fn meteor_origin_destroyed_user_pushes_same_then_newer_work_elsewhere() {
    let mut c = cluster();
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "laptop");
    let c1 = user.commit("c1");
    user.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c1));

    let c2 = user.commit("c2 at home");
    user.push_ok(&reps[0], &["main"]);
    c.kill(1);
    std::fs::remove_dir_all(&reps[0]).expect("destroy replica 1");

    // From the coffeehouse: the same work, to replica 2.
    user.push_ok(&reps[1], &["main"]);
    let survivors = &reps[1..];
    git::wait_converged(&c, survivors, MAIN, Some(&c2));
    // And newer work.
    let c3 = user.commit("c3 at the coffeehouse");
    user.push_ok(&reps[2], &["main"]);
    git::wait_converged(&c, survivors, MAIN, Some(&c3));
    assert_eq!(git::consensus(&c, 2, GROUP).get(MAIN), Some(&c3));
    for r in survivors {
        git::fsck(r);
        git::assert_refs_resolve(r);
    }
}

/// Scenario 3, made deterministic: the consensus names a commit that no
/// replica has (the origin accepted it and vanished before any peer fetched
/// it). Pushing the same commit to another replica recovers on the first
/// push (rule 1); so does pushing newer work on top of it (rule 3).
#[test]
fn meteor_consensus_ahead_of_every_replica_recovers_on_first_push() {
    let c = cluster();
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "laptop");
    let c1 = user.commit("c1");
    user.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c1));

    // The lost push: only the user's laptop has c2.
    let c2 = user.commit("c2, lost with its server");
    c.cas_ok(1, GROUP, MAIN, &c1, &c2);
    // Same work, to replica 2: accepted, and everyone fetches it from there.
    user.push_ok(&reps[1], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c2));

    // Again, but the user made more commits before pushing (to replica 3).
    let c3 = user.commit("c3, lost with its server");
    c.cas_ok(2, GROUP, MAIN, &c2, &c3);
    let c4 = user.commit("c4, made at the coffeehouse");
    user.push_ok(&reps[2], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c4));
    assert_eq!(git::consensus(&c, 1, GROUP).get(MAIN), Some(&c4));
    for r in &reps {
        git::fsck(r);
    }
}

/// Scenario 4: a consensus value no replica can satisfy. Pushes fail with a
/// clear message (and replicas never move to it) until an operator runs
/// `piehole clobber` in a good replica; then the group works again.
#[test]
fn poisoned_consensus_blocks_pushes_until_clobber() {
    let c = cluster();
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "alice");
    let c1 = user.commit("c1");
    user.git_ok(&["tag", "v1"]);
    user.push_ok(&reps[0], &["main", "v1"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c1));
    git::wait_converged(&c, &reps, "refs/tags/v1", Some(&c1));
    let good = git::replicated_refs(&reps[1]);

    let poison = "badbadbadbadbadbadbadbadbadbadbadbadbad0";
    c.cas_ok(3, GROUP, MAIN, &c1, poison);
    c.cas_ok(3, GROUP, "refs/heads/bogus", harness::ZERO, poison);

    let c2 = user.commit("c2");
    for (i, r) in reps.iter().enumerate() {
        let out = user.push(r, &["main"]);
        assert!(!out.status.success(), "push to replica {} must fail", i + 1);
        assert_told_to_retry(&out, poison);
    }
    // `piehole check` names the problem; no replica moved to the poison.
    let out = git::check(&reps[0]);
    git::assert_failed_with(
        &out,
        "piehole check",
        "refs/heads/main differs from the consensus",
    );
    for r in &reps {
        assert_eq!(git::replicated_refs(r), good, "{}", r.display());
    }

    // The poison also created a ref no replica has: clobber removes it
    // only when asked to.
    let out = git::clobber(&reps[1]);
    git::assert_failed_with(&out, "piehole clobber without --prune", "refs/heads/bogus");
    let out = git::piehole_in(&reps[1], &["clobber", "--prune"]);
    git::assert_ok(&out, "piehole clobber --prune in replica 2");
    assert_eq!(git::consensus(&c, 1, GROUP), good);
    let out = git::check(&reps[0]);
    git::assert_ok(&out, "piehole check after clobber");

    user.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c2));
    git::wait_converged(&c, &reps, "refs/heads/bogus", None);
}

/// Scenario 5: the consensus is rewound to an earlier commit. Replicas
/// follow it back; pushes of the later work catch the group up again.
#[test]
fn overrun_consensus_rewound_replicas_follow_and_pushes_catch_up() {
    let c = cluster();
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "alice");
    let c1 = user.commit("c1");
    user.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c1));
    user.commit("c2");
    let c3 = user.commit("c3");
    user.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c3));

    c.cas_ok(2, GROUP, MAIN, &c3, &c1);
    git::wait_converged(&c, &reps, MAIN, Some(&c1));

    // The user's copy still has c3: pushing it catches the group up.
    user.push_ok(&reps[1], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c3));
    let c4 = user.commit("c4");
    user.push_ok(&reps[2], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c4));
    for r in &reps {
        git::fsck(r);
    }
}

/// Scenario 6: a replica wiped and re-created from scratch (`git init
/// --bare` + `piehole install`) catches up to every ref, and takes pushes.
#[test]
fn replica_recreated_from_scratch_catches_up() {
    let c = cluster();
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "alice");
    user.commit("c1");
    user.git_ok(&["tag", "-a", "v1", "-m", "one"]);
    user.git_ok(&["branch", "side"]);
    user.commit("c2");
    user.push_ok(&reps[0], &["main", "side", "v1"]);
    let expected = git::replicated_refs(&reps[0]);
    assert_eq!(expected.len(), 3, "{expected:?}");
    git::wait_all_refs(&c, &reps, &expected);

    std::fs::remove_dir_all(&reps[2]).expect("wipe replica 3");
    git::init_bare(&reps[2]);
    let out = git::install(&c, 3, &reps[2]);
    git::assert_ok(&out, "piehole install in the re-created replica");
    assert!(
        !harness::stdout(&out).contains("consensus now starts from"),
        "an empty re-created replica must not seed the group:\n{}",
        harness::show(&out)
    );
    assert_eq!(git::consensus(&c, 1, GROUP), expected);
    git::wait_all_refs(&c, &reps, &expected);
    git::fsck_clone(&reps[2]);
    let out = git::check(&reps[2]);
    git::assert_ok(&out, "piehole check in the re-created replica");

    let c3 = user.commit("c3");
    user.push_ok(&reps[2], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c3));
}

/// Scenario 7: the node on the host receiving the push is down. The push
/// fails saying the local piehole node is unreachable; nothing changes in
/// any replica or in the consensus.
#[test]
fn push_with_local_node_down_fails_as_unreachable_and_changes_nothing() {
    let mut c = cluster();
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "alice");
    let c1 = user.commit("c1");
    user.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c1));
    let before = git::replicated_refs(&reps[0]);
    let consensus_before = git::consensus(&c, 1, GROUP);

    c.kill(2);
    user.commit("c2");
    user.git_ok(&["tag", "v2"]);
    let out = user.push(&reps[1], &["main", "v2"]);
    git::assert_failed_with(
        &out,
        "push with node 2 down",
        "the local piehole node is unreachable at ",
    );
    let err = harness::stderr(&out);
    let sock = c.socket(2);
    assert!(
        err.contains(sock.to_str().unwrap()),
        "names the socket:\n{err}"
    );
    assert!(
        err.contains("remote: refs/heads/main: "),
        "names the ref:\n{err}"
    );
    assert!(
        err.contains("nothing was changed, try again later"),
        "{err}"
    );

    for r in &reps {
        assert_eq!(git::replicated_refs(r), before, "{}", r.display());
    }
    assert_eq!(git::consensus(&c, 1, GROUP), consensus_before);
    c.restart(2);
    let out = git::check(&reps[1]);
    git::assert_ok(&out, "piehole check once node 2 is back");
    for r in &reps {
        assert_eq!(git::replicated_refs(r), before, "{}", r.display());
    }
}

/// Scenario 8: the leader dies; the other two elect a new one and pushes to
/// their replicas go on. With a second node gone, the last one rejects a push
/// with "no quorum" within the configured bound, and still serves local reads.
#[test]
fn leader_lost_pushes_continue_then_minority_says_no_quorum() {
    let mut c = Cluster::start_with(
        3,
        &[
            "--request-timeout-ms",
            "3000",
            "--reconcile-interval-ms",
            "1000",
        ],
    );
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "alice");
    let c1 = user.commit("c1");
    user.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c1));

    let leader = c.wait_leader();
    c.kill(leader);
    let survivors: Vec<u64> = (1..=3).filter(|&i| i != leader).collect();
    let (s1, s2) = (survivors[0], survivors[1]);
    let rep = |id: u64| reps[(id - 1) as usize].clone();

    // Right away, without waiting for the election.
    let c2 = user.commit("c2");
    user.push_ok(&rep(s1), &["main"]);
    let new_leader = c.wait_leader();
    assert_ne!(new_leader, leader);
    git::wait_converged(&c, &[rep(s1), rep(s2)], MAIN, Some(&c2));
    let c3 = user.commit("c3");
    user.push_ok(&rep(s2), &["main"]);
    git::wait_converged(&c, &[rep(s1), rep(s2)], MAIN, Some(&c3));

    // Now a minority of one.
    c.kill(s1);
    let before = git::replicated_refs(&rep(s2));
    user.commit("c4");
    // Within the bound: request timeout 3 s, plus a margin.
    user.push_main_says_no_quorum(&rep(s2), Duration::from_secs(10));
    assert_eq!(git::replicated_refs(&rep(s2)), before);
    // Reads still work on the minority side.
    let local =
        git::consensus_local(&c, s2, GROUP).expect("ref get --local answers without a quorum");
    assert_eq!(local.get(MAIN), Some(&c3));

    // A majority again: the same push goes through.
    c.restart(s1);
    let c4 = user.head();
    harness::poll_until(
        "a push to succeed once a majority is back",
        Duration::from_secs(30),
        || {
            user.push(&rep(s2), &["main"])
                .status
                .success()
                .then_some(())
        },
    );
    git::wait_converged(&c, &[rep(s1), rep(s2)], MAIN, Some(&c4));
}

/// A node SIGKILLed in the middle of replicating a large push (~30 MB) and
/// restarted: replication completes, and every replica passes `git fsck
/// --full` with no ref pointing at a missing object.
#[test]
fn node_killed_during_large_replication_completes_after_restart() {
    let mut c = cluster();
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "big");
    user.commit("root");
    user.fast_import_commits("main", 300);
    for i in 0..3u64 {
        let data = git::random_bytes(0xb16_0000 + i, 10 * 1024 * 1024);
        user.commit_file(&format!("big-{i}.bin"), &data, &format!("10 MB blob {i}"));
    }
    let tip = user.head();
    user.push_ok(&reps[0], &["main"]);
    c.kill(2);
    c.restart(2);
    git::wait_converged(&c, &reps, MAIN, Some(&tip));
    for r in &reps {
        git::fsck(r);
        git::assert_refs_resolve(r);
    }
    git::fsck_clone(&reps[1]);
}
