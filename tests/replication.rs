//! SPEC §7 scenario 1 and friends: real `git push` into bare repositories
//! with piehole's hooks, on a three-node cluster, and what shows up on the
//! other replicas.

#[path = "harness/mod.rs"]
mod harness;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use harness::git::{self, Work};
use harness::{Backend, Cluster};

const GROUP: &str = "proj";

/// Three nodes that reconcile every second, so a missed nudge costs little.
fn cluster(backend: &Backend) -> Cluster {
    Cluster::start_on(backend, 3, &["--reconcile-interval-ms", "1000"])
}

fn branches_and_tags_pushed_to_one_replica_appear_on_all(backend: Backend) {
    let c = cluster(&backend);
    let reps = git::replicas(&c, GROUP);
    let work = Work::new(&c, "alice");

    let first = work.commit("first");
    work.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, "refs/heads/main", Some(&first));

    let second = work.commit("second");
    work.git_ok(&["branch", "feature", &first]);
    work.git_ok(&["tag", "light", &first]);
    work.git_ok(&["tag", "-a", "v1.0", "-m", "release 1.0", &second]);
    let annotated = work.rev("refs/tags/v1.0");
    assert_ne!(annotated, second, "v1.0 should be an annotated tag object");
    work.push_ok(&reps[0], &["main", "feature"]);
    // Tags go to another replica, which by now has main (new refs: CAS from absent).
    git::wait_converged(&c, &reps, "refs/heads/main", Some(&second));
    work.push_ok(&reps[1], &["--tags"]);

    let expected: BTreeMap<String, String> = [
        ("refs/heads/main", second.as_str()),
        ("refs/heads/feature", first.as_str()),
        ("refs/tags/light", first.as_str()),
        ("refs/tags/v1.0", annotated.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    git::wait_all_refs(&c, &reps, &expected);
    assert_eq!(git::consensus(&c, 3, GROUP), expected);
    for r in &reps {
        // The annotated tag arrived as a tag object that peels to `second`.
        assert_eq!(git::git_ok(r, &["cat-file", "-t", "refs/tags/v1.0"]), "tag");
        assert_eq!(
            git::git_ok(r, &["rev-parse", "refs/tags/v1.0^{commit}"]),
            second
        );
        git::assert_refs_resolve(r);
    }
}

fn branch_deletion_replicates(backend: Backend) {
    let c = cluster(&backend);
    let reps = git::replicas(&c, GROUP);
    let work = Work::new(&c, "alice");
    let main = work.commit("main work");
    work.git_ok(&["branch", "topic"]);
    work.git_ok(&["checkout", "--quiet", "topic"]);
    let topic = work.commit("topic work");
    work.push_ok(&reps[0], &["main", "topic"]);
    git::wait_converged(&c, &reps, "refs/heads/main", Some(&main));
    git::wait_converged(&c, &reps, "refs/heads/topic", Some(&topic));

    // Delete through a different replica than the one that created it.
    work.push_ok(&reps[2], &["--delete", "topic"]);
    git::wait_converged(&c, &reps, "refs/heads/topic", None);
    git::wait_converged(&c, &reps, "refs/heads/main", Some(&main));
    let consensus = git::consensus(&c, 1, GROUP);
    assert!(
        !consensus.contains_key("refs/heads/topic"),
        "the consensus still has the deleted branch: {consensus:?}"
    );
    assert_eq!(consensus.get("refs/heads/main"), Some(&main));
}

/// Outcome of one push in a race: did it go through, and what did git say.
struct Attempt {
    ok: bool,
    stderr: String,
}

/// Two users push conflicting commits on the same base at the same moment,
/// A to replica 1 and B to replica 2, for three rounds. Each round exactly
/// one push wins; the loser is told to pull and push again, and no replica
/// ever holds the loser's commit, only the base or the winner's. The loser
/// pushed to a replica that is behind the group (the winner's commit had
/// not reached it when git read its refs), so piehole's hook is what
/// refuses it; git refuses on its own ("fetch first") only if the winner
/// had already replicated there, which a round may see but not every round:
/// piehole's retry message must show at least once. After a pull the
/// loser's push goes through.
fn concurrent_conflicting_pushes_one_wins_and_replicas_never_diverge(backend: Backend) {
    let c = cluster(&backend);
    let reps = git::replicas(&c, GROUP);
    let seed = Work::new(&c, "seed");
    let mut base = seed.commit("base");
    seed.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, "refs/heads/main", Some(&base));

    let a = Work::clone_from(&c, "a", &reps[0]);
    let b = Work::clone_from(&c, "b", &reps[1]);
    let mut told_by_piehole = 0;
    for round in 0..3 {
        let ca = a.commit(&format!("a round {round}"));
        let cb = b.commit(&format!("b round {round}"));
        assert_ne!(ca, cb);

        let barrier = Arc::new(Barrier::new(2));
        let race = |work_path: PathBuf, remote: PathBuf, barrier: Arc<Barrier>| {
            std::thread::spawn(move || {
                barrier.wait();
                let out = git::git(&work_path, &["push", remote.to_str().unwrap(), "main"]);
                Attempt {
                    ok: out.status.success(),
                    stderr: harness::stderr(&out),
                }
            })
        };
        let ta = race(a.path.clone(), reps[0].clone(), barrier.clone());
        let tb = race(b.path.clone(), reps[1].clone(), barrier);
        let (ra, rb) = (ta.join().unwrap(), tb.join().unwrap());
        assert!(
            ra.ok != rb.ok,
            "round {round}: exactly one push must win; A ok={} B ok={}\nA: {}\nB: {}",
            ra.ok,
            rb.ok,
            ra.stderr,
            rb.stderr
        );
        let a_won = ra.ok;
        let (winner, loser_commit, loser, loser_work, loser_rep) = if ra.ok {
            (ca.clone(), cb.clone(), rb, &b, &reps[1])
        } else {
            (cb.clone(), ca.clone(), ra, &a, &reps[0])
        };
        // The loser is told to pull and push again: by piehole's hook, or
        // by git itself if the winner had already replicated there (then
        // git saw a commit the loser lacks: "fetch first").
        let told_to_retry = loser.stderr.contains("this replica is catching up")
            && loser.stderr.contains("pull and push again");
        let git_said_behind = loser.stderr.contains("(fetch first)");
        assert!(
            told_to_retry || git_said_behind,
            "round {round}: the losing push should be told to retry:\n{}",
            loser.stderr
        );
        if told_to_retry {
            told_by_piehole += 1;
        }
        eprintln!(
            "round {round}: {} won; loser told by {}",
            if a_won {
                "A (replica 1)"
            } else {
                "B (replica 2)"
            },
            if told_to_retry {
                "piehole's hook"
            } else {
                "git (already replicated)"
            }
        );
        if told_to_retry {
            assert!(
                loser
                    .stderr
                    .contains("remote: refs/heads/main: this replica is catching up"),
                "the retry message starts with the ref name:\n{}",
                loser.stderr
            );
        }

        // Never diverge: while converging, every replica holds base or the winner, never the loser.
        harness::poll_until_showing(
            &format!("round {round}: every replica at the winner"),
            git::CONVERGE,
            || {
                let values: Vec<_> = reps
                    .iter()
                    .map(|r| git::rev_parse_ref(r, "refs/heads/main"))
                    .collect();
                for v in &values {
                    assert!(
                        v.as_deref() == Some(&base) || v.as_deref() == Some(&winner),
                        "round {round}: a replica holds {v:?}, neither base {base} nor winner {winner} (loser {loser_commit})"
                    );
                }
                values
                    .iter()
                    .all(|v| v.as_deref() == Some(&winner))
                    .then_some(())
            },
            || {
                format!(
                    "{:?}",
                    reps.iter().map(|r| git::refs(r)).collect::<Vec<_>>()
                )
            },
        );
        assert_eq!(
            git::consensus(&c, 1, GROUP).get("refs/heads/main"),
            Some(&winner)
        );

        // Pull (rebase) and push again, as the message says: it works.
        let out = loser_work.git(&[
            "pull",
            "--quiet",
            "--rebase",
            loser_rep.to_str().unwrap(),
            "main",
        ]);
        git::assert_ok(&out, "git pull --rebase after losing the race");
        loser_work.push_ok(loser_rep, &["main"]);
        let merged = loser_work.head();
        git::wait_converged(&c, &reps, "refs/heads/main", Some(&merged));
        // Both clones start the next round from the same tip.
        let out = a.pull(&reps[0], "main");
        git::assert_ok(&out, "a: git pull");
        let out = b.pull(&reps[1], "main");
        git::assert_ok(&out, "b: git pull");
        assert_eq!(a.head(), merged);
        assert_eq!(b.head(), merged);
        base = merged;
    }
    assert!(
        told_by_piehole > 0,
        "in 3 rounds no losing push reached piehole's hook: git refused every one itself"
    );
    for r in &reps {
        git::fsck(r);
    }
}

fn large_push_replicates_and_every_replica_clones_clean(backend: Backend) {
    let c = cluster(&backend);
    let reps = git::replicas(&c, GROUP);
    let work = Work::new(&c, "big");
    work.commit("root");
    let tip = work.fast_import_commits("main", 1000);
    assert_eq!(
        work.git_ok(&["rev-list", "--count", "main"]),
        "1001",
        "fast-import made the history"
    );
    let big = git::random_bytes(0x5eed_2024, 20 * 1024 * 1024);
    let tip = {
        let t = work.commit_file("blob.bin", &big, "a 20 MB binary");
        assert_ne!(t, tip);
        t
    };
    work.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, "refs/heads/main", Some(&tip));
    for r in &reps {
        assert_eq!(git::git_ok(r, &["rev-list", "--count", "main"]), "1002");
        git::fsck_clone(r);
    }
    // The binary survived byte for byte on the farthest replica.
    let out = git::git(&reps[2], &["cat-file", "blob", "main:blob.bin"]);
    git::assert_ok(&out, "cat-file the big blob");
    assert!(out.stdout == big, "the 20 MB blob differs on replica 3");
}

fn status_shows_each_replica_with_consensus_and_local_values(backend: Backend) {
    let c = cluster(&backend);
    let reps = git::replicas(&c, GROUP);
    let work = Work::new(&c, "alice");
    let head = work.commit("one");
    work.push_ok(&reps[1], &["main"]);
    git::wait_converged(&c, &reps, "refs/heads/main", Some(&head));

    let status = harness::poll_until(
        "status to report all three replicas in step",
        Duration::from_secs(20),
        || {
            let s = c.status(1);
            let rows: Vec<_> = s["replicas"]
                .as_array()?
                .iter()
                .filter(|r| r["group"] == GROUP && r["ref"] == "refs/heads/main")
                .cloned()
                .collect();
            let mut nodes: Vec<u64> = rows.iter().filter_map(|r| r["node_id"].as_u64()).collect();
            nodes.sort();
            let in_step = rows.iter().all(|r| {
                r["consensus"] == head.as_str()
                    && r["local"] == head.as_str()
                    && r["differs_since_unix_ms"].is_null()
            });
            (nodes == [1, 2, 3] && in_step).then_some(s)
        },
    );
    assert_eq!(status["node_id"], 1);
    if backend.is_etcd() {
        assert_eq!(status["backend"], "etcd", "{status}");
        assert!(
            status["store"]
                .as_str()
                .is_some_and(|s| s.starts_with("etcd at ")),
            "{status}"
        );
    } else {
        assert!(
            status["leader_id"].as_u64().is_some_and(|l| l > 0),
            "{status}"
        );
    }
    assert_eq!(
        status["members"].as_array().map(|m| m.len()),
        Some(3),
        "{status}"
    );

    // Lag is visible: a consensus value no replica can satisfy (an object
    // nobody has) shows every replica behind, with a "since" time.
    let ghost = "1234567890abcdef1234567890abcdef12345678";
    let out = c.cas(2, GROUP, "refs/heads/ghost", harness::ZERO, ghost);
    git::assert_ok(&out, "ref cas refs/heads/ghost");
    harness::poll_until(
        "status to report every replica behind on refs/heads/ghost",
        Duration::from_secs(20),
        || {
            let s = c.status(3);
            let rows: Vec<_> = s["replicas"]
                .as_array()?
                .iter()
                .filter(|r| r["group"] == GROUP && r["ref"] == "refs/heads/ghost")
                .cloned()
                .collect();
            let mut nodes: Vec<u64> = rows.iter().filter_map(|r| r["node_id"].as_u64()).collect();
            nodes.sort();
            let behind = rows.iter().all(|r| {
                r["consensus"] == ghost
                    && r["local"].as_str().unwrap_or("").is_empty()
                    && r["differs_since_unix_ms"].as_u64().is_some()
            });
            (nodes == [1, 2, 3] && behind).then_some(())
        },
    );
    // No replica moved to the unsatisfiable value; main is untouched.
    for r in &reps {
        assert_eq!(git::rev_parse_ref(r, "refs/heads/ghost"), None);
        assert_eq!(
            git::rev_parse_ref(r, "refs/heads/main").as_deref(),
            Some(head.as_str())
        );
    }
}

on_both_backends!(
    branches_and_tags_pushed_to_one_replica_appear_on_all,
    branch_deletion_replicates,
    concurrent_conflicting_pushes_one_wins_and_replicas_never_diverge,
    large_push_replicates_and_every_replica_clones_clean,
    status_shows_each_replica_with_consensus_and_local_values,
);
