//! Compatibility mode against a real etcd: what etcd itself can do to the
//! nodes (lose a member, restart, cut one node off, compact its history,
//! refuse a password) and the limits of a stock etcd. The update rule and
//! the failure scenarios run in etcd mode too, from their own files (see
//! `on_both_backends!`).

#[path = "harness/mod.rs"]
mod harness;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::etcd::Version;
use harness::git::{self, Work};
use harness::nemesis::Frozen;
use harness::proxy::Proxy;
use harness::{Backend, Cluster};

const GROUP: &str = "proj";
const MAIN: &str = "refs/heads/main";

fn cluster(backend: &Backend, n: usize) -> Cluster {
    Cluster::start_on(
        backend,
        n,
        &[
            "--reconcile-interval-ms",
            "1000",
            "--request-timeout-ms",
            &harness::SHORT_REQUEST_TIMEOUT_MS.to_string(),
        ],
    )
}

/// What a pusher has seen so far, readable while it runs.
#[derive(Default)]
struct Tally {
    acked: std::sync::atomic::AtomicUsize,
    failed: std::sync::atomic::AtomicUsize,
}

/// A pusher on replica 1 that commits and pushes until told to stop;
/// returns every commit whose push was acknowledged.
fn push_until(
    user: Work,
    target: PathBuf,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Vec<String> {
    let mut acked = Vec::new();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let c = user.commit(&format!("push {i}"));
        let out = user.push(&target, &["main"]);
        if out.status.success() {
            acked.push(c);
            tally.acked.fetch_add(1, Ordering::Relaxed);
        } else {
            tally.failed.fetch_add(1, Ordering::Relaxed);
            // After a failure the replica may hold a newer value than we
            // know of (a "may still take effect" that did): follow it.
            let _ = user.fetch(&target);
            let _ = user.git(&["reset", "--quiet", "--hard", "refs/remotes/r/main"]);
        }
    }
    acked
}

/// Every acknowledged commit is in `tip`'s history.
fn assert_none_lost(repo: &std::path::Path, acked: &[String], tip: &str) {
    for c in acked {
        let out = git::git(repo, &["merge-base", "--is-ancestor", c, tip]);
        assert!(
            out.status.success(),
            "acknowledged commit {c} is not in the final main {tip}"
        );
    }
}

/// SPEC §6: etcd's own fault tolerance carries piehole. etcd's leader, one
/// member of three, SIGKILLed (etcd 3.4 here, so both versions take
/// pushes): once the other two have elected a leader, pushes go on through
/// every replica, with the dead member still among the nodes' endpoints.
#[test]
fn one_etcd_member_of_three_killed_pushes_go_on() {
    let backend = Backend::etcd_cluster(3, Version::V3_4);
    let c = cluster(&backend, 3);
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "alice");
    let first = user.commit("before");
    user.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&first));

    // If it was etcd's leader, the other two elect one first (etcd's
    // election timeout, 1 s by default); pushes in that window fail with
    // "may still take effect", as any write to etcd then would.
    let leader = backend.etcd_server().leader();
    backend.etcd_server().kill(leader);
    backend.etcd_server().wait_healthy();
    for (i, rep) in reps.iter().chain(&reps).enumerate() {
        let out = user.fetch(rep);
        git::assert_ok(&out, "fetch");
        user.git_ok(&["reset", "--quiet", "--hard", "refs/remotes/r/main"]);
        let next = user.commit(&format!("with one etcd member down, push {}", i + 1));
        user.push_ok(rep, &["main"]);
        git::wait_converged(&c, &reps, MAIN, Some(&next));
    }
    for r in &reps {
        git::fsck(r);
    }
}

/// etcd restarted while a user pushes: pushes fail while it is away (with
/// a message naming etcd), none acknowledged is lost, and everything
/// converges once it is back.
#[test]
fn etcd_restarted_during_pushes_loses_no_acknowledged_push() {
    let backend = Backend::etcd();
    let c = cluster(&backend, 3);
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "alice");
    let first = user.commit("first");
    user.push_ok(&reps[0], &["main"]);

    // One push while etcd is down: refused, naming etcd, within the bound.
    backend.etcd_server().kill(0);
    let c_down = user.commit("while etcd is down");
    let started = Instant::now();
    let out = user.push(&reps[0], &["main"]);
    let took = started.elapsed();
    assert!(!out.status.success(), "{}", harness::show(&out));
    let err = harness::stderr(&out);
    assert!(err.contains("etcd"), "the refusal must name etcd:\n{err}");
    assert!(
        took < harness::REFUSAL_BOUND,
        "the refusal took {took:?}, beyond {:?}",
        harness::REFUSAL_BOUND
    );
    let _ = c_down;
    user.git_ok(&["reset", "--quiet", "--hard", "HEAD~1"]);
    backend.etcd_server().restart(0);
    backend.etcd_server().wait_healthy();

    // Now under a running pusher: some pushes acknowledged, then etcd
    // killed (pushes fail), then restarted (they are acknowledged again).
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let pusher = {
        let (stop, tally, target) = (stop.clone(), tally.clone(), reps[0].clone());
        std::thread::spawn(move || push_until(user, target, stop, tally))
    };
    let acks = |n: usize| {
        let tally = tally.clone();
        move || (tally.acked.load(Ordering::Relaxed) >= n).then_some(())
    };
    harness::poll_until("3 acknowledged pushes", Duration::from_secs(30), acks(3));
    backend.etcd_server().kill(0);
    let failed_before = tally.failed.load(Ordering::Relaxed);
    harness::poll_until(
        "a push to fail while etcd is down",
        Duration::from_secs(30),
        || (tally.failed.load(Ordering::Relaxed) > failed_before).then_some(()),
    );
    let acked_while_down = tally.acked.load(Ordering::Relaxed);
    backend.etcd_server().restart(0);
    harness::poll_until(
        "pushes to be acknowledged again after etcd came back",
        Duration::from_secs(30),
        acks(acked_while_down + 3),
    );
    stop.store(true, Ordering::Relaxed);
    let mut acked = pusher.join().expect("pusher");
    eprintln!(
        "{} pushes acknowledged, {} failed",
        acked.len(),
        tally.failed.load(Ordering::Relaxed)
    );
    acked.push(first);
    let tip = git::consensus(&c, 1, GROUP)[MAIN].clone();
    git::wait_converged(&c, &reps, MAIN, Some(&tip));
    assert_none_lost(&reps[1], &acked, &tip);
    for r in &reps {
        git::fsck(r);
    }
}

/// A node whose link to etcd is black-holed (a proxy drops every byte and
/// leaves connections open) misses pushes made elsewhere; `compact`, when
/// set, also compacts etcd past everything it saw. Once the link is back it
/// catches up: from its watch's revision, or by loading everything again.
fn cut_off_node_catches_up(version: Version, compact: bool) {
    let backend = Backend::etcd_cluster(1, version);
    let proxy = Proxy::start(backend.etcd_server().client_addr(0));
    let mut c = cluster(&backend, 3);
    c.kill(3);
    c.etcd_via.insert(3, format!("http://{}", proxy.addr()));
    c.restart(3);
    c.wait_ready();
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "alice");
    let first = user.commit("first");
    user.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&first));

    proxy.blackhole(true);
    let mut last = first.clone();
    for i in 0..3 {
        last = user.commit(&format!("while node 3 cannot see etcd ({i})"));
        user.push_ok(&reps[0], &["main"]);
    }
    git::wait_converged(&c, &reps[..2], MAIN, Some(&last));
    assert_eq!(
        git::rev_parse_ref(&reps[2], MAIN).as_deref(),
        Some(first.as_str()),
        "replica 3 moved while its node could not see etcd"
    );
    assert!(proxy.dropped_bytes() > 0, "the black-hole dropped nothing");
    if compact {
        let etcd = backend.etcd_server();
        let rev = etcd.revision().to_string();
        let out = etcd.ctl(&["compact", &rev, "--physical"]);
        assert!(out.status.success(), "etcdctl compact: {out:?}");
    }
    let healed = Instant::now();
    proxy.blackhole(false);
    git::wait_converged(&c, &reps, MAIN, Some(&last));
    eprintln!(
        "replica 3 caught up {:?} after its link to etcd came back",
        healed.elapsed()
    );
    let reloaded = c
        .log(3)
        .contains("etcd compacted past this node's revision");
    assert_eq!(
        reloaded,
        compact,
        "node 3 caught up {} a full reload:\n{}",
        if compact { "without" } else { "through" },
        c.log(3)
    );
    // It takes pushes again.
    let after = user.commit("after the heal");
    user.push_ok(&reps[2], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&after));
}

#[test]
fn a_node_cut_off_from_etcd_catches_up_when_it_reconnects() {
    cut_off_node_catches_up(Version::V3_5, false);
}

#[test]
fn a_node_whose_revision_was_compacted_away_loads_everything_again() {
    cut_off_node_catches_up(Version::V3_5, true);
}

/// The same on etcd 3.4, whose watch and compaction answers differ in
/// detail from 3.5's.
#[test]
fn on_etcd_3_4_a_node_whose_revision_was_compacted_away_loads_everything_again() {
    cut_off_node_catches_up(Version::V3_4, true);
}

/// A stock etcd allows 128 operations per transaction. An atomic push of
/// 10,000 tags and a clobber of a 10,000-ref group go through anyway, whole
/// (each transaction of 100 keys is far below the 1.5 MiB request limit).
#[test]
fn ten_thousand_refs_atomic_push_and_clobber_against_default_limits() {
    const TAGS: usize = 10_000;
    let backend = Backend::etcd();
    // No reconcile pass may restore the tags dropped below before clobber.
    let c = Cluster::start_on(
        &backend,
        1,
        &[
            "--request-timeout-ms",
            "20000",
            "--reconcile-interval-ms",
            "600000",
        ],
    );
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "alice");
    let tagged = user.commit("tagged");
    user.push_ok(&reps[0], &["main"]);
    let mut stream = String::new();
    for i in 0..TAGS {
        stream.push_str(&format!("reset refs/tags/t{i:05}\nfrom {tagged}\n\n"));
    }
    stream.push_str("done\n");
    user.fast_import(stream.as_bytes());

    let started = Instant::now();
    let out = user.git(&["push", "--atomic", reps[0].to_str().unwrap(), "--tags"]);
    git::assert_ok(&out, "git push --atomic --tags");
    eprintln!("atomic push of {TAGS} tags took {:?}", started.elapsed());
    let consensus = git::consensus(&c, 1, GROUP);
    assert_eq!(consensus.len(), TAGS + 1, "tags and main in the consensus");
    let keys = backend.etcd_server().count(&c.etcd_prefix);
    assert!(
        keys >= (TAGS + 1) as u64,
        "{keys} keys under {}",
        c.etcd_prefix
    );
    // The node moves the replica's refs for a while after acknowledging.
    git::wait_all_refs(&c, &reps, &consensus);

    // Clobber from the replica after dropping every odd tag there.
    let mut drop = String::new();
    for i in (1..TAGS).step_by(2) {
        drop.push_str(&format!("delete refs/tags/t{i:05}\n"));
    }
    let mut cmd = git::git_cmd(&reps[0], &["update-ref", "--stdin"]);
    let out = harness_stdin(&mut cmd, drop.as_bytes());
    git::assert_ok(&out, "git update-ref --stdin");
    let started = Instant::now();
    let out = git::piehole_in(&reps[0], &["clobber", "--prune"]);
    git::assert_ok(&out, "piehole clobber --prune");

    eprintln!(
        "clobber to {} refs took {:?}",
        TAGS / 2 + 1,
        started.elapsed()
    );
    let consensus = git::consensus(&c, 1, GROUP);
    assert_eq!(consensus.len(), TAGS / 2 + 1, "even tags and main remain");
    assert!(consensus.contains_key("refs/tags/t00000"));
    assert!(!consensus.contains_key("refs/tags/t00001"));
    // The old generation went with the flip: only the visible refs remain.
    let gens = format!("{}groups/{GROUP}/gen/", c.etcd_prefix);
    assert_eq!(backend.etcd_server().count(&gens), (TAGS / 2 + 1) as u64);
}

fn harness_stdin(cmd: &mut Command, input: &[u8]) -> std::process::Output {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

/// The root user, with password `ROOT_PASSWORD`, and authentication on.
fn enable_auth(backend: &Backend) {
    let etcd = backend.etcd_server();
    let root = format!("root:{ROOT_PASSWORD}");
    for args in [
        &["user", "add", &root][..],
        &["user", "grant-role", "root", "root"][..],
        &["auth", "enable"][..],
    ] {
        let out = etcd.ctl(args);
        assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
    }
}

const ROOT_PASSWORD: &str = "s3cret-root";

/// etcd with authentication on: a node with the wrong password stops at
/// once with one clear line; with the right one it works.
#[test]
fn a_wrong_etcd_password_stops_the_node_the_right_one_works() {
    let backend = Backend::etcd();
    enable_auth(&backend);
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = dir.path().join("wrong");
    let right = dir.path().join("right");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    std::fs::write(&right, format!("{ROOT_PASSWORD}\n")).unwrap();

    let mut cmd = Command::new(harness::piehole());
    cmd.args([
        "node",
        "--id",
        "1",
        "--data-dir",
        dir.path().join("node").to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{}", harness::free_port()),
        "--etcd",
        &backend.etcd_server().endpoints(),
        "--etcd-user",
        "root",
        "--etcd-password-file",
        wrong.to_str().unwrap(),
    ]);
    let out = harness::run_expect_exit(cmd, Duration::from_secs(20));
    let line = harness::assert_one_line_error(&out, 1);
    assert!(
        line.contains("etcd") && line.contains("authentication failed"),
        "{line}"
    );

    let c = Cluster::start_on(
        &backend,
        2,
        &[
            "--etcd-user",
            "root",
            "--etcd-password-file",
            right.to_str().unwrap(),
        ],
    );
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "alice");
    let tip = user.commit("with auth");
    user.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&tip));
}

/// Restarts every node of `c` with `args` as its own extra arguments, on
/// `backend`; returns once they are ready.
fn restart_all(c: &mut Cluster, backend: &Backend, args: &[&str]) {
    for id in c.ids() {
        c.kill(id);
    }
    c.backend = backend.clone();
    for id in c.ids() {
        c.set_node_args(id, args);
    }
    c.restart_all();
    c.wait_ready();
}

/// `piehole consensus export` from node 1, into a file; returns its path.
fn export(c: &Cluster, name: &str) -> PathBuf {
    let sock = c.socket(1);
    let out = c.run(&["consensus", "export", "--node", sock.to_str().unwrap()]);
    git::assert_ok(&out, "piehole consensus export");
    let file = c.dir.path().join(name);
    std::fs::write(&file, &out.stdout).expect("write the export");
    file
}

fn import(c: &Cluster, file: &std::path::Path) {
    let sock = c.socket(1);
    let out = c.run(&[
        "consensus",
        "import",
        file.to_str().unwrap(),
        "--node",
        sock.to_str().unwrap(),
    ]);
    git::assert_ok(&out, "piehole consensus import");
}

/// SPEC §6 (moving between modes): embedded Raft to etcd and back, as the
/// README says: restart the nodes `--paused`, export, restart them on the
/// other backend (fresh) still paused, import, restart them unpaused. No
/// replica changes on the way, and pushes work at each end.
#[test]
fn moving_from_raft_to_etcd_and_back_changes_no_replica() {
    let etcd = Backend::etcd();
    let mut c = Cluster::start_on(&Backend::Raft, 3, &["--reconcile-interval-ms", "1000"]);
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "alice");
    user.commit("on raft");
    user.git_ok(&["tag", "v1"]);
    user.push_ok(&reps[0], &["main", "v1"]);
    let tip = user.head();
    git::wait_converged(&c, &reps, MAIN, Some(&tip));
    let snapshot =
        |reps: &[PathBuf]| -> Vec<_> { reps.iter().map(|r| git::replicated_refs(r)).collect() };

    for (to, name) in [
        (etcd.clone(), "to-etcd.json"),
        (Backend::Raft, "to-raft.json"),
    ] {
        let before = snapshot(&reps);
        let from = c.backend.clone();
        restart_all(&mut c, &from, &["--paused"]);
        let paused = user.commit("while paused");
        let out = user.push(&reps[1], &["main"]);
        git::assert_failed_with(&out, "a push to a paused node", "pushes are paused");
        user.git_ok(&["reset", "--quiet", "--hard", "HEAD~1"]);
        let _ = paused;

        let file = export(&c, name);
        if !to.is_etcd() {
            // The embedded Raft starts over from empty data dirs.
            for id in c.ids() {
                c.kill(id);
                let db = c.node(id).data_dir.join("db");
                std::fs::remove_dir_all(&db).expect("remove the old Raft state");
            }
        }
        restart_all(&mut c, &to, &["--paused"]);
        import(&c, &file);
        let expected = &before[0];
        assert_eq!(&git::consensus(&c, 2, GROUP), expected, "after the import");
        restart_all(&mut c, &to, &[]);
        assert_eq!(snapshot(&reps), before, "a replica changed on the way");
        let next = user.commit(&format!("after moving to {name}"));
        user.push_ok(&reps[2], &["main"]);
        git::wait_converged(&c, &reps, MAIN, Some(&next));
        // By now every node has made several passes: nothing else moved.
        let without_main = |refs: Vec<std::collections::BTreeMap<String, String>>| {
            refs.into_iter()
                .map(|mut r| {
                    r.remove(MAIN);
                    r
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            without_main(snapshot(&reps)),
            without_main(before),
            "a replica's other refs changed after the move"
        );
    }
}

/// etcd that takes clients over TLS with a certificate only: a node with
/// the CA but no client certificate stops with one line naming etcd; with
/// its certificate and key the cluster takes pushes.
#[test]
fn etcd_over_tls_with_client_certificates() {
    let backend = Backend::etcd_tls();
    let (ca, cert, key, endpoints) = {
        let etcd = backend.etcd_server();
        let t = etcd.tls.as_ref().expect("a TLS etcd");
        (
            t.ca.display().to_string(),
            t.client_cert.display().to_string(),
            t.client_key.display().to_string(),
            etcd.endpoints(),
        )
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(harness::piehole());
    cmd.args([
        "node",
        "--id",
        "1",
        "--data-dir",
        dir.path().join("node").to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{}", harness::free_port()),
        "--etcd",
        &endpoints,
        "--etcd-ca",
        &ca,
    ]);
    // A refusal, not an unreachable etcd: no 30 s of retries first.
    let out = harness::run_expect_exit(cmd, Duration::from_secs(10));
    let line = harness::assert_one_line_error(&out, 1);
    assert!(
        line.contains("etcd refused") && line.to_lowercase().contains("certificate"),
        "{line}"
    );

    let c = Cluster::start_on(
        &backend,
        2,
        &["--etcd-ca", &ca, "--etcd-cert", &cert, "--etcd-key", &key],
    );
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "alice");
    let tip = user.commit("over TLS");
    user.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&tip));
}

/// An etcd shared with other users: the last change in etcd may be outside
/// piehole's prefix, and no watch event of piehole's ever reaches that
/// revision. Reads that must be current still answer (the node asks etcd
/// for a progress notification).
#[test]
fn writes_outside_the_prefix_do_not_stall_linearizable_reads() {
    let backend = Backend::etcd();
    let c = cluster(&backend, 2);
    let out = backend
        .etcd_server()
        .ctl(&["put", "/someone-else/key", "value"]);
    assert!(out.status.success(), "etcdctl put: {out:?}");
    // A new group: its first read is of a group with no key yet.
    let reps = git::replicas(&c, "fresh");
    let user = Work::new(&c, "alice");
    let tip = user.commit("first");
    user.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&tip));
    let out = backend
        .etcd_server()
        .ctl(&["put", "/someone-else/key", "again"]);
    assert!(out.status.success(), "etcdctl put: {out:?}");
    // A group with no key at all: only progress tells the node it is current.
    let started = Instant::now();
    assert!(c.refs(2, "never-pushed", false).is_empty());
    assert!(
        started.elapsed() < Duration::from_millis(harness::SHORT_REQUEST_TIMEOUT_MS),
        "a linearizable read took {:?}",
        started.elapsed()
    );
    assert_eq!(git::consensus(&c, 2, "fresh")[MAIN], tip);
}

/// Two nodes never run under one id: a second one is refused at start;
/// and a node whose lease etcd dropped (here: revoked by hand) while
/// another took its id stops rather than take it back.
#[test]
fn one_id_one_node() {
    let backend = Backend::etcd();
    let c = cluster(&backend, 1);
    let node = |dir: &std::path::Path| {
        let mut cmd = Command::new(harness::piehole());
        cmd.args([
            "node",
            "--id",
            "1",
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{}", harness::free_port()),
            "--etcd",
            &backend.etcd_server().endpoints(),
            "--etcd-prefix",
            &c.etcd_prefix,
        ]);
        cmd
    };
    let other = tempfile::tempdir().expect("tempdir");
    let out = harness::run_expect_exit(node(other.path()), Duration::from_secs(20));
    let line = harness::assert_one_line_error(&out, 1);
    assert!(line.contains("another node runs as id 1"), "{line}");

    // etcd forgets node 1's lease; a second node 1 starts meanwhile.
    let alive = format!("{}nodes/1/alive", c.etcd_prefix);
    let holder = || {
        let out = backend.etcd_server().ctl(&["get", &alive, "-w", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let kv = &v["kvs"][0];
        (kv["value"].as_str().map(String::from), kv["lease"].as_i64())
    };
    let (first_token, lease) = holder();
    let lease = lease.expect("the liveness key has a lease");
    // Frozen, the first node cannot renew before the second one claims.
    let frozen = Frozen::stop(&c, 1);
    let out = backend
        .etcd_server()
        .ctl(&["lease", "revoke", &format!("{lease:x}")]);
    assert!(out.status.success(), "etcdctl lease revoke: {out:?}");
    let mut second = harness::ChildGuard(
        node(other.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn the second node 1"),
    );
    harness::poll_until(
        "the second node 1 to hold the id",
        Duration::from_secs(20),
        || {
            let (token, _) = holder();
            (token.is_some() && token != first_token).then_some(())
        },
    );
    drop(frozen);
    let mut c = c;
    harness::poll_until(
        "the first node 1 to stop once its id is taken",
        Duration::from_secs(30),
        || (!c.is_running(1)).then_some(()),
    );
    assert!(second.alive(), "the second node 1 should run on");
    assert!(
        c.log(1).contains("another node runs as id 1"),
        "the first node stopped without saying why:\n{}",
        c.log(1)
    );
    c.kill(1);
}

/// etcd's auth tokens expire; the node logs in again by itself.
#[test]
fn an_expired_etcd_auth_token_is_renewed() {
    let backend = Backend::Etcd(Arc::new(std::sync::Mutex::new(
        harness::etcd::Etcd::start_with(Version::V3_5, &["--auth-token-ttl", "1"]),
    )));
    enable_auth(&backend);
    let dir = tempfile::tempdir().expect("tempdir");
    let password = dir.path().join("password");
    std::fs::write(&password, format!("{ROOT_PASSWORD}\n")).unwrap();
    let c = Cluster::start_on(
        &backend,
        2,
        &[
            "--etcd-user",
            "root",
            "--etcd-password-file",
            password.to_str().unwrap(),
        ],
    );
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "alice");
    for i in 0..3 {
        // Idle past the token's life (1 s, swept every few seconds by etcd).
        let idle = Instant::now() + Duration::from_secs(4);
        harness::poll_until("time to pass", Duration::from_secs(10), || {
            (Instant::now() >= idle).then_some(())
        });
        let tip = user.commit(&format!("after idling {i}"));
        user.push_ok(&reps[0], &["main"]);
        git::wait_converged(&c, &reps, MAIN, Some(&tip));
    }
}

/// A generation left by a writer that died between chunks is invisible,
/// and swept once no flip can reach it; the group's refs stay as they were.
#[test]
fn an_abandoned_generation_is_swept_and_never_seen() {
    let backend = Backend::etcd();
    let c = cluster(&backend, 1);
    let reps = git::replicas(&c, GROUP);
    let user = Work::new(&c, "alice");
    let tip = user.commit("first");
    user.push_ok(&reps[0], &["main"]);
    // What a writer that read version 1 and died leaves: no flip can hold,
    // since the head has long moved past version 1.
    let ghost = format!(
        "{}groups/{GROUP}/gen/1-9-0badf00d/refs/heads/ghost",
        c.etcd_prefix
    );
    // One written against the head's present version may still be flipped
    // to (a push in progress): the sweep leaves it.
    let head = format!("{}groups/{GROUP}/head", c.etcd_prefix);
    let out = backend.etcd_server().ctl(&["get", &head, "-w", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let version = v["kvs"][0]["mod_revision"].as_i64().expect("a head");
    let live = format!(
        "{}groups/{GROUP}/gen/{version}-9-0000cafe/refs/heads/in-progress",
        c.etcd_prefix
    );
    let out = backend
        .etcd_server()
        .ctl(&["put", &live, &format!("{tip} 9")]);
    assert!(out.status.success(), "etcdctl put: {out:?}");
    // The dead one last: the sweep that removes it has seen the live one.
    let out = backend
        .etcd_server()
        .ctl(&["put", &ghost, &format!("{tip} 9")]);
    assert!(out.status.success(), "etcdctl put: {out:?}");
    assert!(!git::consensus(&c, 1, GROUP).contains_key("refs/heads/ghost"));
    harness::poll_until(
        "the abandoned generation to be swept",
        Duration::from_secs(20),
        || (backend.etcd_server().count(&ghost) == 0).then_some(()),
    );
    assert_eq!(
        backend.etcd_server().count(&live),
        1,
        "the sweep removed a generation a flip could still reach"
    );
    let consensus = git::consensus(&c, 1, GROUP);
    assert_eq!(consensus.len(), 1, "{consensus:?}");
    assert_eq!(consensus[MAIN], tip);
}
