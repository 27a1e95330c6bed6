//! Consensus refs through the embedded Raft cluster (SPEC §2, §6, §7.8):
//! leader election, CAS semantics through any node, linearizable reads,
//! leader loss, minority behaviour, log compaction and snapshot catch-up,
//! and the node's configuration errors.

#![allow(dead_code)]

#[path = "harness/mod.rs"]
mod harness;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::*;

const MAIN: &str = "refs/heads/main";

/// A cluster of three whose requests time out after [`harness::SHORT_REQUEST_TIMEOUT_MS`].
fn cluster_with_request_timeout() -> Cluster {
    Cluster::start_with(
        3,
        &[
            "--request-timeout-ms",
            &harness::SHORT_REQUEST_TIMEOUT_MS.to_string(),
        ],
    )
}

/// On node `id`, cut off from the majority: a linearizable `ref get` must
/// refuse (the majority may have moved on without this node, so its own
/// state is no answer) with one line on stderr that names the missing
/// quorum, nothing on stdout, within [`harness::REFUSAL_BOUND`]; `ref get --local`
/// still answers, with `last` (what the node applied before it was cut off).
#[track_caller]
fn assert_minority_refuses_linearizable_read(
    c: &Cluster,
    id: u64,
    group: &str,
    last: &BTreeMap<String, String>,
) {
    let sock = c.socket(id);
    let sock = sock.to_str().expect("socket path is UTF-8");
    let start = Instant::now();
    let o = c.run(&["ref", "--node", sock, "get", group, "--json"]);
    let elapsed = start.elapsed();
    let line = assert_one_line_error(&o, 1);
    eprintln!("linearizable read on node {id}, after {elapsed:?}: {line}");
    assert!(
        line.contains("quorum"),
        "a linearizable read on a minority must say the quorum is missing: {}",
        show(&o)
    );
    assert!(
        stdout(&o).trim().is_empty(),
        "a refused read printed refs anyway: {}",
        show(&o)
    );
    assert!(
        elapsed < harness::REFUSAL_BOUND,
        "the refusal of a linearizable read took {elapsed:?}; bound {:?}",
        harness::REFUSAL_BOUND
    );
    assert_eq!(
        &c.refs(id, group, true /* local */),
        last,
        "ref get --local on the minority node {id}"
    );
}

#[test]
fn three_nodes_elect_one_leader() {
    let c = Cluster::start(3);
    let leader = c.wait_leader();
    assert!((1..=3).contains(&leader));
    // Every node names that leader, reports the raft backend and sees its peers.
    poll_until(
        "all members reachable from every node",
        Duration::from_secs(20),
        || {
            for id in 1..=3u64 {
                let s = c.try_status(id)?;
                if s["leader_id"].as_u64() != Some(leader) {
                    return None;
                }
                let members = s["members"].as_array()?;
                if members.len() != 3 || !members.iter().all(|m| m["reachable"] == true) {
                    return None;
                }
            }
            Some(())
        },
    );
    let mut terms = Vec::new();
    for id in 1..=3u64 {
        let s = c.status(id);
        assert_eq!(s["node_id"].as_u64(), Some(id), "{s}");
        assert_eq!(s["backend"], "raft", "{s}");
        assert_eq!(s["leader_id"].as_u64(), Some(leader), "{s}");
        let mut ids: Vec<u64> = s["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_u64().unwrap())
            .collect();
        ids.sort();
        assert_eq!(ids, vec![1, 2, 3], "{s}");
        for m in s["members"].as_array().unwrap() {
            let id = m["id"].as_u64().unwrap();
            assert_eq!(m["addr"], c.node(id).addr.as_str(), "{s}");
        }
        terms.push(s["term"].as_u64().unwrap());
    }
    // One leader means one term all nodes agree on.
    assert!(
        terms.iter().all(|&t| t == terms[0] && t > 0),
        "terms {terms:?}"
    );
}

#[test]
fn cas_through_any_node() {
    let c = Cluster::start(3);
    let (a, b, x) = (oid(1), oid(2), oid(3));

    // Create through node 1.
    assert_eq!(c.cas_ok(1, "g", MAIN, ZERO, &a), a);
    // Move through node 2.
    assert_eq!(c.cas_ok(2, "g", MAIN, &a, &b), b);

    // Conflict through node 3: stale old value. Exit 3, prints the current value.
    let o = c.cas(3, "g", MAIN, &a, &x);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert_eq!(stdout(&o).trim(), format!("conflict {b}"), "{}", show(&o));
    // Creating what already exists is a conflict too.
    let o = c.cas(1, "g", MAIN, ZERO, &x);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert_eq!(stdout(&o).trim(), format!("conflict {b}"), "{}", show(&o));
    // ... and neither changed anything, on any node.
    for id in 1..=3 {
        // (a local read may lag behind, but must never show the refused value)
        let refs = c.refs(id, "g", true);
        assert_ne!(
            refs.get(MAIN),
            Some(&x),
            "node {id}: conflict changed the ref"
        );
        assert_eq!(
            c.refs(id, "g", false),
            BTreeMap::from([(MAIN.to_string(), b.clone())]),
            "node {id}"
        );
    }

    // Repeating an applied CAS (the consensus already equals NEW) is applied.
    assert_eq!(c.cas_ok(3, "g", MAIN, &a, &b), b);
    assert_eq!(c.cas_ok(1, "g", MAIN, &a, &b), b);

    // Delete through node 3; prints all zeros for "absent".
    assert_eq!(c.cas_ok(3, "g", MAIN, &b, ZERO), ZERO);
    for id in 1..=3 {
        assert_eq!(c.refs(id, "g", false), BTreeMap::new(), "node {id}");
    }
    // Repeating the delete is applied; a move of the absent ref conflicts.
    assert_eq!(c.cas_ok(2, "g", MAIN, &b, ZERO), ZERO);
    let o = c.cas(2, "g", MAIN, &b, &x);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert_eq!(
        stdout(&o).trim(),
        format!("conflict {ZERO}"),
        "{}",
        show(&o)
    );

    // Another group is independent.
    assert_eq!(c.cas_ok(1, "other", MAIN, ZERO, &x), x);
    assert_eq!(c.refs(2, "g", false), BTreeMap::new());

    // Read-your-writes across nodes: a CAS acknowledged by one node is seen by
    // an immediate linearizable read on another, every time.
    let mut prev = ZERO.to_string();
    for i in 0..50u64 {
        let w = i % 3 + 1;
        let r = (i + 1) % 3 + 1;
        let next = oid(1000 + i);
        assert_eq!(c.cas_ok(w, "lin", MAIN, &prev, &next), next);
        let seen = c.refs(r, "lin", false);
        assert_eq!(
            seen.get(MAIN),
            Some(&next),
            "iteration {i}: CAS acknowledged by node {w} not seen by a linearizable read on node {r}"
        );
        prev = next;
    }
}

#[test]
fn leader_killed_new_leader_elected_and_restart_catches_up() {
    let mut c = Cluster::start(3);
    assert_eq!(c.cas_ok(1, "g", MAIN, ZERO, &oid(1)), oid(1));
    assert_eq!(c.cas_ok(2, "g", "refs/tags/v1", ZERO, &oid(2)), oid(2));

    let old_leader = c.wait_leader();
    c.kill(old_leader);
    let survivors: Vec<u64> = (1..=3).filter(|&i| i != old_leader).collect();

    let new_leader = c.wait_leader();
    assert_ne!(new_leader, old_leader);
    assert!(survivors.contains(&new_leader));

    // The majority accepts writes again, through either survivor. A CAS that
    // raced the election may fail; a retry of it is applied (consensus == new).
    let s0 = survivors[0];
    poll_until("survivors accept a CAS", Duration::from_secs(30), || {
        let o = c.cas(s0, "g", MAIN, &oid(1), &oid(10));
        (o.status.success()).then_some(())
    });
    assert_eq!(
        c.cas_ok(survivors[1], "g", MAIN, &oid(10), &oid(11)),
        oid(11)
    );
    assert_eq!(c.cas_ok(s0, "g", "refs/heads/new", ZERO, &oid(12)), oid(12));
    assert_eq!(
        c.cas_ok(survivors[1], "g", "refs/tags/v1", &oid(2), ZERO),
        ZERO
    );
    let expected = c.refs(survivors[1], "g", false);
    assert_eq!(
        expected,
        BTreeMap::from([
            (MAIN.to_string(), oid(11)),
            ("refs/heads/new".to_string(), oid(12)),
        ])
    );

    // The old leader comes back and catches up without help.
    c.restart(old_leader);
    poll_until(
        "restarted node's local refs equal the cluster's",
        Duration::from_secs(30),
        || {
            let local = c.try_refs(old_leader, "g", true /* local */)?;
            let lin = c.try_refs(survivors[0], "g", false)?;
            (local == lin && lin == expected).then_some(())
        },
    );
    // It is a full member again: everyone agrees on a leader and it takes writes.
    c.wait_leader();
    poll_until(
        "restarted node accepts a CAS",
        Duration::from_secs(30),
        || {
            let o = c.cas(old_leader, "g", MAIN, &oid(11), &oid(13));
            o.status.success().then_some(())
        },
    );
    for id in 1..=3 {
        assert_eq!(
            c.refs(id, "g", false).get(MAIN),
            Some(&oid(13)),
            "node {id}"
        );
    }
}

/// Two of three nodes are SIGKILLed, the leader among them. The survivor
/// refuses compare-and-swaps (moves, creations) with one line saying "no
/// quorum" within the bound, refuses linearizable reads the same way, and
/// still answers local reads with the last value. Once the others are back,
/// that value is intact everywhere and the cluster takes writes again.
#[test]
fn two_nodes_killed_no_quorum() {
    let mut c = cluster_with_request_timeout();
    assert_eq!(c.cas_ok(1, "g", MAIN, ZERO, &oid(1)), oid(1));
    let leader = c.wait_leader();
    // The survivor is a follower; kill the leader and the other follower.
    let survivor = (1..=3).find(|&i| i != leader).unwrap();
    for id in 1..=3 {
        if id != survivor {
            c.kill(id);
        }
    }

    let start = Instant::now();
    let o = c.cas(survivor, "g", MAIN, &oid(1), &oid(2));
    let elapsed = start.elapsed();
    let line = assert_one_line_error(&o, 1);
    assert!(line.contains("no quorum"), "{}", show(&o));
    assert!(
        elapsed < harness::REFUSAL_BOUND,
        "no-quorum error took {elapsed:?}; bound {:?}",
        harness::REFUSAL_BOUND
    );
    // Deleting and creating fail the same way.
    let o = c.cas(survivor, "g", "refs/heads/other", ZERO, &oid(3));
    assert!(
        assert_one_line_error(&o, 1).contains("no quorum"),
        "{}",
        show(&o)
    );

    // The minority refuses linearizable reads and still serves local ones,
    // which show nothing changed.
    assert_minority_refuses_linearizable_read(
        &c,
        survivor,
        "g",
        &BTreeMap::from([(MAIN.to_string(), oid(1))]),
    );
    // Its status still answers and names no leader.
    let s = c.status(survivor);
    assert!(
        s["leader_id"].is_null() || s["leader_id"].as_u64() == Some(survivor),
        "{s}"
    );

    // The other two come back; the earlier value is intact everywhere.
    for id in 1..=3 {
        if id != survivor {
            c.restart(id);
        }
    }
    c.wait_leader();
    for id in 1..=3 {
        let refs = poll_until(
            &format!("node {id} answers a linearizable read"),
            Duration::from_secs(30),
            || c.try_refs(id, "g", false),
        );
        assert_eq!(
            refs,
            BTreeMap::from([(MAIN.to_string(), oid(1))]),
            "node {id}"
        );
    }
    // And the cluster works again.
    poll_until(
        "cluster accepts a CAS again",
        Duration::from_secs(30),
        || {
            c.cas(survivor, "g", MAIN, &oid(1), &oid(4))
                .status
                .success()
                .then_some(())
        },
    );
}

/// Like `two_nodes_killed_no_quorum`, but the survivor is the leader, which
/// still believes it leads for a moment after losing its followers: it
/// refuses a linearizable read at once, then (once it sees it is alone) a
/// compare-and-swap with "no quorum ... nothing was changed" within the
/// bound; and the refused CAS never takes effect after the others return.
#[test]
fn minority_leader_rejects_with_no_quorum_and_changes_nothing() {
    let mut c = cluster_with_request_timeout();
    assert_eq!(c.cas_ok(1, "g", MAIN, ZERO, &oid(1)), oid(1));
    let leader = c.wait_leader();
    for id in 1..=3 {
        if id != leader {
            c.kill(id);
        }
    }
    // At once, while it may still believe it leads: a leader that answered
    // linearizable reads from its own state (as if it held a lease) would
    // answer here, and after a real partition the majority could have moved
    // on without it.
    let before = BTreeMap::from([(MAIN.to_string(), oid(1))]);
    assert_minority_refuses_linearizable_read(&c, leader, "g", &before);
    // Once the survivor can see it is alone (as its status shows), it must
    // refuse without proposing: a proposal, once in its log, could still be
    // committed by a later leader. Before that moment the honest answer is
    // "outcome unknown", which the node gives as LostQuorum/TimedOut.
    poll_until(
        "the leader to see both peers unreachable",
        Duration::from_secs(10),
        || {
            let s = c.status(leader);
            let members = s["members"].as_array().cloned().unwrap_or_default();
            members
                .iter()
                .all(|m| m["id"].as_u64() == Some(leader) || m["reachable"] == false)
                .then_some(())
        },
    );
    let start = Instant::now();
    let o = c.cas(leader, "g", MAIN, &oid(1), &oid(2));
    let elapsed = start.elapsed();
    let line = assert_one_line_error(&o, 1);
    assert!(
        line.contains("no quorum") && line.contains("nothing was changed"),
        "{}",
        show(&o)
    );
    assert!(
        elapsed < harness::REFUSAL_BOUND,
        "took {elapsed:?}; bound {:?}",
        harness::REFUSAL_BOUND
    );
    assert_eq!(c.refs(leader, "g", true), before);
    for id in 1..=3 {
        if id != leader {
            c.restart(id);
        }
    }
    c.wait_leader();
    // The rejected CAS must not take effect later, whoever wins the election.
    let after = poll_until(
        "linearizable read after restart",
        Duration::from_secs(30),
        || c.try_refs(leader, "g", false),
    );
    assert_eq!(
        after,
        BTreeMap::from([(MAIN.to_string(), oid(1))]),
        "a CAS rejected with \"no quorum\" was applied after the quorum came back"
    );
}

#[test]
fn ten_thousand_cas_then_restart_and_snapshot_catch_up() {
    const N: u64 = 10_000;
    const TASKS: u64 = 32;
    let mut c = Cluster::start_with(3, &["--snapshot-interval", "500"]);
    c.kill(3);
    c.wait_leader();

    // 10,000 creations through node 1: TASKS concurrent clients, distinct refs.
    let name = |i: u64| format!("refs/heads/t{}/r{}", i % TASKS, i);
    let rt = runtime();
    let started = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let sock = c.socket(1);
            tasks.push(tokio::spawn(async move {
                let mut client = piehole_client::LocalClient::connect(&sock)
                    .await
                    .expect("connect");
                let mut i = t;
                while i < N {
                    let r = format!("refs/heads/t{}/r{}", i % TASKS, i);
                    let out = client
                        .cas("bulk", &r, None, Some(&oid(i)))
                        .await
                        .unwrap_or_else(|e| panic!("cas {r}: {e}"));
                    assert!(out.applied, "cas {r}: {out:?}");
                    assert_eq!(out.current.as_deref(), Some(oid(i).as_str()));
                    i += TASKS;
                }
            }));
        }
        for t in tasks {
            t.await.expect("CAS task");
        }
    });
    eprintln!("{N} CAS took {:?}", started.elapsed());

    // The log was compacted on the live nodes.
    for id in [1, 2] {
        let s = c.status(id);
        assert_eq!(s["refs"].as_u64(), Some(N), "node {id}: {s}");
        assert!(
            s["first_log_index"].as_u64().unwrap() > 1,
            "node {id} not compacted: {s}"
        );
        assert!(
            s["snapshot_index"].as_u64().unwrap() > 0,
            "node {id} not compacted: {s}"
        );
    }
    let leader = c.wait_leader();
    let leader_commit = c.status(leader)["commit_index"].as_u64().unwrap();

    // Node 3 comes back behind the compacted log: it must catch up by snapshot.
    c.restart(3);
    let s3 = poll_until("node 3 catches up", Duration::from_secs(60), || {
        let s = c.try_status(3)?;
        (s["refs"].as_u64()? == N && s["applied_index"].as_u64()? >= leader_commit).then_some(s)
    });
    assert!(
        s3["snapshots_installed"].as_u64().unwrap() >= 1,
        "node 3 caught up without installing a snapshot: {s3}"
    );
    let expected: BTreeMap<String, String> = (0..N).map(|i| (name(i), oid(i))).collect();
    let local3 = rt.block_on(async {
        c.client(3)
            .await
            .refs("bulk", false)
            .await
            .expect("refs on node 3")
    });
    assert!(
        local3 == expected,
        "node 3's refs differ from what was written"
    );

    // Kill everything and start again from the data dirs: all state survives.
    for id in 1..=3 {
        c.kill(id);
    }
    for id in 1..=3 {
        c.restart(id);
    }
    c.wait_leader();
    for id in 1..=3 {
        let s = c.status(id);
        assert_eq!(
            s["refs"].as_u64(),
            Some(N),
            "node {id} after full restart: {s}"
        );
    }
    let lin = rt.block_on(async {
        c.client(2)
            .await
            .refs("bulk", true)
            .await
            .expect("linearizable refs")
    });
    assert!(
        lin == expected,
        "state after a full restart differs from what was written"
    );
    // Spot checks through the command line, and the cluster still writes.
    for i in [0, 1, 4999, 9999] {
        assert_eq!(
            c.refs((i % 3) + 1, "bulk", false).get(&name(i)),
            Some(&oid(i))
        );
    }
    poll_until(
        "cluster accepts a CAS after full restart",
        Duration::from_secs(30),
        || {
            c.cas(3, "bulk", &name(7), &oid(7), &oid(N + 7))
                .status
                .success()
                .then_some(())
        },
    );
    assert_eq!(c.refs(1, "bulk", false).get(&name(7)), Some(&oid(N + 7)));
}

/// `piehole node ARGS` that must fail at once: exit 1, one line, no panic.
fn node_error(args: &[&str]) -> String {
    let mut cmd = Command::new(piehole());
    cmd.arg("node").args(args).env_remove("RUST_LOG");
    let o = run_expect_exit(cmd, Duration::from_secs(20));
    assert_one_line_error(&o, 1)
}

#[test]
fn node_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).display().to_string();
    let p1 = free_port();
    let p2 = free_port();
    let a1 = format!("127.0.0.1:{p1}");
    let a2 = format!("127.0.0.1:{p2}");

    // --peers without this node's id.
    let peers = format!("1={a1},2={a2}");
    let e = node_error(&[
        "--id",
        "3",
        "--data-dir",
        &d("x"),
        "--listen",
        &a1,
        "--peers",
        &peers,
    ]);
    assert!(e.contains("--peers") && e.contains('3'), "{e}");

    // A non-loopback --listen without a cluster secret.
    let open = format!("0.0.0.0:{p1}");
    let e = node_error(&[
        "--id",
        "1",
        "--data-dir",
        &d("x"),
        "--listen",
        &open,
        "--peers",
        &format!("1={open}"),
    ]);
    assert!(e.contains("refusing to listen on non-loopback"), "{e}");
    // ... and the node did not create its data dir on the way out.
    assert!(!dir.path().join("x").join("piehole.sock").exists());

    // A secret file others can read, one too short, one with characters
    // that cannot travel in a header: each refused with its reason.
    let secret_with = |name: &str, text: &str, mode: u32| {
        use std::os::unix::fs::PermissionsExt as _;
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p.display().to_string()
    };
    for (file, needle) in [
        (
            secret_with("readable", "a secret others can read\n", 0o644),
            "can be read by others (mode 644)",
        ),
        (
            secret_with("group", "a secret the group can read\n", 0o640),
            "can be read by others (mode 640)",
        ),
        (secret_with("short", "tooshort\n", 0o600), "at least 16"),
        (
            secret_with("binary", "a secret with \u{7f} in it\n", 0o600),
            "printable ASCII",
        ),
    ] {
        let e = node_error(&[
            "--id",
            "1",
            "--data-dir",
            &d("x"),
            "--listen",
            &open,
            "--peers",
            &format!("1={open}"),
            "--cluster-secret-file",
            &file,
        ]);
        assert!(e.contains(needle), "{file}: {e}");
    }

    // Port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ta = taken.local_addr().unwrap().to_string();
    let e = node_error(&[
        "--id",
        "1",
        "--data-dir",
        &d("busy-port"),
        "--listen",
        &ta,
        "--peers",
        &format!("1={ta}"),
    ]);
    assert!(e.contains("cannot listen on"), "{e}");
    drop(taken);

    // A data dir that cannot be one (a regular file).
    std::fs::write(dir.path().join("file"), "x").unwrap();
    let e = node_error(&[
        "--id",
        "1",
        "--data-dir",
        &d("file"),
        "--listen",
        &a1,
        "--peers",
        &format!("1={a1}"),
    ]);
    assert!(e.contains("data dir"), "{e}");

    // Malformed flags get one line too.
    let e = node_error(&[
        "--id",
        "1",
        "--data-dir",
        &d("y"),
        "--listen",
        "localhost",
        "--peers",
        &format!("1={a1}"),
    ]);
    assert!(e.contains("--listen"), "{e}");

    // Data dir in use by another node; and --config FILE works.
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        format!(
            "id = 1\ndata-dir = \"{}\"\nlisten = \"{a1}\"\nrequest-timeout-ms = 5000\n\
             snapshot-interval = 100\n\n[peers]\n1 = \"{a1}\"\n",
            d("shared")
        ),
    )
    .unwrap();
    let log = dir.path().join("node-1.log");
    let mut first = ChildGuard::spawn_piehole(&["node", "--config", cfg.to_str().unwrap()], &log);
    let sock = dir.path().join("shared").join("piehole.sock");
    poll_until(
        "node started from --config elects itself",
        Duration::from_secs(20),
        || {
            assert!(
                first.alive(),
                "node from --config exited: {}",
                tail(&log, 2000)
            );
            (status_at(&sock)?["leader_id"].as_u64()? == 1).then_some(())
        },
    );
    let o = run_piehole(&[
        "ref",
        "--node",
        sock.to_str().unwrap(),
        "cas",
        "g",
        MAIN,
        ZERO,
        &oid(1),
    ]);
    assert!(o.status.success(), "{}", show(&o));

    let e = node_error(&[
        "--id",
        "1",
        "--data-dir",
        &d("shared"),
        "--listen",
        &a2,
        "--peers",
        &format!("1={a2}"),
    ]);
    assert!(e.contains("in use"), "{e}");
    // The first node was not disturbed.
    assert!(first.alive());
    let s = status_at(&sock).expect("first node still answers");
    assert_eq!(s["refs"].as_u64(), Some(1), "{s}");

    // A config file with an unknown key, and a missing one.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "id = 1\nbogus-key = 3\n").unwrap();
    let e = node_error(&["--config", bad.to_str().unwrap()]);
    assert!(e.contains("bogus"), "{e}");
    let e = node_error(&["--config", &d("missing.toml")]);
    assert!(e.contains("missing.toml"), "{e}");
}

/// Membership comes from the data dir; `--peers` only seeds a cluster's
/// first start. Node 3, restarted with a `--peers` that names a fourth
/// member, starts with the members its data dir recorded ({1, 2, 3}), and
/// the cluster goes on with those three.
#[test]
fn a_restart_with_an_extra_member_in_peers_keeps_the_data_dirs_members() {
    let mut c = Cluster::start(3);
    c.kill(3);
    let mut args = c.node_args(3);
    let peers = args.iter().position(|a| a == "--peers").unwrap() + 1;
    args[peers] = format!("{},4=127.0.0.1:{}", args[peers], free_port());
    c.restart_with_args(3, &args);
    let member_ids = |s: &serde_json::Value| -> Vec<u64> {
        let mut ids: Vec<u64> = s["members"]
            .as_array()
            .unwrap_or_else(|| panic!("status without members: {s}"))
            .iter()
            .map(|m| m["id"].as_u64().unwrap())
            .collect();
        ids.sort_unstable();
        ids
    };
    // Node 3 rejoins the three (they agree on a leader among them) ...
    c.wait_leader();
    // ... and neither it nor the others know of a node 4.
    for id in 1..=3 {
        assert_eq!(member_ids(&c.status(id)), vec![1, 2, 3], "node {id}");
    }
    assert_eq!(c.cas_ok(3, "g", MAIN, ZERO, &oid(1)), oid(1));
}
