//! The repository commands: `piehole install` (refusals, idempotence, what
//! it writes, seeding a new group) and `piehole check` (healthy, and each
//! problem named on its own line).

#[path = "harness/mod.rs"]
mod harness;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use harness::git::{self, Work};
use harness::Cluster;

const MAIN: &str = "refs/heads/main";

/// Three nodes; the periodic reconcile is slow, so a ref changed behind
/// piehole's back stays changed while `check` looks at it.
fn cluster() -> Cluster {
    Cluster::start_with(3, &["--reconcile-interval-ms", "60000"])
}

/// A replica of `group` on node `id` with hooks installed and one commit
/// pushed through it; returns the repo and the commit.
fn healthy_replica(c: &Cluster, id: u64, group: &str) -> (PathBuf, String) {
    let repo = git::bare_repo(c, id, group);
    git::install_ok(c, id, &repo);
    let work = Work::new(c, &format!("{group}-{id}"));
    let head = work.commit("first");
    work.push_ok(&repo, &["main"]);
    let out = git::check(&repo);
    git::assert_ok(&out, "piehole check on a freshly installed replica");
    (repo, head)
}

/// `piehole check` fails and its problem lines are exactly `expected`
/// (each matched as a substring, in any order).
#[track_caller]
fn assert_problems(repo: &Path, expected: &[&str]) {
    let out = git::check(repo);
    assert_eq!(
        out.status.code(),
        Some(1),
        "check should fail:\n{}",
        harness::show(&out)
    );
    let err = harness::stderr(&out);
    let problems: Vec<&str> = err
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.strip_prefix("piehole: problem: ")
                .unwrap_or_else(|| panic!("not a problem line: {l:?}\n{err}"))
        })
        .collect();
    assert_eq!(
        problems.len(),
        expected.len(),
        "expected problems {expected:?}, got:\n{err}"
    );
    for e in expected {
        assert!(
            problems.iter().any(|p| p.contains(e)),
            "no problem line mentions {e:?}:\n{err}"
        );
    }
}

fn hook_files(repo: &Path) -> Vec<(String, Vec<u8>, u32)> {
    ["proc-receive"]
        .iter()
        .map(|h| {
            let p = repo.join("hooks").join(h);
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
            (h.to_string(), bytes, mode)
        })
        .collect()
}

fn config(repo: &Path, key: &str) -> Option<String> {
    let out = git::git(repo, &["config", "--get", key]);
    out.status
        .success()
        .then(|| harness::stdout(&out).trim().to_string())
}

fn write_foreign_hook(repo: &Path, name: &str) -> Vec<u8> {
    let content = b"#!/bin/sh\n# the site's own hook\necho hello from a foreign hook\n".to_vec();
    let p = repo.join("hooks").join(name);
    std::fs::write(&p, &content).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    content
}

#[test]
fn install_refuses_a_non_bare_repository() {
    let c = Cluster::start(3);
    let work = Work::new(&c, "not-bare");
    work.commit("x");
    // In the .git directory the name gives no group, so name one: the
    // refusal must be about bareness.
    for (dir, extra) in [
        (work.path.clone(), &[][..]),
        (work.path.join(".git"), &["--group", "g"][..]),
    ] {
        let out = git::install_with(&c, 1, &dir, extra);
        assert!(
            !out.status.success(),
            "install in {} must fail:\n{}",
            dir.display(),
            harness::show(&out)
        );
        harness::assert_one_line_error(&out, 1);
        assert!(
            harness::stderr(&out).to_lowercase().contains("bare"),
            "the error says why:\n{}",
            harness::show(&out)
        );
        assert!(
            !work.path.join(".git/hooks/update").exists(),
            "no hook was written"
        );
        assert_eq!(
            config(&work.path, "piehole.group"),
            None,
            "no config was written"
        );
    }
}

/// Without --group, in the .git directory of a non-bare repository.
#[test]
fn install_in_the_git_dir_of_a_work_tree_says_it_is_not_bare() {
    let c = Cluster::start(3);
    let work = Work::new(&c, "not-bare");
    work.commit("x");
    let out = git::install(&c, 1, &work.path.join(".git"));
    let line = harness::assert_one_line_error(&out, 1);
    assert!(
        line.to_lowercase().contains("bare"),
        "the error says why: {line}"
    );
}

/// A foreign proc-receive hook would be overwritten, and a foreign update
/// hook would stop running for the refs piehole's proc-receive hook handles:
/// install refuses both unless forced. Forced, piehole's hook takes over and
/// the foreign update hook is left where it was.
#[test]
fn install_refuses_foreign_hooks_unless_forced() {
    let c = Cluster::start(3);
    for (i, hook) in ["proc-receive", "update"].into_iter().enumerate() {
        let group = format!("g{i}");
        let repo = git::bare_repo(&c, 1, &group);
        let foreign = write_foreign_hook(&repo, hook);

        let out = git::install(&c, 1, &repo);
        assert!(
            !out.status.success(),
            "install over a foreign {hook} hook must fail"
        );
        let line = harness::assert_one_line_error(&out, 1);
        assert!(line.contains(hook), "the error names the hook: {line}");
        assert!(
            line.contains("--force"),
            "the error says how to override: {line}"
        );
        assert_eq!(
            std::fs::read(repo.join("hooks").join(hook)).unwrap(),
            foreign,
            "left alone"
        );
        assert_eq!(
            config(&repo, "piehole.group"),
            None,
            "refused before writing anything"
        );
        let out = git::check(&repo);
        let problem = if hook == "proc-receive" {
            "piehole: problem: hook proc-receive is not piehole's"
        } else {
            "piehole: problem: hook proc-receive is missing"
        };
        git::assert_failed_with(&out, "check", problem);

        let out = git::install_with(&c, 1, &repo, &["--force"]);
        git::assert_ok(&out, "install --force");
        let now = std::fs::read(repo.join("hooks").join(hook)).unwrap();
        if hook == "proc-receive" {
            assert_ne!(now, foreign, "piehole's hook replaced it");
        } else {
            assert_eq!(now, foreign, "a foreign update hook is not deleted");
        }
        let out = git::check(&repo);
        git::assert_ok(&out, "check after install --force");
    }
}

#[test]
fn install_is_idempotent_and_writes_config_reflog_and_hooks() {
    let c = Cluster::start(3);
    let repo = git::bare_repo(&c, 2, "proj");
    git::install_ok(&c, 2, &repo);
    let hooks = hook_files(&repo);
    for (name, bytes, mode) in &hooks {
        assert!(bytes.starts_with(b"#!"), "{name} is a script");
        assert!(mode & 0o111 != 0, "{name} is executable ({mode:o})");
    }
    assert_eq!(
        config(&repo, "piehole.group").as_deref(),
        Some("proj"),
        "group defaults to the dir name"
    );
    let sock = c.socket(2);
    assert_eq!(config(&repo, "piehole.node").as_deref(), sock.to_str());
    assert_eq!(
        config(&repo, "core.logAllRefUpdates").as_deref(),
        Some("always")
    );
    assert_eq!(
        config(&repo, "receive.procReceiveRefs").as_deref(),
        Some("refs/")
    );

    let out = git::install(&c, 2, &repo);
    git::assert_ok(&out, "second install");
    assert!(
        harness::stdout(&out).contains("already installed"),
        "{}",
        harness::show(&out)
    );
    assert_eq!(
        hook_files(&repo),
        hooks,
        "hook files unchanged by a second install"
    );
    let out = git::check(&repo);
    git::assert_ok(&out, "check after two installs");

    // --group overrides the directory name.
    let other = git::bare_repo(&c, 2, "dirname");
    let out = git::install_with(&c, 2, &other, &["--group", "named"]);
    git::assert_ok(&out, "install --group");
    assert_eq!(config(&other, "piehole.group").as_deref(), Some("named"));
    let out = git::check(&other);
    git::assert_ok(&out, "check in a repo installed with --group");
}

/// The first repository installed into an empty group brings its refs. A
/// later one with other refs is refused, since following the group would
/// delete or rewind them; with --force it follows the group, its own tips
/// kept under refs/piehole/kept/.
#[test]
fn install_seeds_an_empty_group_and_later_replicas_follow() {
    let c = Cluster::start_with(3, &["--reconcile-interval-ms", "1000"]);
    let work = Work::new(&c, "existing");
    let c1 = work.commit("existing history");
    work.git_ok(&["tag", "-a", "v0", "-m", "old tag"]);
    let tag = work.rev("refs/tags/v0");

    let first = git::bare_repo(&c, 1, "proj");
    work.push_ok(&first, &["main", "v0"]); // no hooks yet: a plain push
    let out = git::install(&c, 1, &first);
    git::assert_ok(&out, "install of a repository with history");
    assert_eq!(
        git::rev_parse_ref(&first, MAIN),
        Some(c1.clone()),
        "install must not lose the repository's refs:\n{}",
        harness::show(&out)
    );
    assert!(
        harness::stdout(&out).contains("consensus now starts from this repository's 2 refs"),
        "{}",
        harness::show(&out)
    );
    let consensus = git::consensus(&c, 2, "proj");
    assert_eq!(consensus.get(MAIN), Some(&c1));
    assert_eq!(consensus.get("refs/tags/v0"), Some(&tag));

    // Replica 2 has unrelated history; it must not seed, and it follows the group.
    let stray = Work::new(&c, "stray");
    stray.commit("unrelated");
    let second = git::bare_repo(&c, 2, "proj");
    stray.push_ok(&second, &["main:refs/heads/stray", "main"]);
    let out = git::install(&c, 2, &second);
    let line = harness::assert_one_line_error(&out, 1);
    for name in [MAIN, "refs/heads/stray", "--force"] {
        assert!(line.contains(name), "the refusal names {name}: {line}");
    }
    let out = git::install_with(&c, 2, &second, &["--force"]);
    git::assert_ok(&out, "install --force of a second replica");
    let kept = git::refs(&second);
    let stray_tip = stray.head();
    for name in [MAIN, "refs/heads/stray"] {
        assert!(
            kept.iter().any(|(k, v)| k.starts_with("refs/piehole/kept/")
                && k.ends_with(name)
                && *v == stray_tip),
            "{name} is kept under refs/piehole/kept/: {kept:?}"
        );
    }
    assert_eq!(
        git::consensus(&c, 1, "proj"),
        consensus,
        "the second install changed the consensus"
    );
    let third = git::bare_repo(&c, 3, "proj");
    git::install_ok(&c, 3, &third);
    let reps = [first, second, third];
    git::wait_all_refs(&c, &reps, &consensus);
}

#[test]
fn check_exits_zero_on_a_healthy_replicated_repo() {
    let c = Cluster::start_with(3, &["--reconcile-interval-ms", "1000"]);
    let reps = git::replicas(&c, "proj");
    let work = Work::new(&c, "alice");
    let head = work.commit("one");
    work.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&head));
    for r in &reps {
        let out = git::check(r);
        git::assert_ok(&out, &format!("check in {}", r.display()));
        assert!(harness::stderr(&out).is_empty(), "{}", harness::show(&out));
    }
}

#[test]
fn check_names_reflog_off() {
    let c = cluster();
    let (repo, _) = healthy_replica(&c, 1, "proj");
    git::git_ok(&repo, &["config", "core.logAllRefUpdates", "false"]);
    assert_problems(&repo, &["reflog is off"]);
}

#[test]
fn check_names_a_missing_hook() {
    let c = cluster();
    let (repo, _) = healthy_replica(&c, 1, "proj");
    std::fs::remove_file(repo.join("hooks/proc-receive")).unwrap();
    assert_problems(&repo, &["hook proc-receive is missing"]);
}

#[test]
fn check_names_a_hook_that_is_not_executable() {
    let c = cluster();
    let (repo, _) = healthy_replica(&c, 1, "proj");
    let p = repo.join("hooks/proc-receive");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_problems(&repo, &["hook proc-receive is not executable"]);
}

#[test]
fn check_names_several_local_problems_at_once() {
    let c = cluster();
    let (repo, _) = healthy_replica(&c, 1, "proj");
    git::git_ok(&repo, &["config", "core.logAllRefUpdates", "false"]);
    git::git_ok(&repo, &["config", "--unset-all", "receive.procReceiveRefs"]);
    write_foreign_hook(&repo, "proc-receive");
    assert_problems(
        &repo,
        &[
            "reflog is off",
            "receive.procReceiveRefs is not refs/",
            "hook proc-receive is not piehole's",
        ],
    );
}

#[test]
fn check_names_an_unreachable_node() {
    let mut c = cluster();
    let (repo, _) = healthy_replica(&c, 2, "proj");
    c.kill(2);
    let sock = c.socket(2);
    let out = git::check(&repo);
    assert_problems(&repo, &["the local piehole node is unreachable at "]);
    assert!(
        harness::stderr(&out).contains(sock.to_str().unwrap()),
        "names the socket:\n{}",
        harness::show(&out)
    );
    c.restart(2);
    let out = git::check(&repo);
    git::assert_ok(&out, "check once the node is back");
}

/// A repository set up like a replica (our hooks, reflog, config, the
/// group's refs) but never registered with its node.
#[test]
fn check_names_a_repository_that_is_not_registered() {
    let c = cluster();
    let (registered, _) = healthy_replica(&c, 1, "proj");
    let copy = c.dir.path().join("node1").join("copy").join("proj.git");
    git::init_bare(&copy);
    let hook = "hooks/proc-receive";
    std::fs::copy(registered.join(hook), copy.join(hook)).unwrap();
    let sock = c.socket(1);
    git::git_ok(&copy, &["config", "core.logAllRefUpdates", "true"]);
    git::git_ok(&copy, &["config", "receive.procReceiveRefs", "refs/"]);
    git::git_ok(&copy, &["config", "piehole.group", "proj"]);
    git::git_ok(&copy, &["config", "piehole.node", sock.to_str().unwrap()]);
    git::git_ok(
        &copy,
        &[
            "fetch",
            "--quiet",
            registered.to_str().unwrap(),
            "refs/*:refs/*",
        ],
    );
    assert_problems(&copy, &["not registered"]);
}

/// A local ref moved behind piehole's back (`git update-ref`, no hooks):
/// check names the ref that differs from the consensus.
#[test]
fn check_names_refs_that_differ_from_the_consensus() {
    let c = cluster();
    let (repo, c1) = healthy_replica(&c, 3, "proj");
    let work = Work::clone_from(&c, "more", &repo);
    let c2 = work.commit("second");
    work.push_ok(&repo, &["main"]);
    assert_eq!(git::rev_parse_ref(&repo, MAIN), Some(c2.clone()));

    git::git_ok(&repo, &["update-ref", MAIN, &c1, &c2]);
    git::git_ok(&repo, &["update-ref", "refs/heads/sneaky", &c1]);
    assert_problems(
        &repo,
        &[
            "refs/heads/main differs from the consensus",
            "refs/heads/sneaky differs from the consensus",
        ],
    );
}
