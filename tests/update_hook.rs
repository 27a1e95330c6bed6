//! The hook path for git older than 2.29, which has no proc-receive hook:
//! `install --hook update` puts piehole's `update` and `post-update` hooks
//! in place, git moves each accepted ref itself, and the node holds the ref
//! for it meanwhile. (The default path is covered everywhere else; a hook
//! that dies after the node accepted is in regressions.rs for both.)

#[path = "harness/mod.rs"]
mod harness;

use std::path::PathBuf;

use harness::git::{self, Work};
use harness::{Backend, Cluster};

const GROUP: &str = "proj";
const MAIN: &str = "refs/heads/main";

/// Branches, tags and a deletion pushed through the update hook reach every
/// replica; a stale push is refused with piehole's retry message and
/// changes nothing; after a pull the push goes through.
fn pushes_through_the_update_hook_replicate_and_stale_ones_are_told_to_retry(backend: Backend) {
    // The periodic reconcile would undo the stale view made below before
    // Bob pushes; changes still replicate at once.
    let c = Cluster::start_on(&backend, 3, &["--reconcile-interval-ms", "60000"]);
    let reps: Vec<PathBuf> = (1..=3)
        .map(|id| {
            let repo = git::bare_repo(&c, id, GROUP);
            let out = git::install_with(&c, id, &repo, &["--hook", "update"]);
            git::assert_ok(&out, "install --hook update");
            assert!(
                repo.join("hooks/update").exists() && !repo.join("hooks/proc-receive").exists()
            );
            git::assert_ok(&git::check(&repo), "check of an update-hook install");
            repo
        })
        .collect();
    let alice = Work::new(&c, "alice");
    alice.commit("c1");
    alice.git_ok(&["tag", "-a", "v1", "-m", "one"]);
    alice.git_ok(&["branch", "side"]);
    let c2 = alice.commit("c2");
    alice.push_ok(&reps[0], &["main", "side", "v1"]);
    let expected = git::replicated_refs(&reps[0]);
    assert_eq!(expected.len(), 3, "{expected:?}");
    git::wait_all_refs(&c, &reps, &expected);

    alice.push_ok(&reps[1], &[":side"]);
    git::wait_converged(&c, &reps, "refs/heads/side", None);

    // Bob works from replica 3, which is then left behind by a push Alice
    // makes elsewhere while its view is put back (behind piehole's back).
    let bob = Work::clone_from(&c, "bob", &reps[2]);
    let c3 = alice.commit("c3");
    alice.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c3));
    bob.commit("bob's work on c2");
    git::git_ok(&reps[2], &["update-ref", MAIN, &c2, &c3]);
    let out = bob.push(&reps[2], &["main"]);
    git::assert_failed_with(&out, "a stale push", "this replica is catching up");
    assert_eq!(git::consensus(&c, 1, GROUP).get(MAIN), Some(&c3));
    git::wait_converged(&c, &reps, MAIN, Some(&c3));

    let out = bob.git(&[
        "pull",
        "--quiet",
        "--rebase",
        reps[2].to_str().unwrap(),
        "main",
    ]);
    git::assert_ok(&out, "bob: git pull --rebase");
    let b = bob.head();
    bob.push_ok(&reps[2], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&b));
    for r in &reps {
        git::fsck(r);
    }
}

on_both_backends!(pushes_through_the_update_hook_replicate_and_stale_ones_are_told_to_retry,);
