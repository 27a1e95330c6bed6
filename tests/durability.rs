//! SPEC §5: durable means fsynced, and `--durability quorum` loses no
//! acknowledged push when the host that took it is destroyed at once.
//!
//! Real nodes, real git. The fsync check watches the nodes' system calls
//! with strace, which the harness installs (apt) when it is missing.

#[path = "harness/mod.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use harness::git::{self, Work};
use harness::nemesis::signal;
use harness::{poll_until, ChildGuard, Cluster};

const GROUP: &str = "proj";
const MAIN: &str = "refs/heads/main";

/// One system call as `strace -ttt -y` prints it: when, which call, and the
/// path of the file descriptor it was given.
#[derive(Debug)]
struct Call {
    at: f64,
    name: String,
    path: String,
}

/// Attaches strace to a running process (all its threads, and threads it
/// starts), recording fsync, fdatasync and sync_file_range with the paths
/// of their descriptors; returns once strace is attached. Killing the guard
/// detaches strace and leaves the process running.
fn trace(pid: u32, out: &Path) -> ChildGuard {
    let log = out.with_extension("strace-stderr");
    let child = Command::new("strace")
        .args([
            "-f",
            "-y",
            "-ttt",
            "-e",
            "trace=fsync,fdatasync,sync_file_range",
        ])
        .arg("-o")
        .arg(out)
        .args(["-p", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("strace's stderr file"))
        .spawn()
        .expect("strace is needed for this test (apt-get install strace)");
    let guard = ChildGuard(child);
    // Attached for real: every thread of the process has a tracer.
    let traced = |task: std::fs::DirEntry| {
        std::fs::read_to_string(task.path().join("status")).is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"))
        })
    };
    poll_until(
        &format!("strace to attach to every thread of {pid}"),
        Duration::from_secs(10),
        || {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
            tasks.flatten().all(traced).then_some(())
        },
    );
    guard
}

/// The calls strace wrote to `file`, e.g.
/// `123 1700000000.123456 fdatasync(7</tmp/x/db/db>) = 0`.
fn calls(file: &Path) -> Vec<Call> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            // strace pads the pid column, so the separator is not one space.
            let (_pid, line) = line.trim_start().split_once(char::is_whitespace)?;
            let (at, rest) = line.trim_start().split_once(char::is_whitespace)?;
            let (name, args) = rest.split_once('(')?;
            let path = args.split_once('<')?.1.split_once('>')?.0;
            Some(Call {
                at: at.parse().ok()?,
                name: name.to_string(),
                path: path.to_string(),
            })
        })
        .collect()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// The first call after `since` that is an fsync or fdatasync of a path
/// matching `wanted`.
fn synced(calls: &[Call], since: f64, wanted: impl Fn(&str) -> bool) -> Option<&Call> {
    calls
        .iter()
        .filter(|c| c.at >= since && (c.name == "fsync" || c.name == "fdatasync"))
        .find(|c| wanted(&c.path))
}

/// One push, watched from the inside: node 1 (which takes it) and node 2
/// (which replicates it) run under strace, and so does `git push` (whose
/// receive-pack writes the objects). Every write the push depends on
/// reaches the disk through fsync or fdatasync, not only sled's
/// `sync_file_range`: git's pack in replica 1; node 1's Raft log (sled's
/// log file, fdatasync) before it moves the ref; the ref and its reflog
/// (libgit2 fsyncs the lock file before renaming it); on node 2 the pack it
/// fetched and its index, its log, and the ref it moved.
#[test]
fn every_write_a_push_depends_on_is_fsynced() {
    harness::tools::require("strace", "strace");
    let c = Cluster::start_with(3, &["--reconcile-interval-ms", "1000"]);
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "alice");
    user.commit("c1");
    user.push_ok(&reps[0], &["main"]);
    let traces: PathBuf = c.dir.path().join("traces");
    std::fs::create_dir_all(&traces).unwrap();
    let (node1, node2, push) = (
        traces.join("node1"),
        traces.join("node2"),
        traces.join("push"),
    );
    let tracers = [
        trace(c.node(1).pid().unwrap(), &node1),
        trace(c.node(2).pid().unwrap(), &node2),
    ];

    let c2 = user.commit_file("data.bin", &git::random_bytes(7, 256 * 1024), "c2");
    let started = now();
    // The same git command the harness runs, under strace.
    let git_push = git::git_cmd(&user.path, &["push", reps[0].to_str().unwrap(), "main"]);
    let out = Command::new("strace")
        .args([
            "-f",
            "-y",
            "-ttt",
            "-e",
            "trace=fsync,fdatasync,sync_file_range",
        ])
        .arg("-o")
        .arg(&push)
        .arg(git_push.get_program())
        .args(git_push.get_args())
        .current_dir(&user.path)
        .envs(git_push.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .stdin(Stdio::null())
        .output()
        .expect("strace git push");
    harness::git::assert_ok(&out, "git push under strace");
    let acknowledged = now();
    git::wait_converged(&c, &reps, MAIN, Some(&c2));
    drop(tracers);

    let n1 = calls(&node1);
    let n2 = calls(&node2);
    let p = calls(&push);
    let r1 = reps[0].display().to_string();
    let r2 = reps[1].display().to_string();
    let db1 = c.node(1).data_dir.join("db/db").display().to_string();
    let db2 = c.node(2).data_dir.join("db/db").display().to_string();
    let show = |calls: &[Call]| format!("{calls:#?}");

    // git wrote the pushed objects durably (core.fsync=committed, set by install).
    assert!(
        synced(&p, started, |f| f.starts_with(&r1)
            && f.contains("/objects/"))
        .is_some(),
        "git push did not fsync its objects in {r1}:\n{}",
        show(&p)
    );
    // Node 1: the log entry was on disk before the ref moved, and the ref
    // and its reflog were synced, all before the push was acknowledged.
    let log_synced = synced(&n1, started, |f| f == db1)
        .unwrap_or_else(|| panic!("node 1 never fdatasynced {db1}:\n{}", show(&n1)));
    let ref_synced = synced(&n1, started, |f| {
        f.starts_with(&r1) && f.ends_with("refs/heads/main.lock")
    })
    .unwrap_or_else(|| panic!("node 1 never fsynced the ref it moved:\n{}", show(&n1)));
    assert!(
        log_synced.at <= ref_synced.at && ref_synced.at <= acknowledged,
        "node 1: log synced at {}, ref at {}, push acknowledged at {acknowledged}",
        log_synced.at,
        ref_synced.at
    );
    assert!(
        synced(&n1, started, |f| f.starts_with(&r1)
            && f.ends_with("logs/refs/heads/main"))
        .is_some(),
        "node 1 never fsynced the reflog of the ref it moved:\n{}",
        show(&n1)
    );
    // Node 2: the log, the pack and its index, then the ref.
    assert!(
        synced(&n2, started, |f| f == db2).is_some(),
        "node 2 never fdatasynced {db2}:\n{}",
        show(&n2)
    );
    // libgit2 syncs the pack under its temporary name (pack_git2_...)
    // before renaming it, and the index through its lock file.
    let in_packs = |f: &str| f.starts_with(&r2) && f.contains("/objects/pack/pack");
    let pack = synced(&n2, started, |f| in_packs(f) && !f.contains("idx"))
        .unwrap_or_else(|| panic!("node 2 never fsynced the pack it fetched:\n{}", show(&n2)));
    assert!(
        synced(&n2, started, |f| in_packs(f) && f.contains("idx")).is_some(),
        "node 2 never fsynced the pack's index:\n{}",
        show(&n2)
    );
    let moved = synced(&n2, started, |f| {
        f.starts_with(&r2) && f.ends_with("refs/heads/main.lock")
    })
    .unwrap_or_else(|| panic!("node 2 never fsynced the ref it moved:\n{}", show(&n2)));
    assert!(
        pack.at <= moved.at,
        "node 2 moved the ref (synced at {}) before its pack was on disk (synced at {})",
        moved.at,
        pack.at
    );
}

/// SPEC §7.3 with `--durability quorum`: a large push is acknowledged by
/// replica 1, and in that instant the whole cluster freezes (SIGSTOP), so
/// nothing more can travel. At that moment another replica already holds
/// every object of the push. Then node 1 is killed and its replica
/// destroyed, the others resume, and both converge to the pushed commit
/// with no push from anyone: nothing acknowledged was lost.
///
/// With `--durability local` the same run leaves the others without the
/// objects (the pack of several MB is still in flight when the push
/// returns): the consensus would name a commit nobody has.
#[test]
fn quorum_durability_loses_nothing_when_the_origin_is_destroyed_at_once() {
    let mut c = Cluster::start_with(
        3,
        &["--durability", "quorum", "--reconcile-interval-ms", "1000"],
    );
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "laptop");
    let c1 = user.commit("c1");
    user.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c1));

    let c2 = user.commit_file(
        "big.bin",
        &git::random_bytes(42, 8 * 1024 * 1024),
        "c2, 8 MB",
    );
    user.push_ok(&reps[0], &["main"]);
    let pids: Vec<u32> = c
        .ids()
        .iter()
        .map(|&id| c.node(id).pid().unwrap())
        .collect();
    for &pid in &pids {
        signal(pid, "STOP");
    }
    // Every object of c2 is there: the walk succeeds and reports none missing.
    let complete_in = |repo: &Path| {
        let out = git::git(repo, &["rev-list", "--objects", "--missing=print", &c2]);
        out.status.success() && !harness::stdout(&out).lines().any(|l| l.starts_with('?'))
    };
    let holders: Vec<usize> = (1..3).filter(|&i| complete_in(&reps[i])).collect();
    assert!(
        !holders.is_empty(),
        "when the push was acknowledged, no replica but the origin had all of {c2}"
    );

    // The meteor: node 1 and its repository are gone.
    signal(pids[0], "CONT");
    c.kill(1);
    std::fs::remove_dir_all(&reps[0]).expect("destroy replica 1");
    for &pid in &pids[1..] {
        signal(pid, "CONT");
    }
    let survivors = &reps[1..];
    git::wait_converged(&c, survivors, MAIN, Some(&c2));
    assert_eq!(git::consensus(&c, 2, GROUP).get(MAIN), Some(&c2));
    for r in survivors {
        git::fsck(r);
    }
}

/// A one-node cluster with `--durability quorum` is its own majority:
/// pushes work (found in review: every push was refused).
#[test]
fn quorum_durability_on_a_single_node_accepts_pushes() {
    let c = Cluster::start_with(1, &["--durability", "quorum"]);
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "solo");
    let c1 = user.commit("c1");
    user.push_ok(&reps[0], &["main"]);
    assert_eq!(git::consensus(&c, 1, GROUP).get(MAIN), Some(&c1));
}
