//! SPEC §9 (issue 10): who may do what on a multi-user host.
//!
//! The tests run as root and act as other users through `setpriv`, the way
//! a pusher with a shell account would reach the node's socket. Real
//! `piehole node` processes, real git, real peer calls.

#![allow(dead_code)]

#[path = "harness/mod.rs"]
mod harness;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use harness::git::{self, Work};
use harness::*;
use piehole_protocol::limits::{CLUSTER_HEADER, FROM_HEADER, SECRET_HEADER};
use piehole_protocol::pb;
use prost::Message as _;

const MAIN: &str = "refs/heads/main";
/// The pushers: the local socket's group.
const PUSHERS: u32 = 4242;
/// A pusher: reaches the socket, is no admin.
const PUSHER: u32 = 4243;
/// An operator: a member of `--admin-group`.
const OPERATOR: u32 = 4244;
const ADMINS: u32 = 4245;

/// `program args` run in `dir` as `uid` with primary group `gid` and the
/// supplementary `groups`, in the tests' hermetic environment.
fn as_user(
    uid: u32,
    gid: u32,
    groups: &[u32],
    dir: &Path,
    program: &Path,
    args: &[&str],
) -> Output {
    as_user_env(uid, gid, groups, dir, program, args, &[])
}

fn as_user_env(
    uid: u32,
    gid: u32,
    groups: &[u32],
    dir: &Path,
    program: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
    let mut cmd = Command::new("setpriv");
    git::hermetic(&mut cmd);
    cmd.envs(env.iter().copied());
    cmd.current_dir(dir)
        .args(["--reuid", &uid.to_string(), "--regid", &gid.to_string()])
        .args(if groups.is_empty() {
            vec!["--clear-groups".to_string()]
        } else {
            vec!["--groups".to_string(), groups.join(",")]
        })
        .arg("--")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run setpriv")
}

fn pusher(dir: &Path, args: &[&str]) -> Output {
    as_user(PUSHER, PUSHERS, &[PUSHERS], dir, &piehole(), args)
}

/// git as the pusher, trusting the shared repositories it does not own (an
/// operator would list them under safe.directory in /etc/gitconfig).
fn pusher_git(dir: &Path, args: &[&str]) -> Output {
    let mut all = vec!["-c", "init.defaultBranch=main"];
    all.extend_from_slice(args);
    // As global config: the local transport runs receive-pack without the
    // push's command-line config.
    let global =
        std::env::temp_dir().join(format!("piehole-security-{}.gitconfig", std::process::id()));
    std::fs::write(&global, "[safe]\n\tdirectory = *\n").unwrap();
    let trust = [("GIT_CONFIG_GLOBAL", global.to_str().unwrap())];
    as_user_env(
        PUSHER,
        PUSHERS,
        &[PUSHERS],
        dir,
        Path::new("git"),
        &all,
        &trust,
    )
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    let out = Command::new("chown")
        .args(["-R", &format!("{uid}:{gid}")])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "chown: {}", show(&out));
}

/// Group `group` with a replica on every node that the pushers may write
/// (`git init --shared=group`, owned by the node's user, root), installed
/// by the operator: the README's per-user deployment.
fn shared_replicas(c: &Cluster, group: &str) -> Vec<PathBuf> {
    (1..=3)
        .map(|id| {
            let r = git::replica_path(c, id, group);
            std::fs::create_dir_all(&r).unwrap();
            git::git_ok(&r, &["init", "--bare", "--quiet", "--shared=group", "."]);
            chown_tree(&r, 0, PUSHERS);
            git::install_ok(c, id, &r);
            r
        })
        .collect()
}

/// Three nodes whose sockets the pushers reach, each with a replica of
/// group "mine" the pushers may write ([`shared_replicas`]).
fn pushers_cluster() -> (Cluster, Vec<PathBuf>) {
    let c = Cluster::start_with(
        3,
        &[
            "--socket-group",
            &PUSHERS.to_string(),
            "--reconcile-interval-ms",
            "500",
        ],
    );
    // The tests' temporary directory is root's alone; a pusher must get
    // through it to the replicas.
    std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mine = shared_replicas(&c, "mine");
    (c, mine)
}

/// `sh -c script` as the pusher, in `dir`.
fn pusher_sh(dir: &Path, script: &str) -> Output {
    as_user(
        PUSHER,
        PUSHERS,
        &[PUSHERS],
        dir,
        Path::new("sh"),
        &["-c", script],
    )
}

#[track_caller]
fn assert_refused(out: &Output, what: &str, needle: &str) {
    let line = assert_one_line_error(out, 1);
    assert!(
        line.contains(needle),
        "{what}: the refusal should say {needle:?}:\n{}",
        show(out)
    );
}

#[test]
fn a_pusher_on_the_socket_cannot_administer_nor_hook_into_repositories_it_cannot_write() {
    let c = Cluster::start_with(
        3,
        &[
            "--socket-group",
            &PUSHERS.to_string(),
            "--admin-group",
            &ADMINS.to_string(),
        ],
    );
    // The tests' temporary directory is root's alone; a pusher must get
    // through it to the data dir, as through /var/lib on a real host.
    std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = c.socket(1);
    let sock_s = sock.to_str().unwrap();

    // The socket's group reaches the socket, and nothing else in the data dir.
    let data = std::fs::metadata(&c.node(1).data_dir).unwrap();
    assert_eq!((data.mode() & 0o777, data.gid()), (0o710, PUSHERS));
    let db = std::fs::metadata(c.node(1).data_dir.join("db")).unwrap();
    assert_eq!(db.mode() & 0o777, 0o700);
    let s = std::fs::metadata(&sock).unwrap();
    assert_eq!((s.mode() & 0o777, s.gid()), (0o660, PUSHERS));
    let listing = pusher(c.dir.path(), &["status", "--node", sock_s]);
    assert!(
        listing.status.success(),
        "a pusher reads status: {}",
        show(&listing)
    );

    // Root's group: replicas on every node, a first commit.
    let repos = git::replicas(&c, "proj");
    let work = Work::new(&c, "root");
    let first = work.commit("first");
    work.push_ok(&repos[0], &["main"]);
    git::wait_converged(&c, &repos, MAIN, Some(&first));
    let consensus_before = git::consensus(&c, 1, "proj");

    // Admin operations: refused, one line, nothing changed.
    let cas = pusher(
        c.dir.path(),
        &[
            "ref",
            "--node",
            sock_s,
            "cas",
            "proj",
            MAIN,
            &first,
            &oid(7),
        ],
    );
    assert_refused(&cas, "ref cas by a pusher", "administrators");
    let clobber = pusher(&repos[0], &["clobber", "--prune"]);
    assert_refused(&clobber, "clobber by a pusher", "administrators");
    let remove = pusher(c.dir.path(), &["member", "remove", "3", "--node", sock_s]);
    assert_refused(&remove, "member remove by a pusher", "administrators");
    let export = pusher(c.dir.path(), &["consensus", "export", "--node", sock_s]);
    assert!(
        !export.status.success(),
        "export by a pusher: {}",
        show(&export)
    );
    // A hook call naming a repository the pusher cannot write (root's).
    let hook = pusher(&repos[0], &["hook", "update", MAIN, &first, &oid(8)]);
    assert!(!hook.status.success(), "{}", show(&hook));
    assert!(
        stderr(&hook).contains("cannot write"),
        "the hook's refusal says why:\n{}",
        show(&hook)
    );
    assert_eq!(git::consensus(&c, 1, "proj"), consensus_before);
    assert_eq!(roles_of(&c.member_list(1)).unwrap().len(), 3);

    // A group the pushers share: the node's user owns its replicas, the
    // pushers' group may write them (`git init --shared=group`), as in the
    // README's per-user deployment. The operator installs it.
    let mine_all = shared_replicas(&c, "mine");
    let mine = mine_all[0].clone();
    let clone = c.dir.path().join("work-pusher");
    std::fs::create_dir_all(&clone).unwrap();
    chown_tree(&clone, PUSHER, PUSHERS);
    for args in [
        vec!["init", "--quiet", "."],
        vec!["commit", "--quiet", "--allow-empty", "-m", "mine"],
    ] {
        let out = pusher_git(&clone, &args);
        assert!(out.status.success(), "git {args:?}: {}", show(&out));
    }
    let push = pusher_git(&clone, &["push", mine.to_str().unwrap(), "main"]);
    assert!(push.status.success(), "the pusher's push: {}", show(&push));
    let pushed = stdout(&pusher_git(&clone, &["rev-parse", "HEAD"]))
        .trim()
        .to_string();
    git::wait_converged(&c, &mine_all, MAIN, Some(&pushed));

    // A repository that borrows objects from another (alternates) would
    // have the node serve that one's objects: a pusher's push is refused.
    let alternates = mine.join("objects/info/alternates");
    std::fs::write(
        &alternates,
        format!("{}\n", repos[0].join("objects").display()),
    )
    .unwrap();
    let out = pusher_git(
        &clone,
        &["commit", "--quiet", "--allow-empty", "-m", "borrowing"],
    );
    assert!(out.status.success(), "{}", show(&out));
    let push = pusher_git(&clone, &["push", mine.to_str().unwrap(), "main"]);
    assert!(
        !push.status.success(),
        "a push into a borrowing repository: {}",
        show(&push)
    );
    assert!(stderr(&push).contains("borrows objects"), "{}", show(&push));
    std::fs::remove_file(&alternates).unwrap();
    assert_eq!(git::consensus(&c, 1, "mine")[MAIN], pushed);

    // An operator in --admin-group may do what the pusher may not.
    let cas = as_user(
        OPERATOR,
        OPERATOR,
        &[PUSHERS, ADMINS],
        c.dir.path(),
        &piehole(),
        &[
            "ref", "--node", sock_s, "cas", "proj", MAIN, &first, &pushed,
        ],
    );
    assert!(cas.status.success(), "cas by an admin: {}", show(&cas));
    assert_eq!(git::consensus(&c, 1, "proj")[MAIN], pushed);
}

/// Every file and directory under `root`: path -> (mtime in ns, length).
fn tree_listing(root: &Path) -> BTreeMap<PathBuf, (i128, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        out.insert(
            dir.clone(),
            (
                i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
                meta.len(),
            ),
        );
        if meta.is_dir() {
            for e in std::fs::read_dir(&dir).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

/// A raft proposal of `cmd`, as peer `from` would forward it to `to`.
fn proposal(from: u64, to: u64, cmd: &pb::Command) -> pb::RaftBatch {
    use protobuf::Message as _;
    let entry = raft::prelude::Entry {
        data: cmd.encode_to_vec().into(),
        ..Default::default()
    };
    let mut m = raft::prelude::Message {
        from,
        to,
        ..Default::default()
    };
    m.set_msg_type(raft::prelude::MessageType::MsgPropose);
    m.set_entries(vec![entry].into());
    pb::RaftBatch {
        from,
        messages: vec![m.write_to_bytes().unwrap()],
        ..Default::default()
    }
}

/// A Register of `node_id`'s replica, proposed by `origin`.
fn register(origin: u64, node_id: u64, path: &str, request_id: u64, after: u64) -> pb::Command {
    pb::Command {
        origin_node: origin,
        request_id,
        proposed_after: after,
        op: Some(pb::command::Op::Register(pb::RegisterOp {
            group: "proj".into(),
            node_id,
            path: path.into(),
        })),
    }
}

#[test]
fn a_register_through_the_log_outside_the_repo_roots_is_refused_and_touches_nothing() {
    let roots = tempfile::tempdir().unwrap();
    let root_of = |id: u64| roots.path().join(format!("node{id}"));
    for id in 1..=3 {
        std::fs::create_dir_all(root_of(id)).unwrap();
    }
    let c = Cluster::launch_per_node(3, &["--reconcile-interval-ms", "500"], &|id| {
        vec!["--repo-root".into(), root_of(id).display().to_string()]
    });
    let leader = c.wait_leader();
    let repos: Vec<PathBuf> = (1..=3)
        .map(|id| {
            let r = root_of(id).join("proj.git");
            git::init_bare(&r);
            git::install_ok(&c, id, &r);
            r
        })
        .collect();

    // A private repository outside every root, with history of its own.
    let outside = roots.path().join("outside").join("private.git");
    git::init_bare(&outside);
    let private = Work::init(&roots.path().join("private-work"));
    private.commit("private");
    let out = private.git(&["push", "--quiet", outside.to_str().unwrap(), "main"]);
    assert!(out.status.success(), "{}", show(&out));
    let before = tree_listing(&outside);

    // On the node that receives it from its socket.
    let install = git::install(&c, 1, &outside);
    let line = assert_one_line_error(&install, 1);
    assert!(
        line.contains("outside this node's repository roots"),
        "{}",
        show(&install)
    );

    // Through the log: a peer holding the secret proposes registrations.
    let cluster_id = c.status(1)["cluster_id"].as_str().unwrap().to_string();
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let after = c.status(leader)["applied_index"].as_u64().unwrap();
    let addr = c.node(leader).addr.clone();
    let outside_s = outside.to_str().unwrap();
    let rt = runtime();
    rt.block_on(async {
        let mut peer = pb::peer_client::PeerClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (secret, _) = c.secret.as_ref().expect("the cluster's secret");
        let call = |batch: pb::RaftBatch, from: u64| {
            let mut req = tonic::Request::new(batch);
            let md = req.metadata_mut();
            md.insert(CLUSTER_HEADER, cluster_id.parse().unwrap());
            md.insert(FROM_HEADER, from.to_string().parse().unwrap());
            md.insert(SECRET_HEADER, secret.parse().unwrap());
            req
        };
        // The leader's own replica, outside its roots: refused at its door.
        let e = peer
            .raft(call(
                proposal(
                    follower,
                    leader,
                    &register(follower, leader, outside_s, 1 << 40, after),
                ),
                follower,
            ))
            .await
            .expect_err("a register of the receiving node outside its roots was accepted");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("outside"), "{e:?}");
        // A path no node may hold: refused by every node's validation.
        let e = peer
            .raft(call(
                proposal(
                    follower,
                    leader,
                    &register(follower, follower, "/srv/../etc", (1 << 40) + 1, after),
                ),
                follower,
            ))
            .await
            .expect_err("a register of a non-normal path was accepted");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        // Another node's replica: the leader cannot know that node's roots,
        // so it goes into the log, and that node must refuse to act on it.
        peer.raft(call(
            proposal(
                follower,
                leader,
                &register(follower, follower, outside_s, (1 << 40) + 2, after),
            ),
            follower,
        ))
        .await
        .expect("a register for another node is proposed");
        // A command in another node's name would answer that node's request.
        let e = peer
            .raft(call(
                proposal(
                    follower,
                    leader,
                    &register(leader, follower, outside_s, (1 << 40) + 3, after),
                ),
                follower,
            ))
            .await
            .expect_err("a proposal in another node's name was accepted");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("name"), "{e:?}");
    });
    poll_until(
        "the follower's register to be applied",
        Duration::from_secs(20),
        || {
            let reply = rt
                .block_on(async { c.client(follower).await.read_group("proj", false).await })
                .ok()?;
            reply
                .replicas
                .iter()
                .any(|r| r.node_id == follower && r.path == outside_s)
                .then_some(())
        },
    );
    // Pushes go on; the follower neither fetches into the outside
    // repository nor serves it, and says why.
    let work = Work::new(&c, "w");
    let head = work.commit("after");
    work.push_ok(&repos[leader as usize - 1], &["main"]);
    let others: Vec<PathBuf> = (1..=3)
        .filter(|&id| id != follower)
        .map(|id| repos[id as usize - 1].clone())
        .collect();
    git::wait_converged(&c, &others, MAIN, Some(&head));
    poll_until(
        "the follower to log its refusal",
        Duration::from_secs(20),
        || {
            c.log(follower)
                .contains("replica registered through the log refused")
                .then_some(())
        },
    );
    // Watched over several of the follower's reconcile passes (every
    // 500 ms): the outside repository never changes.
    let changed = poll(Duration::from_millis(100), Duration::from_secs(3), || {
        (tree_listing(&outside) != before).then_some(())
    });
    assert!(changed.is_none(), "a file outside the roots changed");
    assert_eq!(tree_listing(&outside), before);
}

/// Lets this process hold `n` files open (the flood's connections).
fn raise_open_files_limit(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid rlimit for both calls.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < n {
            lim.rlim_cur = n.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    assert!(
        lim.rlim_cur >= n,
        "cannot hold {n} files open (limit {})",
        lim.rlim_cur
    );
}

/// Open file descriptors of process `pid`.
fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn five_thousand_idle_connections_leave_pushes_working_and_the_open_files_bounded() {
    /// The node's default `--max-peer-connections`.
    const CAP: usize = 512;
    let c = Cluster::start_with(3, &["--reconcile-interval-ms", "1000"]);
    let repos = git::replicas(&c, "proj");
    let work = Work::new(&c, "w");
    let first = work.commit("before the flood");
    work.push_ok(&repos[0], &["main"]);
    git::wait_converged(&c, &repos, MAIN, Some(&first));
    let pid = c.node(1).pid().unwrap();
    let baseline = open_files(pid);

    raise_open_files_limit(6000);
    // 5,000 connections to node 1's peer port: most never say a word, some
    // say a byte, some the start of an HTTP/2 connection, and none makes a
    // call with the secret.
    let addr: std::net::SocketAddr = c.node(1).addr.parse().unwrap();
    let mut idle = Vec::with_capacity(5000);
    let mut most = 0;
    for i in 0..5000 {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        let said: &[u8] = match i % 10 {
            1 => b"P",
            2 => b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            _ => b"",
        };
        let _ = std::io::Write::write_all(&mut s, said);
        idle.push(s);
        if i % 500 == 0 {
            most = most.max(open_files(pid));
        }
    }
    // Pushes to the flooded node and to another go on, and replicate both
    // ways: the other nodes' new connections to node 1 get in.
    for (n, target) in [(1, 0), (2, 1), (3, 0)] {
        let head = work.commit(&format!("during the flood {n}"));
        work.push_ok(&repos[target], &["main"]);
        git::wait_converged(&c, &repos, MAIN, Some(&head));
        most = most.max(open_files(pid));
    }
    assert!(c.is_running(1), "node 1 survived the flood");
    assert!(
        most <= baseline + CAP + 64,
        "node 1 had {most} files open (baseline {baseline}, cap {CAP})"
    );
    drop(idle);
}

#[test]
fn a_pack_beyond_max_pack_bytes_is_refused_and_no_group_or_ref_beyond_the_quotas_is_created() {
    let c = Cluster::launch_per_node(
        3,
        &[
            "--max-groups",
            "1",
            "--max-refs-per-group",
            "2",
            "--reconcile-interval-ms",
            "1000",
        ],
        &|id| {
            if id == 2 {
                vec!["--max-pack-bytes".into(), "20000".into()]
            } else {
                Vec::new()
            }
        },
    );
    c.wait_leader();
    let repos = git::replicas(&c, "proj");
    let work = Work::new(&c, "w");
    // Incompressible, so the pack is about as large as the blob.
    let big = work.commit_file("big.bin", &git::random_bytes(7, 200_000), "big");
    work.push_ok(&repos[0], &["main"]);
    git::wait_converged(&c, &[repos[0].clone(), repos[2].clone()], MAIN, Some(&big));
    poll_until("node 2 to refuse the pack", Duration::from_secs(30), || {
        c.log(2)
            .contains("larger than --max-pack-bytes 20000")
            .then_some(())
    });
    assert_eq!(
        git::rev_parse_ref(&repos[1], MAIN),
        None,
        "replica 2 took nothing"
    );

    let other = git::bare_repo(&c, 1, "other");
    let out = git::install(&c, 1, &other);
    let line = assert_one_line_error(&out, 1);
    assert!(line.contains("--max-groups"), "{}", show(&out));
    assert_eq!(c.status(1)["groups"].as_u64(), Some(1));

    // The group holds main; a second ref fits, a third does not.
    work.push_ok(&repos[0], &["main:refs/heads/second"]);
    let out = work.push(&repos[0], &["main:refs/heads/third"]);
    assert!(
        !out.status.success(),
        "a push beyond the quota: {}",
        show(&out)
    );
    assert!(
        stderr(&out).contains("--max-refs-per-group 2"),
        "{}",
        show(&out)
    );
    let refs = git::consensus(&c, 1, "proj");
    assert_eq!(refs.len(), 2, "{refs:?}");
    // Moving an existing ref creates nothing: still allowed.
    let next = work.commit("next");
    work.push_ok(&repos[0], &["main"]);
    assert_eq!(git::consensus(&c, 1, "proj")[MAIN], next);
}

/// A peer API client for `addr` over TLS, presenting `identity` (cert,
/// key PEM) if any, trusting `ca` for the server (named node-`to`.piehole).
async fn tls_peer(
    addr: &str,
    to: u64,
    ca: &Path,
    identity: Option<&piehole_client::certs::NodeCerts>,
) -> Result<pb::peer_client::PeerClient<tonic::transport::Channel>, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name(format!("node-{to}.piehole"));
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&id.cert).unwrap(),
            std::fs::read(&id.key).unwrap(),
        ));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(pb::peer_client::PeerClient::new(channel))
}

#[test]
fn over_mutual_tls_a_cluster_replicates_and_peers_without_the_right_certificate_are_refused() {
    let backend = Backend::raft_tls();
    let Backend::RaftTls(certs) = &backend else {
        unreachable!()
    };
    let c = Cluster::start_on(&backend, 3, &["--reconcile-interval-ms", "1000"]);
    let repos = git::replicas(&c, "proj");
    let work = Work::new(&c, "w");
    let head = work.commit("over tls");
    work.push_ok(&repos[1], &["main"]);
    git::wait_converged(&c, &repos, MAIN, Some(&head));

    // Mutual TLS keeps outsiders off the port: no secret is generated.
    assert!(!c.node(1).data_dir.join("cluster-secret").exists());
    let cluster_id = c.status(1)["cluster_id"].as_str().unwrap().to_string();
    let ca = certs.dir().join("cluster-ca.pem");
    // Files of their own: the nodes' certificates stay as they are.
    let issue = |authority: &piehole_client::certs::Authority, file: &str, id: u64| {
        authority
            .issue(file, vec![format!("node-{id}.piehole")])
            .unwrap()
    };
    let node2 = issue(&certs.authority(), "test-2", 2);
    let node3 = issue(&certs.authority(), "test-3", 3);
    let other_ca = piehole_client::certs::Authority::new(certs.dir(), "other").unwrap();
    let foreign2 = issue(&other_ca, "foreign-2", 2);
    let addr = c.node(1).addr.clone();
    let status_as = |from: u64| {
        let mut req = tonic::Request::new(pb::PeerStatusRequest {});
        req.metadata_mut()
            .insert(CLUSTER_HEADER, cluster_id.parse().unwrap());
        req.metadata_mut()
            .insert(FROM_HEADER, from.to_string().parse().unwrap());
        req
    };
    let rt = runtime();
    rt.block_on(async {
        // The positive control: node 2's certificate, as node 2.
        let mut peer = tls_peer(&addr, 1, &ca, Some(&node2)).await.unwrap();
        peer.peer_status(status_as(2))
            .await
            .expect("a member with its own certificate is answered");
        // Node 3's certificate claiming to be node 2.
        let mut peer = tls_peer(&addr, 1, &ca, Some(&node3)).await.unwrap();
        let e = peer
            .peer_status(status_as(2))
            .await
            .expect_err("node 3's certificate passed as node 2");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("does not name node 2"), "{e:?}");
        let mut info = tonic::Request::new(pb::ClusterInfoRequest {});
        info.metadata_mut()
            .insert(FROM_HEADER, "2".parse().unwrap());
        let e = peer
            .cluster_info(info)
            .await
            .expect_err("ClusterInfo answered node 3's certificate claiming node 2");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        // No certificate, and one from another CA: no call gets through
        // (the handshake or the first call fails).
        for (what, identity) in [("no certificate", None), ("another CA", Some(&foreign2))] {
            let refused = match tls_peer(&addr, 1, &ca, identity).await {
                Err(_) => true,
                Ok(mut peer) => peer.peer_status(status_as(2)).await.is_err(),
            };
            assert!(refused, "a peer with {what} was answered");
        }
        // Plain h2c to a TLS port gets nowhere either.
        let plain = pb::peer_client::PeerClient::connect(format!("http://{addr}")).await;
        if let Ok(mut plain) = plain {
            assert!(plain.peer_status(status_as(2)).await.is_err());
        }
    });
    // A node whose own certificate names another id does not start.
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "node".to_string(),
        "--id".into(),
        "1".into(),
        "--data-dir".into(),
        dir.path().join("d").display().to_string(),
        "--listen".into(),
        "127.0.0.1:1".into(),
        "--peers".into(),
        "1=127.0.0.1:1".into(),
    ];
    args.extend(node3.args());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_piehole(&argv);
    let line = assert_one_line_error(&out, 1);
    assert!(line.contains("does not name this node"), "{}", show(&out));
    // The refused peers did not disturb the cluster.
    let head = work.commit("after the refusals");
    work.push_ok(&repos[0], &["main"]);
    git::wait_converged(&c, &repos, MAIN, Some(&head));
}

/// A peer status call as node `from` of cluster `cluster_id`, with `secret`
/// (if any) in the secret header.
fn peer_status_as(
    from: u64,
    cluster_id: &str,
    secret: Option<&str>,
) -> tonic::Request<pb::PeerStatusRequest> {
    let mut req = tonic::Request::new(pb::PeerStatusRequest {});
    let md = req.metadata_mut();
    md.insert(CLUSTER_HEADER, cluster_id.parse().unwrap());
    md.insert(FROM_HEADER, from.to_string().parse().unwrap());
    if let Some(s) = secret {
        md.insert(SECRET_HEADER, s.parse().unwrap());
    }
    req
}

/// One `piehole node` on loopback given neither a secret nor TLS, as a user
/// trying piehole on a shared host would start it.
fn lone_node(dir: &Path, id: u64, addr: &str, membership: &[&str]) -> ChildGuard {
    let id_s = id.to_string();
    let data = dir.join(format!("node-{id}"));
    let mut args = vec![
        "node",
        "--id",
        &id_s,
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        addr,
        "--request-timeout-ms",
        "5000",
    ];
    args.extend_from_slice(membership);
    ChildGuard::spawn_piehole(&args, &dir.join(format!("node-{id}.log")))
}

#[test]
fn a_loopback_node_without_a_secret_generates_one_only_its_user_can_read_and_refuses_calls_without_it(
) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let addr1 = format!("127.0.0.1:{}", free_port());
    let peers = format!("1={addr1}");
    let mut node1 = lone_node(dir.path(), 1, &addr1, &["--peers", &peers]);
    let data1 = dir.path().join("node-1");
    let sock1 = data1.join("piehole.sock");
    let log1 = dir.path().join("node-1.log");
    let leads = |node: &mut ChildGuard| {
        poll_until("node 1 to lead", Duration::from_secs(20), || {
            assert!(node.alive(), "node 1 exited: {}", tail(&log1, 2000));
            (status_at(&sock1)?["leader_id"].as_u64()? == 1).then_some(())
        })
    };
    leads(&mut node1);

    // The generated secret: in the data dir, the node's user's alone.
    let file = data1.join("cluster-secret");
    let meta = std::fs::metadata(&file).expect("a generated secret file in the data dir");
    assert_eq!(meta.mode() & 0o777, 0o600, "mode of {}", file.display());
    assert_eq!(meta.uid(), std::fs::metadata(&data1).unwrap().uid());
    let secret = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert!(
        secret.len() >= 32 && secret.chars().all(|c| c.is_ascii_graphic()),
        "a long printable secret: {secret:?}"
    );
    // Another local user cannot read it...
    let cat = as_user(
        PUSHER,
        PUSHERS,
        &[],
        dir.path(),
        Path::new("cat"),
        &[file.to_str().unwrap()],
    );
    assert!(
        !cat.status.success() && stderr(&cat).contains("Permission denied"),
        "uid {PUSHER} read the secret: {}",
        show(&cat)
    );
    // ...and without it the peer port answers nothing but a refusal, even
    // to a caller who knows the cluster id and a member's id.
    let cluster_id = status_at(&sock1).unwrap()["cluster_id"]
        .as_str()
        .unwrap()
        .to_string();
    let rt = runtime();
    let call = |secret: Option<&str>| {
        rt.block_on(async {
            let mut peer = pb::peer_client::PeerClient::connect(format!("http://{addr1}"))
                .await
                .unwrap();
            peer.peer_status(peer_status_as(1, &cluster_id, secret))
                .await
                .map(|_| ())
        })
    };
    let e = call(None).expect_err("a peer call without the secret was answered");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = call(Some("a guess that is long enough")).expect_err("a wrong secret was answered");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    call(Some(&secret)).expect("the generated secret is the node's");

    // A restart keeps the same secret.
    drop(node1);
    let mut node1 = lone_node(dir.path(), 1, &addr1, &["--peers", &peers]);
    leads(&mut node1);
    assert_eq!(
        std::fs::read_to_string(&file).unwrap().trim(),
        secret,
        "the secret changed across a restart"
    );
    call(Some(&secret)).expect("the same secret after a restart");
    call(None).expect_err("a peer call without the secret after a restart");

    // A second node on this host joins when given a copy of the first
    // one's secret, as the README says.
    let shared = dir.path().join("shared-secret");
    write_private(&shared, &std::fs::read_to_string(&file).unwrap());
    let addr2 = format!("127.0.0.1:{}", free_port());
    let o = run_piehole(&[
        "member",
        "add",
        &format!("2={addr2}"),
        "--node",
        sock1.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "member add: {}", show(&o));
    let _node2 = lone_node(
        dir.path(),
        2,
        &addr2,
        &[
            "--join",
            &addr1,
            "--cluster-secret-file",
            shared.to_str().unwrap(),
        ],
    );
    let sock2 = dir.path().join("node-2").join("piehole.sock");
    poll_until(
        "node 2 to join and follow node 1",
        Duration::from_secs(30),
        || (status_at(&sock2)?["leader_id"].as_u64()? == 1).then_some(()),
    );
    assert!(
        !dir.path().join("node-2").join("cluster-secret").exists(),
        "node 2, given a secret, generated one of its own"
    );
}

/// A pusher who can write a replica's refs/ plants symlinks in it: a
/// directory under refs/heads leading into a repository it cannot write,
/// and a reflog leading to a file it cannot write. The node writes and
/// deletes refs with its own rights: it must neither delete nor create a
/// ref through the first, nor append to the file through the second.
#[test]
fn symlinks_planted_under_refs_never_lead_the_node_to_write_or_delete_elsewhere() {
    let (c, mine) = pushers_cluster();
    let work = Work::new(&c, "root");
    let first = work.commit("first");
    work.push_ok(&mine[1], &["main"]);
    git::wait_converged(&c, &mine, MAIN, Some(&first));

    // Root's: a private repository with a branch, and a file.
    let private = c.dir.path().join("private.git");
    git::init_bare(&private);
    let out = work.git(&["push", "--quiet", private.to_str().unwrap(), "main"]);
    assert!(out.status.success(), "{}", show(&out));
    let victim = c.dir.path().join("victim.txt");
    std::fs::write(&victim, "root's file\n").unwrap();
    let private_before = tree_listing(&private);

    // The pusher plants them in node 1's replica, which it may write.
    let plant = format!(
        // The node's reflogs are not the pusher's to change, but the
        // repository's directory is the group's: it moves them aside.
        "set -e; ln -s {} refs/heads/evil; mv logs logs.away; mkdir -p logs/refs/heads; \
         ln -s {} logs/refs/heads/main",
        private.join("refs/heads").display(),
        victim.display()
    );
    let out = pusher_sh(&mine[0], &plant);
    assert!(out.status.success(), "the pusher plants: {}", show(&out));

    // Pushes elsewhere: main moves (node 1 would append to its reflog), and
    // a branch appears under the planted directory's name.
    let second = work.commit("second");
    work.push_ok(&mine[1], &["main", "main:refs/heads/evil/planted"]);
    git::wait_converged(&c, &mine[1..], MAIN, Some(&second));
    git::wait_converged(&c, &mine[1..], "refs/heads/evil/planted", Some(&second));
    // Over several of node 1's reconcile passes (every 500 ms), nothing
    // outside changes: its own refs/heads/evil/main, which the planted
    // directory shows, is not deleted, nothing is created, nothing appended.
    let changed = poll(Duration::from_millis(100), Duration::from_secs(3), || {
        (tree_listing(&private) != private_before
            || std::fs::read_to_string(&victim).unwrap() != "root's file\n")
            .then_some(())
    });
    assert!(
        changed.is_none(),
        "a file outside the replica changed: victim {:?}, private repository {:?}",
        std::fs::read_to_string(&victim).unwrap(),
        tree_listing(&private)
            .keys()
            .filter(|p| p.starts_with(private.join("refs")))
            .collect::<Vec<_>>()
    );
    assert_eq!(tree_listing(&private), private_before);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's file\n");
    assert_eq!(
        git::rev_parse(&private, MAIN).as_deref(),
        Some(first.as_str())
    );
    poll_until(
        "node 1 to say why it does not move those refs",
        Duration::from_secs(20),
        || c.log(1).contains("symlink").then_some(()),
    );
}

/// A shared replica's hooks and config are the pushers' to change, so
/// nothing the node runs with its own rights may read them: a pusher's
/// `pre-auto-gc` hook in node 1's replica, with gc made due at every pack,
/// never runs as the node's user when node 1 fetches pushes made elsewhere.
#[test]
fn a_pushers_hook_in_a_shared_replica_never_runs_with_the_nodes_rights() {
    let (c, mine) = pushers_cluster();
    let marker = c.dir.path().join("ran-as");
    let plant = format!(
        "set -e; printf '#!/bin/sh\\nid -u > {}\\n' > hooks/pre-auto-gc; chmod +x hooks/pre-auto-gc; \
         cp config config.new; printf '[gc]\\n\\tauto = 1\\n\\tautoPackLimit = 1\\n' >> config.new; \
         mv -f config.new config",
        marker.display()
    );
    let out = pusher_sh(&mine[0], &plant);
    assert!(out.status.success(), "the pusher plants: {}", show(&out));

    let work = Work::new(&c, "root");
    for n in 0..3 {
        let head = work.commit(&format!("pushed elsewhere {n}"));
        work.push_ok(&mine[1], &["main"]);
        git::wait_converged(&c, &mine, MAIN, Some(&head));
    }
    // gc runs in the background after a fetch: give it time to.
    let ran = poll(Duration::from_millis(100), Duration::from_secs(5), || {
        marker.exists().then_some(())
    });
    assert!(
        ran.is_none(),
        "the pusher's hook ran as uid {}",
        std::fs::read_to_string(&marker).unwrap_or_default().trim()
    );
    poll_until(
        "node 1 to say it leaves gc to git in the shared replica",
        Duration::from_secs(20),
        || c.log(1).contains("git gc skipped").then_some(()),
    );
}
