//! Each test reproduces a defect found on main of 2026-11-25 (issue 7); each
//! failed there.
//!
//! Like the other integration tests: real `piehole node` processes, bare
//! replicas with piehole's hooks and real `git push`; every wait is bounded.

#[path = "harness/mod.rs"]
mod harness;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use harness::git::{self, Work};
use harness::nemesis::Frozen;
use harness::sampler::RefSampler;
use harness::ZERO;
use harness::{Backend, Cluster};

const GROUP: &str = "proj";
const MAIN: &str = "refs/heads/main";

/// Three nodes that reconcile every second.
fn cluster(backend: &Backend) -> Cluster {
    Cluster::start_on(backend, 3, &["--reconcile-interval-ms", "1000"])
}

/// Three nodes whose periodic reconcile does not come during the test, so a
/// replica put behind the group behind piehole's back stays behind.
fn slow_reconcile_cluster(backend: &Backend) -> Cluster {
    Cluster::start_on(backend, 3, &["--reconcile-interval-ms", "60000"])
}

/// Replicas on every node, with `main` pushed and replicated; returns them
/// and the pusher.
fn group_with_main(c: &Cluster) -> (Vec<PathBuf>, Work, String) {
    let reps = git::replicas(c, GROUP);
    let user = Work::new(c, "alice");
    let c1 = user.commit("c1");
    user.push_ok(&reps[0], &["main"]);
    git::wait_converged(c, &reps, MAIN, Some(&c1));
    (reps, user, c1)
}

/// Every replica's refs and what each running node has applied, for the
/// message of a timed-out wait.
fn state(c: &Cluster, reps: &[PathBuf]) -> String {
    let mut s = String::new();
    for r in reps {
        s.push_str(&format!("{}: {:?}\n", r.display(), git::replicated_refs(r)));
        let mut locks = Vec::new();
        lock_files(&r.join("refs"), &mut locks);
        if !locks.is_empty() {
            // A process killed mid-update leaves these, and they block the ref for good.
            s.push_str(&format!("  lock files: {locks:?}\n"));
        }
    }
    for id in c.running_ids() {
        s.push_str(&format!(
            "node {id} consensus (local read): {:?}\n",
            git::consensus_local(c, id, GROUP)
        ));
    }
    s
}

/// Every `*.lock` file under `dir`, recursively.
fn lock_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            lock_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "lock") {
            found.push(path);
        }
    }
}

/// Replaces every piehole hook in `repo` by a shell script whose body is
/// `body`; the original stays next to it as `NAME.real` (so `"$0.real"` runs it).
fn wrap_piehole_hooks(repo: &Path, body: &str) {
    let dir = repo.join("hooks");
    let mut wrapped = 0;
    for entry in std::fs::read_dir(&dir).expect("read the hooks directory") {
        let path = entry.expect("hooks directory entry").path();
        let Ok(content) = std::fs::read_to_string(&path) else {
            continue;
        };
        if !content.contains("piehole-managed") {
            continue;
        }
        let real = PathBuf::from(format!("{}.real", path.display()));
        std::fs::rename(&path, &real).expect("move the hook aside");
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).expect("write the wrapper");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("make the wrapper executable");
        wrapped += 1;
    }
    assert!(wrapped > 0, "no piehole hook found in {}", dir.display());
}

/// Waits for `child` at most `bound`; kills it and returns None if it is still running.
fn wait_bounded(child: &mut Child, bound: Duration) -> Option<ExitStatus> {
    let status = harness::poll(harness::POLL_EVERY, bound, || {
        child.try_wait().expect("try_wait")
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    status
}

/// Polls `f` for at most `bound`; whether it came true. For a wait whose
/// failure must not end the test before other checks ran.
fn eventually(bound: Duration, mut f: impl FnMut() -> bool) -> bool {
    harness::poll(harness::POLL_EVERY, bound, || f().then_some(())).is_some()
}

/// The commit index once every node has applied everything committed and
/// they all agree, so a later difference counts only what came in between.
fn settled_commit_index(c: &Cluster) -> u64 {
    harness::poll_until(
        "every node to have applied the same commit index",
        Duration::from_secs(20),
        || {
            let mut seen = Vec::new();
            for id in c.ids() {
                let s = c.try_status(id)?;
                let (commit, applied) = (s["commit_index"].as_u64()?, s["applied_index"].as_u64()?);
                if commit != applied {
                    return None;
                }
                seen.push(commit);
            }
            seen.windows(2).all(|w| w[0] == w[1]).then(|| seen[0])
        },
    )
}

/// Three nodes; each round pushes a commit to replica 1, then at once
/// SIGKILLs nodes 2 and 3, restarts both and waits until every replica has
/// the commit. Throughout, replicas 2 and 3 are sampled every millisecond or
/// so: their main may only ever move to a descendant of what it was (SPEC §3,
/// monotonic replicas), and never disappear. A replica that does not reach
/// a round's commit within 30 s fails the test too, after the step-back check.
fn double_crash_after_push_never_steps_a_replica_back(backend: Backend) {
    let mut c = cluster(&backend);
    let (reps, user, _) = group_with_main(&c);
    let sampler = RefSampler::start(&reps[1..], MAIN);
    // A replica stuck behind is reported after the step back that usually causes it.
    let mut stuck = None;
    for round in 1..=6 {
        let tip = user.commit(&format!("round {round}"));
        user.push_ok(&reps[0], &["main"]);
        c.kill(2);
        c.kill(3);
        c.restart(2);
        c.restart(3);
        let converged = eventually(git::CONVERGE, || {
            reps.iter()
                .all(|r| git::rev_parse_ref(r, MAIN).as_deref() == Some(&tip))
        });
        if !converged {
            stuck = Some(format!(
                "round {round}: main = {tip} not in every replica after {:?}:\n{}",
                git::CONVERGE,
                state(&c, &reps)
            ));
            break;
        }
    }
    let histories = sampler.stop();
    // Replica 1 took every push, so it has every commit the others showed.
    let violations: Vec<String> = histories
        .iter()
        .flat_map(|h| h.violations(&reps[0]))
        .collect();
    let seen: Vec<String> = histories.iter().map(|h| h.summary()).collect();
    assert!(
        violations.is_empty(),
        "a replica's main stepped back:\n{}\n(sampled: {seen:#?}){}",
        violations.join("\n"),
        stuck
            .as_deref()
            .map(|s| format!("\nthen {s}"))
            .unwrap_or_default()
    );
    assert!(stuck.is_none(), "{}", stuck.unwrap_or_default());
}

/// Replica 1's hooks are wrapped so that each exits 1 right after the real
/// hook answered: the hook process dies after the node accepted. A new
/// commit is pushed there (whether git reports success does not matter).
/// Within 8 s every replica's main equals the consensus, and the consensus
/// is the pushed commit or the one before it: nothing the node did for the
/// dead hook may keep a replica behind for long.
fn a_hook_that_dies_after_the_node_accepted_delays_convergence_by_seconds_at_most(
    backend: Backend,
) {
    // Both hook paths: proc-receive (git 2.29+), where the node moves the
    // ref itself, and the update hook of older git, where git does and the
    // node holds the ref for it until a deadline.
    for hooks in [&[][..], &["--hook", "update"][..]] {
        let c = cluster(&backend);
        let reps: Vec<PathBuf> = (1..=3)
            .map(|id| {
                let repo = git::bare_repo(&c, id, GROUP);
                git::assert_ok(&git::install_with(&c, id, &repo, hooks), "install");
                repo
            })
            .collect();
        let user = Work::new(&c, "alice");
        let c1 = user.commit("c1");
        user.push_ok(&reps[0], &["main"]);
        git::wait_converged(&c, &reps, MAIN, Some(&c1));
        wrap_piehole_hooks(&reps[0], "\"$0.real\" \"$@\"\nexit 1\n");
        let c2 = user.commit("c2, its hook dies");
        let _ = user.push(&reps[0], &["main"]);
        harness::poll_until_showing(
            &format!("every replica's main to equal the consensus (c1 or c2), hooks {hooks:?}"),
            Duration::from_secs(8),
            || {
                let agreed = git::consensus(&c, 1, GROUP).get(MAIN).cloned()?;
                let ok = (agreed == c1 || agreed == c2)
                    && reps
                        .iter()
                        .all(|r| git::rev_parse_ref(r, MAIN).as_deref() == Some(&agreed));
                ok.then_some(())
            },
            || format!("c1 {c1}\nc2 {c2}\n{}", state(&c, &reps)),
        );
    }
}

/// The consensus of refs/heads/lost names an object no replica has (nor can
/// have). A new branch pushed to replica 1 still reaches replicas 2 and 3
/// within 10 s, and `piehole check` in replica 2 fails naming
/// refs/heads/lost as a ref no replica has, with `clobber` as the way out.
fn a_ref_no_replica_can_serve_does_not_block_other_refs(backend: Backend) {
    const LOST: &str = "refs/heads/lost";
    const FRESH: &str = "refs/heads/fresh";
    let c = cluster(&backend);
    let (reps, user, _) = group_with_main(&c);
    // Not the hash of anything git would write.
    let nowhere = "badbadbadbadbadbadbadbadbadbadbadbadbad1";
    c.cas_ok(1, GROUP, LOST, ZERO, nowhere);

    user.git_ok(&["checkout", "--quiet", "-b", "fresh"]);
    let fresh = user.commit("fresh work");
    user.push_ok(&reps[0], &["fresh"]);
    harness::poll_until_showing(
        "refs/heads/fresh on replicas 2 and 3",
        Duration::from_secs(10),
        || {
            reps[1..]
                .iter()
                .all(|r| git::rev_parse_ref(r, FRESH).as_deref() == Some(&fresh))
                .then_some(())
        },
        || state(&c, &reps),
    );

    let out = git::check(&reps[1]);
    assert!(
        !out.status.success(),
        "check must fail:\n{}",
        harness::show(&out)
    );
    let err = harness::stderr(&out);
    assert!(
        err.lines()
            .any(|l| l.contains(LOST) && l.contains("no replica has it") && l.contains("clobber")),
        "check names {LOST} as held by no replica, and clobber as the way out:\n{err}"
    );
}

/// Node 1 is frozen (SIGSTOP: its socket accepts connections but nothing
/// answers). A push to replica 1 must end within the refusal bound (request
/// timeout 3 s + the hook's 3 s margin + process start), failing with a
/// message that says the node did not answer. The phrase "did not answer"
/// is part of the new interface.
fn a_push_to_a_frozen_node_fails_within_the_bound(backend: Backend) {
    let timeout = harness::SHORT_REQUEST_TIMEOUT_MS.to_string();
    let c = Cluster::start_on(&backend, 3, &["--request-timeout-ms", &timeout]);
    let (reps, user, _) = group_with_main(&c);
    user.commit("c2, pushed to a frozen node");
    let _frozen = Frozen::stop(&c, 1);

    // A file, not a pipe: the hook that hangs holds git's stderr open, and
    // reading a pipe would hang with it.
    let err_path = c.dir.path().join("frozen-push.stderr");
    let err_file = std::fs::File::create(&err_path).expect("create the stderr file");
    let mut push = git::git_cmd(&user.path, &["push", reps[0].to_str().unwrap(), "main"])
        .stdout(Stdio::null())
        .stderr(err_file)
        .spawn()
        .expect("spawn git push");
    let started = Instant::now();
    let bound = harness::REFUSAL_BOUND;
    let status = wait_bounded(&mut push, bound);
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    let Some(status) = status else {
        panic!(
            "git push to replica 1 did not exit within {bound:?} while node 1 was frozen (killed it); stderr so far:\n{err}"
        );
    };
    assert!(
        !status.success(),
        "a push with the node frozen cannot succeed; stderr:\n{err}"
    );
    assert!(
        err.contains("did not answer"),
        "the pusher is told the node did not answer (after {:?}):\n{err}",
        started.elapsed()
    );
}

/// Branches a and b are in the group; another user moves b on (replica 1 is
/// put back behind piehole's back, so git there still thinks the first
/// user's b is a fast-forward). `git push --atomic` of a (acceptable alone)
/// and b (stale) fails, and then neither the consensus nor any replica has
/// the new a: right away, and after a later push has replicated.
fn an_atomic_push_with_one_rejected_ref_changes_nothing(backend: Backend) {
    const A: &str = "refs/heads/a";
    const B: &str = "refs/heads/b";
    let c = slow_reconcile_cluster(&backend);
    let reps = git::replicas(&c, GROUP);
    let alice = Work::new(&c, "alice");
    let c1 = alice.commit("c1");
    alice.git_ok(&["branch", "a"]);
    alice.git_ok(&["branch", "b"]);
    alice.push_ok(&reps[0], &["main", "a", "b"]);
    git::wait_converged(&c, &reps, A, Some(&c1));
    git::wait_converged(&c, &reps, B, Some(&c1));

    let bob = Work::clone_from(&c, "bob", &reps[1]);
    bob.git_ok(&["checkout", "--quiet", "-b", "b", "origin/b"]);
    let b1 = bob.commit("bob's b");
    bob.push_ok(&reps[1], &["b"]);
    git::wait_converged(&c, &reps, B, Some(&b1));
    git::git_ok(&reps[0], &["update-ref", B, &c1, &b1]);

    alice.git_ok(&["checkout", "--quiet", "a"]);
    let a1 = alice.commit("alice's a");
    alice.git_ok(&["checkout", "--quiet", "b"]);
    alice.commit("alice's b, stale");
    let out = alice.git(&["push", "--atomic", reps[0].to_str().unwrap(), "a", "b"]);
    assert!(
        !out.status.success(),
        "the atomic push must fail (b is stale):\n{}",
        harness::show(&out)
    );

    let unchanged = |when: &str| {
        let agreed = git::consensus(&c, 1, GROUP);
        assert_eq!(
            agreed.get(A),
            Some(&c1),
            "{when}: the failed atomic push moved {A} in the consensus (alice's a is {a1}); the push said:\n{}",
            harness::show(&out)
        );
        for r in &reps {
            assert_eq!(
                git::rev_parse_ref(r, A).as_deref(),
                Some(c1.as_str()),
                "{when}: {A} moved in {}",
                r.display()
            );
        }
    };
    unchanged("right after the push");
    // Proof that replication ran since: a later push has reached every replica.
    alice.git_ok(&["checkout", "--quiet", "main"]);
    let c2 = alice.commit("c2, later");
    alice.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c2));
    unchanged("after a later push replicated");
}

/// 200 lightweight tags in one `git push --tags` to replica 1, whose hooks
/// are wrapped to count their runs: at most 3 hook processes in all, the
/// Raft commit index grows by at most 3 (nothing else writes to the log
/// meanwhile: no linearizable reads until after), and every tag reaches
/// every replica and the consensus.
#[test]
fn a_push_of_many_tags_costs_constant_hooks_and_log_entries() {
    const TAGS: usize = 200;
    let c = cluster(&Backend::Raft);
    let (reps, user, _) = group_with_main(&c);
    let count_file = c.dir.path().join("hook-runs");
    wrap_piehole_hooks(
        &reps[0],
        &format!(
            "\"$0.real\" \"$@\"; s=$?; echo x >> '{}'; exit $s\n",
            count_file.display()
        ),
    );
    let tagged = user.commit("tagged");
    let mut stream = String::new();
    for i in 0..TAGS {
        stream.push_str(&format!("reset refs/tags/t{i:03}\nfrom {tagged}\n\n"));
    }
    stream.push_str("done\n");
    user.fast_import(stream.as_bytes());

    let before = settled_commit_index(&c);
    let out = user.git(&["push", reps[0].to_str().unwrap(), "--tags"]);
    git::assert_ok(&out, "git push --tags");
    let expected = git::replicated_refs(&reps[0]);
    assert_eq!(
        expected
            .keys()
            .filter(|r| r.starts_with("refs/tags/"))
            .count(),
        TAGS,
        "replica 1 took every tag"
    );
    git::wait_all_refs(&c, &reps, &expected);
    let after = c.status(1)["commit_index"]
        .as_u64()
        .expect("status has commit_index");
    let hook_runs = std::fs::read_to_string(&count_file)
        .unwrap_or_default()
        .lines()
        .count();
    assert!(
        hook_runs <= 3 && after - before <= 3,
        "a push of {TAGS} tags ran {hook_runs} hook processes and added {} log entries (at most 3 each)",
        after - before
    );
    let agreed = git::consensus(&c, 1, GROUP);
    let tags: BTreeMap<&String, &String> = agreed
        .iter()
        .filter(|(r, _)| r.starts_with("refs/tags/"))
        .collect();
    assert_eq!(tags.len(), TAGS, "every tag is in the consensus");
}

/// Waits until node 3 has run at least one whole periodic reconcile pass: a
/// ref of its replica `witness` (only the periodic pass repairs a drift no
/// push or consensus change announces) is deleted behind piehole's back and
/// repaired, twice; the second repair's pass began after the first ended.
fn wait_for_reconcile_pass(c: &Cluster, witness: &Path, tip: &str) {
    for _ in 0..2 {
        git::git_ok(witness, &["update-ref", "-d", MAIN, tip]);
        git::wait_converged(c, &[witness.to_path_buf()], MAIN, Some(tip));
    }
}

/// The group has replicas on nodes 1 and 2 and a main. On node 3, a bare
/// repository of the same name has an older main (an ancestor: fine) and a
/// branch of its own, refs/heads/mine. `piehole install` there fails naming
/// refs/heads/mine and --force, and mine is still there after node 3 has
/// reconciled. `piehole install --force` then succeeds: the repository
/// follows the group (mine gone from refs/heads/) and mine's tip stays
/// reachable from a ref under refs/piehole/. The refusal and the backup ref
/// are the new interface.
fn install_into_a_group_refuses_to_delete_the_new_repositorys_own_branches(backend: Backend) {
    const MINE: &str = "refs/heads/mine";
    let c = cluster(&backend);
    let reps: Vec<PathBuf> = (1..=2)
        .map(|id| {
            let r = git::bare_repo(&c, id, GROUP);
            git::install_ok(&c, id, &r);
            r
        })
        .collect();
    let alice = Work::new(&c, "alice");
    let c1 = alice.commit("c1");
    alice.push_ok(&reps[0], &["main"]);
    alice.git_ok(&["checkout", "--quiet", "-b", "mine"]);
    let m1 = alice.commit("only on node 3");
    alice.git_ok(&["checkout", "--quiet", "main"]);
    let c2 = alice.commit("c2");
    alice.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c2));

    let third = git::bare_repo(&c, 3, GROUP);
    let old_main = format!("{c1}:{MAIN}");
    alice.push_ok(&third, &[old_main.as_str(), "mine"]);
    let witness = git::bare_repo(&c, 3, "witness");
    git::install_ok(&c, 3, &witness);
    alice.push_ok(&witness, &["main"]);

    let out = git::install(&c, 3, &third);
    assert!(
        !out.status.success(),
        "install must refuse to delete {MINE}:\n{}",
        harness::show(&out)
    );
    let err = harness::stderr(&out);
    assert!(
        err.contains(MINE) && err.contains("--force"),
        "the refusal names {MINE} and --force:\n{err}"
    );
    // Refused before anything was written (found in review): a repository
    // with piehole's hooks but no registration would refuse every push.
    assert!(
        !third.join("hooks/proc-receive").exists(),
        "a refused install left piehole's hook behind"
    );
    let group_set = git::git(&third, &["config", "piehole.group"]);
    assert!(
        !group_set.status.success(),
        "a refused install wrote piehole.group"
    );
    wait_for_reconcile_pass(&c, &witness, &c2);
    assert_eq!(
        git::rev_parse_ref(&third, MINE),
        Some(m1.clone()),
        "a refused install must leave {MINE} alone"
    );

    let out = git::install_with(&c, 3, &third, &["--force"]);
    git::assert_ok(&out, "piehole install --force");
    harness::poll_until_showing(
        "node 3's repository to follow the group",
        git::CONVERGE,
        || {
            (git::rev_parse_ref(&third, MAIN).as_deref() == Some(&c2)
                && git::rev_parse_ref(&third, MINE).is_none())
            .then_some(())
        },
        || format!("{:?}", git::refs(&third)),
    );
    let kept = git::git_ok(
        &third,
        &["for-each-ref", "--format=%(objectname)", "refs/piehole/"],
    );
    assert!(
        kept.lines().any(|id| id == m1),
        "mine's old tip {m1} is kept under refs/piehole/; refs: {:?}",
        git::refs(&third)
    );
}

/// (a) In a bare repository that only has the group's directory name (not
/// registered with any node), `piehole clobber --node SOCK` fails with "not
/// a registered replica" and the consensus is unchanged. (b) In a
/// registered replica that lacks a ref the consensus has, `piehole clobber`
/// fails pointing at --prune, consensus unchanged; `piehole clobber
/// --prune` succeeds and removes that ref from the consensus. The refusals
/// and `--prune` are the new interface.
fn clobber_only_works_from_a_registered_replica_and_removes_refs_only_when_asked(backend: Backend) {
    const EXTRA: &str = "refs/heads/extra";
    let c = slow_reconcile_cluster(&backend);
    let (reps, _, c1) = group_with_main(&c);

    let stray = c.dir.path().join("elsewhere").join("proj.git");
    git::init_bare(&stray);
    let before = git::consensus(&c, 1, GROUP);
    let sock = c.socket(1);
    let out = git::piehole_in(&stray, &["clobber", "--node", sock.to_str().unwrap()]);
    git::assert_failed_with(
        &out,
        "clobber in an unregistered repository",
        "not a registered replica",
    );
    assert_eq!(
        git::consensus(&c, 1, GROUP),
        before,
        "a refused clobber changed the consensus"
    );

    c.cas_ok(1, GROUP, EXTRA, ZERO, &c1);
    git::wait_converged(&c, &reps, EXTRA, Some(&c1));
    // Behind piehole's back; the slow reconcile will not put it back meanwhile.
    git::git_ok(&reps[1], &["update-ref", "-d", EXTRA, &c1]);
    let before = git::consensus(&c, 1, GROUP);
    let out = git::clobber(&reps[1]);
    git::assert_failed_with(&out, "clobber that would remove a consensus ref", "--prune");
    assert_eq!(
        git::consensus(&c, 1, GROUP),
        before,
        "a refused clobber changed the consensus"
    );

    let out = git::piehole_in(&reps[1], &["clobber", "--prune"]);
    git::assert_ok(&out, "piehole clobber --prune");
    let after = git::consensus(&c, 1, GROUP);
    assert_eq!(after.get(EXTRA), None, "--prune removes {EXTRA}");
    assert_eq!(after.get(MAIN), Some(&c1));
}

/// A node SIGKILLed while moving a ref leaves `refs/heads/main.lock` behind
/// (found while writing the double-crash test: a replica then stayed behind
/// for good, every later update of the ref failing as "locked"). Here the
/// leftover is made directly, a minute old, on replica 2; the next push
/// must still reach replica 2 within the convergence bound, and the stale
/// lock must be gone.
fn a_lock_file_left_by_a_killed_node_does_not_block_the_ref_for_good(backend: Backend) {
    let c = cluster(&backend);
    let (reps, user, c1) = group_with_main(&c);
    let lock = reps[1].join("refs/heads/main.lock");
    std::fs::write(&lock, format!("{c1}\n")).unwrap();
    let a_minute_ago = std::time::SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&lock)
        .and_then(|f| f.set_modified(a_minute_ago))
        .expect("age the lock file");
    let c2 = user.commit("c2");
    user.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c2));
    assert!(!lock.exists(), "the stale lock is still there");
}

/// Replicas that receive only through piehole get one pack per replicated
/// push; git runs `gc --auto` only after pushes it receives itself. With
/// gc.autoPackLimit = 4 on replica 2, after 8 pushes to replica 1 replica
/// 2 is repacked to a few packs (found in review: packs piled up).
fn replicas_that_only_receive_through_piehole_are_repacked(backend: Backend) {
    let c = cluster(&backend);
    let (reps, user, _) = group_with_main(&c);
    git::git_ok(&reps[1], &["config", "gc.autoPackLimit", "4"]);
    let packs = |repo: &Path| {
        std::fs::read_dir(repo.join("objects/pack"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
                    .count()
            })
            .unwrap_or(0)
    };
    for i in 0..8 {
        let tip = user.commit(&format!("push {i}"));
        user.push_ok(&reps[0], &["main"]);
        git::wait_converged(&c, &reps, MAIN, Some(&tip));
    }
    harness::poll_until_showing(
        "replica 2 to be repacked to at most 4 packs",
        git::CONVERGE,
        || (packs(&reps[1]) <= 4).then_some(()),
        || format!("{} packs in {}", packs(&reps[1]), reps[1].display()),
    );
    git::fsck(&reps[1]);
}

/// Found in review: with refs/heads/a in the group, a push creating
/// refs/heads/a/b was acknowledged, though no replica could ever hold both
/// (a ref cannot also be a directory). It must be refused, naming the ref
/// in the way, and the consensus must not have it.
fn a_ref_that_would_be_a_directory_of_another_is_refused(backend: Backend) {
    let c = cluster(&backend);
    let (reps, user, _) = group_with_main(&c);
    let out = user.push(&reps[1], &["main:refs/heads/main/sub"]);
    git::assert_failed_with(
        &out,
        "a push of refs/heads/main/sub",
        "refs/heads/main exists",
    );
    assert!(!git::consensus(&c, 1, GROUP).contains_key("refs/heads/main/sub"));
    let c2 = user.commit("c2");
    user.push_ok(&reps[1], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c2));
    for r in &reps {
        let out = git::check(r);
        git::assert_ok(&out, &format!("check in {}", r.display()));
    }
}

/// Found in review: git applies refs the proc-receive hook lets fall through
/// (refs/remotes/) in its own transaction, after the consensus took the
/// rest, so an atomic push mixing both could not be all or nothing. It is
/// refused whole, and nothing moves.
fn an_atomic_push_mixing_replicated_and_local_refs_is_refused_whole(backend: Backend) {
    let c = cluster(&backend);
    let (reps, user, c1) = group_with_main(&c);
    let c2 = user.commit("c2");
    let out = user.git(&[
        "push",
        "--atomic",
        reps[0].to_str().unwrap(),
        "main",
        "main:refs/remotes/mirror/main",
    ]);
    git::assert_failed_with(
        &out,
        "an atomic push with a refs/remotes/ ref",
        "atomic push cannot mix",
    );
    assert_eq!(git::consensus(&c, 1, GROUP).get(MAIN), Some(&c1));
    assert_eq!(git::rev_parse_ref(&reps[0], MAIN), Some(c1.clone()));
    assert_eq!(
        git::rev_parse_ref(&reps[0], "refs/remotes/mirror/main"),
        None
    );
    // Each on its own is fine.
    user.push_ok(&reps[0], &["main"]);
    user.push_ok(&reps[0], &["main:refs/remotes/mirror/main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c2));
}

/// Found by the fault-injection test: a node killed while moving a ref and
/// restarted at once finds its own fresh lock file; it waited out a fixed
/// age and then a retry backoff, leaving its replica behind for more than
/// the 2 s the issue allows after healing. Now a lock from before the node
/// started is taken for dead after 1 s, and the node looks again right then.
fn a_node_restarted_right_after_a_kill_mid_update_catches_up_within_2s(backend: Backend) {
    let mut c = cluster(&backend);
    let (reps, user, _) = group_with_main(&c);
    c.kill(2);
    std::fs::write(reps[1].join("refs/heads/main.lock"), "").unwrap();
    let c2 = user.commit("c2");
    user.push_ok(&reps[0], &["main"]);
    c.restart(2);
    let restarted = Instant::now();
    harness::poll_until_showing(
        "replica 2 to catch up within 2 s of its node's restart",
        Duration::from_secs(2),
        || (git::rev_parse_ref(&reps[1], MAIN).as_deref() == Some(c2.as_str())).then_some(()),
        || state(&c, &reps),
    );
    eprintln!(
        "replica 2 caught up {:?} after the restart",
        restarted.elapsed()
    );
}

on_both_backends!(
    double_crash_after_push_never_steps_a_replica_back,
    a_hook_that_dies_after_the_node_accepted_delays_convergence_by_seconds_at_most,
    a_ref_no_replica_can_serve_does_not_block_other_refs,
    a_push_to_a_frozen_node_fails_within_the_bound,
    an_atomic_push_with_one_rejected_ref_changes_nothing,
    install_into_a_group_refuses_to_delete_the_new_repositorys_own_branches,
    clobber_only_works_from_a_registered_replica_and_removes_refs_only_when_asked,
    a_ref_that_would_be_a_directory_of_another_is_refused,
    an_atomic_push_mixing_replicated_and_local_refs_is_refused_whole,
    a_lock_file_left_by_a_killed_node_does_not_block_the_ref_for_good,
    replicas_that_only_receive_through_piehole_are_repacked,
    a_node_restarted_right_after_a_kill_mid_update_catches_up_within_2s,
);
