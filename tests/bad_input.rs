//! SPEC §9: every input from the command line, the local API and the network
//! is validated; bad input gets a clear error and changes nothing, and the
//! node keeps serving. The peer API refuses callers without the secret.

#![allow(dead_code)]

#[path = "harness/mod.rs"]
mod harness;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use harness::*;
use piehole_protocol::limits::{CLUSTER_HEADER, FROM_HEADER, SECRET_HEADER};
use piehole_protocol::pb;

/// The cluster id the peer calls of `peer_api_refuses_calls_without_the_right_secret` carry.
static CLUSTER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

const MAIN: &str = "refs/heads/main";
const TAG: &str = "refs/tags/v1";

/// A cluster whose group "g" holds MAIN and TAG.
fn cluster_with_baseline() -> (Cluster, BTreeMap<String, String>) {
    let c = Cluster::start(3);
    c.cas_ok(1, "g", MAIN, ZERO, &oid(1));
    c.cas_ok(2, "g", TAG, ZERO, &oid(2));
    let refs = c.refs(3, "g", false);
    assert_eq!(refs.len(), 2);
    (c, refs)
}

/// (groups, refs) counted by node `id`'s status.
fn counts(c: &Cluster, id: u64) -> (u64, u64) {
    let s = c.status(id);
    (s["groups"].as_u64().unwrap(), s["refs"].as_u64().unwrap())
}

/// Every node still answers, agrees that "g" is `before` (linearizable read)
/// and reports `before_counts`; and the cluster still takes a good CAS.
fn assert_unchanged_and_serving(
    c: &Cluster,
    before: &BTreeMap<String, String>,
    before_counts: (u64, u64),
) {
    for id in c.ids() {
        assert!(c.is_running(id), "node {id} exited: {}", c.log(id));
        assert_eq!(
            &c.refs(id, "g", false),
            before,
            "node {id}: group g changed"
        );
        assert_eq!(counts(c, id), before_counts, "node {id}: state changed");
        assert!(
            !c.log(id).contains("panicked"),
            "node {id} log: {}",
            c.log(id)
        );
    }
    let probe = "refs/heads/probe-after-bad-input";
    let current = c.refs(1, "g", false).get(probe).cloned();
    let old = current.clone().unwrap_or_else(|| ZERO.to_string());
    let new = if current.as_deref() == Some(oid(777).as_str()) {
        oid(778)
    } else {
        oid(777)
    };
    c.cas_ok(2, "g", probe, &old, &new);
    assert_eq!(c.refs(3, "g", false).get(probe), Some(&new));
    c.cas_ok(3, "g", probe, &new, ZERO);
}

/// Names git's `check-ref-format` refuses.
const GIT_REFUSES: &[&str] = &[
    "HEAD",
    "main",
    "@",
    "refs/heads/",
    "refs/heads/a..b",
    "refs/heads/.hidden",
    "refs/heads/x.lock",
    "refs/heads/x.lock/y",
    "refs/heads/a//b",
    "refs/heads/a b",
    "refs/heads/a~1",
    "refs/heads/a^",
    "refs/heads/a:b",
    "refs/heads/a?",
    "refs/heads/a*",
    "refs/heads/a[",
    "refs/heads/a\\b",
    "refs/heads/a@{1}",
    "refs/heads/end.",
    "refs/heads/tab\there",
    "refs/heads/nl\nhere",
    "refs/heads/del\x7f",
    "/refs/heads/main",
];

#[test]
fn ref_names_git_refuses_are_refused() {
    let (c, before) = cluster_with_baseline();
    let before_counts = counts(&c, 1);

    // The list itself is right: git refuses every one of them.
    let git = Command::new("git").arg("--version").output();
    if git.map(|o| o.status.success()).unwrap_or(false) {
        for name in GIT_REFUSES {
            let o = Command::new("git")
                .args(["check-ref-format", name])
                .output()
                .unwrap();
            assert!(
                !o.status.success(),
                "git accepts {name:?}; fix the test list"
            );
        }
    }

    for (i, name) in GIT_REFUSES.iter().enumerate() {
        let node = (i as u64 % 3) + 1;
        // Creation, and a "move" from the value MAIN really has.
        for (old, new) in [(ZERO.to_string(), oid(9)), (oid(1), oid(9))] {
            let o = c.cas(node, "g", name, &old, &new);
            let line = assert_one_line_error(&o, 1);
            assert!(line.contains("invalid ref name"), "{name:?}: {}", show(&o));
        }
    }

    // Valid to git, but not replicated by piehole: refused just as clearly.
    let o = c.cas(1, "g", "refs/remotes/origin/main", ZERO, &oid(9));
    let line = assert_one_line_error(&o, 1);
    assert!(line.contains("invalid ref name"), "{}", show(&o));

    // Through the local API: NUL and other bytes argv cannot carry, and length.
    let rt = runtime();
    rt.block_on(async {
        let mut client = c.client(2).await;
        let long = format!("refs/heads/{}", "x".repeat(2000));
        for name in [
            "refs/heads/a\0b",
            "refs/heads/\0",
            "refs/heads/bell\x07",
            "",
            long.as_str(),
        ]
        .into_iter()
        .chain(GIT_REFUSES.iter().copied())
        {
            let e = client
                .cas("g", name, None, Some(&oid(9)))
                .await
                .expect_err(&format!("{name:?} was accepted"));
            assert!(e.to_string().contains("invalid ref name"), "{name:?}: {e}");
        }
    });

    assert_unchanged_and_serving(&c, &before, before_counts);
}

#[test]
fn bad_object_ids_are_refused() {
    let (c, before) = cluster_with_baseline();
    let before_counts = counts(&c, 1);
    let hex39 = "a".repeat(39);
    let hex41 = "a".repeat(41);
    let bad_ids = [
        String::new(),
        "abc".to_string(),
        hex39.clone(),
        hex41,
        "g".repeat(40),
        format!("0x{}", "a".repeat(38)),
        format!(" {hex39}"),
        format!("{hex39}\n"),
        format!("{hex39}."),
        "+".repeat(40),
        "é".repeat(20),
    ];
    for (i, bad) in bad_ids.iter().enumerate() {
        let node = (i as u64 % 3) + 1;
        // As NEW, with the right OLD; as OLD, for an existing and a new ref.
        for (r, old, new) in [
            (MAIN, oid(1), bad.clone()),
            (MAIN, bad.clone(), oid(9)),
            ("refs/heads/fresh", bad.clone(), oid(9)),
        ] {
            let o = c.cas(node, "g", r, &old, &new);
            let line = assert_one_line_error(&o, 1);
            assert!(line.contains("invalid object id"), "{bad:?}: {}", show(&o));
        }
    }

    // The local API takes lowercase 40-hex (or empty for absent) only.
    let rt = runtime();
    rt.block_on(async {
        let mut client = c.client(3).await;
        let upper = "A".repeat(40);
        let nul = format!("{}\0", "a".repeat(39));
        for bad in [upper.as_str(), hex39.as_str(), "xyz", nul.as_str()] {
            let e = client
                .cas("g", MAIN, Some(&oid(1)), Some(bad))
                .await
                .expect_err(&format!("new {bad:?} was accepted"));
            assert!(e.to_string().contains("invalid object id"), "{bad:?}: {e}");
            let e = client
                .cas("g", MAIN, Some(bad), Some(&oid(9)))
                .await
                .expect_err(&format!("old {bad:?} was accepted"));
            assert!(e.to_string().contains("invalid object id"), "{bad:?}: {e}");
        }
    });

    assert_unchanged_and_serving(&c, &before, before_counts);
}

#[test]
fn the_null_object_id_is_not_a_ref_value_on_the_local_api() {
    // Through the local API "absent" is the empty string; all zeros is
    // git's spelling of absent and never a real object. Storing it as a
    // consensus value would make a ref that is present and absent at once.
    let (c, before) = cluster_with_baseline();
    let before_counts = counts(&c, 1);
    let rt = runtime();
    let res = rt.block_on(async {
        let mut client = c.client(1).await;
        client.cas("g", "refs/heads/zero", None, Some(ZERO)).await
    });
    match res {
        Err(e) => assert!(e.to_string().contains("invalid object id"), "{e}"),
        Ok(out) => assert!(
            !out.applied && out.current.is_none(),
            "the all-zeros id was stored as a consensus value: {out:?}; refs now {:?}",
            c.refs(1, "g", false)
        ),
    }
    assert_unchanged_and_serving(&c, &before, before_counts);
}

#[test]
fn bad_group_names_are_refused() {
    let (c, before) = cluster_with_baseline();
    let before_counts = counts(&c, 1);
    let bad_groups = [
        "a/b",
        "..",
        "../escape",
        "a..b",
        "/etc",
        "",
        ".",
        ".git",
        "a b",
        "a\\b",
        "tab\there",
    ];
    for (i, g) in bad_groups.iter().enumerate() {
        let node = (i as u64 % 3) + 1;
        let o = c.cas(node, g, MAIN, ZERO, &oid(9));
        let line = assert_one_line_error(&o, 1);
        assert!(line.contains("invalid group name"), "{g:?}: {}", show(&o));
        let sock = c.socket(node);
        let o = c.run(&["ref", "--node", sock.to_str().unwrap(), "get", g]);
        let line = assert_one_line_error(&o, 1);
        assert!(
            line.contains("invalid group name"),
            "get {g:?}: {}",
            show(&o)
        );
    }

    // NUL cannot travel in argv; send it through the local API.
    let rt = runtime();
    rt.block_on(async {
        let mut client = c.client(2).await;
        let long = "g".repeat(300);
        for g in ["x\0y", "\0", "g\0", "", "../escape", long.as_str()] {
            let e = client
                .cas(g, MAIN, None, Some(&oid(9)))
                .await
                .expect_err(&format!("cas in group {g:?} was accepted"));
            assert!(e.to_string().contains("invalid group name"), "{g:?}: {e}");
            let e = client
                .refs(g, true)
                .await
                .expect_err(&format!("read of group {g:?} was accepted"));
            assert!(e.to_string().contains("invalid group name"), "{g:?}: {e}");
        }
    });

    // Nothing escaped into the file system next to the data dirs.
    assert!(!c.dir.path().join("escape").exists());
    for id in c.ids() {
        assert!(!c.node(id).data_dir.join("escape").exists());
    }
    assert_unchanged_and_serving(&c, &before, before_counts);
}

#[test]
fn oversize_message_on_the_local_api_is_refused() {
    let (c, before) = cluster_with_baseline();
    let before_counts = counts(&c, 1);
    let rt = runtime();
    rt.block_on(async {
        let mut client = c.client(1).await;
        // Beyond the local API's limit (64 MiB: a push of 100,000 refs fits).
        let huge = format!("refs/heads/{}", "x".repeat(65 * 1024 * 1024));
        let r = client.cas("g", &huge, None, Some(&oid(9))).await;
        let e = r.expect_err("a 65 MB ref name was accepted");
        // Refused by the node's message limit, not lost on the way.
        assert!(
            !e.is_unreachable() && e.to_string().contains("too large"),
            "{e}"
        );
        let r = client.refs(&"g".repeat(5 * 1024 * 1024), true).await;
        assert!(r.is_err(), "a 5 MB group name was accepted");
        let r = client.refs(&"g".repeat(65 * 1024 * 1024), true).await;
        assert!(r.is_err(), "a 65 MB group name was accepted");
        // The same connection (or a new one) still works.
        let mut fresh = c.client(1).await;
        fresh
            .status(false)
            .await
            .expect("status after an oversize message");
    });
    assert_unchanged_and_serving(&c, &before, before_counts);
}

/// Deterministic pseudo-random bytes (xorshift), no extra crates.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

/// Writes `bytes`, then reads whatever comes back until EOF, error or 5 s.
fn poke<S: Read + Write>(mut s: S, bytes: &[u8]) -> Vec<u8> {
    let _ = s.write_all(bytes);
    let _ = s.flush();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.len() > 1 << 20 {
                    break;
                }
            }
        }
    }
    got
}

fn tcp(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to the peer port");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn unix(path: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(path).expect("connect to the node socket");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

#[test]
fn garbage_on_the_peer_port_and_the_local_socket() {
    let (c, before) = cluster_with_baseline();
    let before_counts = counts(&c, 1);
    let http1 = b"GET / HTTP/1.1\r\nHost: piehole\r\nConnection: close\r\n\r\n".to_vec();
    let post = b"POST /piehole.v1.Peer/Raft HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        .to_vec();
    let mut h2_garbage = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2_garbage.extend(noise(8192, 7));
    // A valid preface, then a frame header announcing 16 MB of nothing.
    let mut h2_big = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2_big.extend([0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01]);

    for id in c.ids() {
        let addr = c.node(id).addr.clone();
        let sock = c.socket(id);
        for (i, bytes) in [
            noise(64 * 1024, id * 31 + 1),
            noise(1, id + 5),
            http1.clone(),
            post.clone(),
            h2_garbage.clone(),
            h2_big.clone(),
        ]
        .iter()
        .enumerate()
        {
            poke(tcp(&addr), bytes);
            poke(unix(&sock), bytes);
            assert!(
                c.is_running(id),
                "node {id} died after input {i}: {}",
                c.log(id)
            );
        }
        // Connections opened and dropped at once, and one left half-open.
        for _ in 0..20 {
            drop(tcp(&addr));
            drop(unix(&sock));
        }
        let idle = tcp(&addr);
        c.status(id);
        drop(idle);
    }
    assert_unchanged_and_serving(&c, &before, before_counts);
}

/// Writes a secret file readable by its owner only, as a node requires,
/// and returns its path.
fn secret_file(dir: &std::path::Path, name: &str, secret: &str) -> String {
    let p = dir.join(name);
    write_private(&p, &format!("{secret}\n"));
    p.display().to_string()
}

type PeerGrpc = pb::peer_client::PeerClient<tonic::transport::Channel>;

/// A peer call as node `from` would make it, in cluster `CLUSTER` (set
/// once the test cluster has bootstrapped).
fn peer_request<T>(msg: T, from: Option<&str>, secret: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(cluster) = CLUSTER.get() {
        req.metadata_mut()
            .insert(CLUSTER_HEADER, cluster.parse().unwrap());
    }
    if let Some(f) = from {
        req.metadata_mut().insert(FROM_HEADER, f.parse().unwrap());
    }
    if let Some(s) = secret {
        req.metadata_mut().insert(SECRET_HEADER, s.parse().unwrap());
    }
    req
}

#[test]
fn peer_api_refuses_calls_without_the_right_secret() {
    let secrets = tempfile::tempdir().unwrap();
    const SECRET: &str = "correct horse battery staple";
    let file = secret_file(secrets.path(), "secret", SECRET);
    let c = Cluster::start_with(3, &["--cluster-secret-file", &file]);
    let cluster = c.status(1)["cluster_id"].as_str().unwrap().to_string();
    CLUSTER.set(cluster.clone()).unwrap();
    // With a shared secret the cluster works (the positive control).
    c.cas_ok(1, "g", MAIN, ZERO, &oid(1));
    let before = c.refs(2, "g", false);
    let before_counts = counts(&c, 1);

    let rt = runtime();
    let addr = c.node(1).addr.clone();
    rt.block_on(async {
        let mut peer = PeerGrpc::connect(format!("http://{addr}"))
            .await
            .expect("connect to the peer API");
        let status = |from: Option<&str>, secret: Option<&str>| {
            peer_request(pb::PeerStatusRequest {}, from, secret)
        };
        // No credentials at all; a member id without the secret; a wrong
        // secret; the right secret from a node that is not a member. The
        // secret is checked first, so an outsider learns nothing of ids.
        for (from, secret, code) in [
            (None, None, tonic::Code::Unauthenticated),
            (Some("9"), None, tonic::Code::Unauthenticated),
            (Some("2"), None, tonic::Code::Unauthenticated),
            (
                Some("2"),
                Some("wrong secret, also long enough"),
                tonic::Code::Unauthenticated,
            ),
            (
                Some("2"),
                Some("correct horse battery stapl"),
                tonic::Code::Unauthenticated,
            ),
            (Some("9"), Some(SECRET), tonic::Code::PermissionDenied),
            (Some("x"), Some(SECRET), tonic::Code::PermissionDenied),
        ] {
            let e = peer
                .peer_status(status(from, secret))
                .await
                .expect_err(&format!(
                    "peer call from {from:?} with {secret:?} was accepted"
                ));
            assert_eq!(e.code(), code, "from {from:?} secret {secret:?}: {e:?}");
        }
        // A raft batch and a pack request with a wrong secret are refused too.
        let batch = pb::RaftBatch {
            from: 2,
            messages: vec![noise(100, 3)],
            ..Default::default()
        };
        let e = peer
            .raft(peer_request(
                batch,
                Some("2"),
                Some("not the cluster secret!!"),
            ))
            .await
            .expect_err("raft batch with a wrong secret accepted");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        let fetch = pb::FetchPackRequest {
            group: "g".into(),
            wants: vec![oid(1)],
            ..Default::default()
        };
        let e = peer
            .fetch_pack(peer_request(fetch, Some("2"), None))
            .await
            .expect_err("fetch_pack without the secret accepted");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

        // The right secret and a member id, but another cluster's id (or
        // none): a node of another cluster is refused.
        for other in [Some("00000000000000ff"), None] {
            let mut req = status(Some("2"), Some(SECRET));
            match other {
                Some(id) => req
                    .metadata_mut()
                    .insert(CLUSTER_HEADER, id.parse().unwrap()),
                None => req.metadata_mut().remove(CLUSTER_HEADER),
            };
            let e = peer
                .peer_status(req)
                .await
                .expect_err("a call from another cluster was accepted");
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
            assert!(e.message().contains("belongs to cluster"), "{e:?}");
        }
        // With the right secret and a member id the same call is answered,
        // so the refusals above are about credentials, not the protocol.
        peer.peer_status(status(Some("2"), Some(SECRET)))
            .await
            .expect("peer status with the right secret");
        // Garbage raft messages with the right secret do not hurt either.
        let batch = pb::RaftBatch {
            from: 2,
            messages: vec![noise(100, 4)],
            ..Default::default()
        };
        let _ = peer
            .raft(peer_request(batch, Some("2"), Some(SECRET)))
            .await;
        // A well-formed raft snapshot whose state data is garbage, from a
        // member with the right secret and a term that would win: refused
        // before raft sees it (installing it would stop the node).
        let mut snapshot = raft::prelude::Message {
            from: 2,
            to: 1,
            term: 1_000,
            ..Default::default()
        };
        snapshot.set_msg_type(raft::prelude::MessageType::MsgSnapshot);
        snapshot.mut_snapshot().data = noise(64, 5).into();
        snapshot.mut_snapshot().mut_metadata().index = 1_000_000;
        snapshot.mut_snapshot().mut_metadata().term = 1_000;
        let batch = pb::RaftBatch {
            from: 2,
            messages: vec![protobuf::Message::write_to_bytes(&snapshot).unwrap()],
            ..Default::default()
        };
        let e = peer
            .raft(peer_request(batch, Some("2"), Some(SECRET)))
            .await
            .expect_err("a snapshot with garbage state data was accepted");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    });

    // The refusals were logged.
    let log = c.log(1);
    assert!(log.contains("wrong cluster secret refused"), "{log}");
    assert!(log.contains("unknown node refused"), "{log}");
    assert_unchanged_and_serving(&c, &before, before_counts);
}

#[test]
fn nodes_with_different_secrets_never_form_a_cluster() {
    let secrets = tempfile::tempdir().unwrap();
    let files: Vec<String> = (1..=3)
        .map(|i| {
            secret_file(
                secrets.path(),
                &format!("s{i}"),
                &format!("secret number {i} of three"),
            )
        })
        .collect();
    // Brand-new data dirs: each node bootstraps only once every member of
    // --peers has answered it, and none can answer another.
    let c = Cluster::spawn_per_node(3, &["--request-timeout-ms", "3000"], &|id| {
        vec![
            "--cluster-secret-file".into(),
            files[(id - 1) as usize].clone(),
        ]
    });
    let no_socket = |c: &Cluster| {
        for id in c.ids() {
            assert!(
                !c.socket(id).exists(),
                "node {id} bootstrapped (its socket {} exists): {}",
                c.socket(id).display(),
                c.log(id)
            );
        }
    };
    // Wait until every node has refused its peers' calls several times,
    // checking all along that every node keeps running and none bootstrapped.
    poll_until(
        "every node refuses its peers' calls (logged) three times",
        Duration::from_secs(30),
        || {
            for id in c.ids() {
                assert!(c.is_running(id), "node {id} exited: {}", c.log(id));
            }
            no_socket(&c);
            c.ids()
                .iter()
                .all(|&id| c.log(id).matches("wrong cluster secret refused").count() >= 3)
                .then_some(())
        },
    );
    for id in c.ids() {
        assert!(c.is_running(id), "node {id} exited: {}", c.log(id));
    }
    no_socket(&c);
}
