//! Test harness: real `piehole node` processes on loopback, driven through
//! the `piehole` command and the local API.
//!
//! Rules the tests follow: no fixed sleeps; every wait is a bounded
//! [`poll`] (through [`poll_until`] almost everywhere); each cluster lives in
//! its own temporary directory and is SIGKILLed when dropped. Node stderr
//! goes to `DIR/node-N.log`; the tails of those logs are printed when a poll
//! times out or a test panics.

#![allow(dead_code)]

/// Real etcd servers, for compatibility mode.
pub mod etcd;
/// Bare replicas, work repositories and pushes (written alongside this file).
pub mod git;
/// Faults on purpose: killing and pausing nodes, with seeded randomness.
pub mod nemesis;
/// A TCP proxy that can black-hole a link, for partitions.
pub mod proxy;
/// Watching refs change, fast, and judging the history.
pub mod sampler;
/// Programs beyond git that some tests need, installed when missing.
pub mod tools;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proxy::Proxy;

/// Where a cluster's nodes keep the consensus.
#[derive(Clone)]
pub enum Backend {
    /// The embedded Raft among the nodes (`--peers`).
    Raft,
    /// An etcd cluster (`--etcd`); each piehole cluster on it has its own
    /// key prefix.
    Etcd(Arc<Mutex<etcd::Etcd>>),
    /// The embedded Raft, with mutual TLS on the peer port: every node gets
    /// a certificate for its id from one throw-away CA.
    RaftTls(Arc<PeerCerts>),
}

/// A CA and the node certificates it issued, in a directory of their own.
pub struct PeerCerts {
    dir: tempfile::TempDir,
    authority: Mutex<piehole_client::certs::Authority>,
    issued: Mutex<BTreeMap<u64, Vec<String>>>,
}

impl PeerCerts {
    pub fn new() -> PeerCerts {
        let dir = tempfile::tempdir().expect("tempdir for certificates");
        let authority =
            piehole_client::certs::Authority::new(dir.path(), "cluster").expect("make a CA");
        PeerCerts {
            dir,
            authority: Mutex::new(authority),
            issued: Mutex::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A certificate of another CA, or for another name: for the tests
    /// that must see them refused.
    pub fn authority(&self) -> std::sync::MutexGuard<'_, piehole_client::certs::Authority> {
        self.authority.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Node `id`'s `--tls-*` flags (its certificate made on first use).
    pub fn args(&self, id: u64) -> Vec<String> {
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        issued
            .entry(id)
            .or_insert_with(|| {
                self.authority()
                    .node(id)
                    .expect("issue a node certificate")
                    .args()
            })
            .clone()
    }
}

impl Backend {
    /// A fresh one-member etcd 3.5.
    pub fn etcd() -> Backend {
        Backend::etcd_cluster(1, etcd::Version::V3_5)
    }

    /// A fresh one-member etcd 3.5 that takes clients over TLS with a
    /// client certificate only (see [`etcd::Tls`]).
    pub fn etcd_tls() -> Backend {
        Backend::Etcd(Arc::new(Mutex::new(etcd::Etcd::start_tls(
            etcd::Version::V3_5,
        ))))
    }

    /// A fresh etcd of `members` members of `version`.
    pub fn etcd_cluster(members: usize, version: etcd::Version) -> Backend {
        Backend::Etcd(Arc::new(Mutex::new(etcd::Etcd::start(members, version))))
    }

    pub fn is_etcd(&self) -> bool {
        matches!(self, Backend::Etcd(_))
    }

    /// The embedded Raft over mutual TLS.
    pub fn raft_tls() -> Backend {
        Backend::RaftTls(Arc::new(PeerCerts::new()))
    }

    /// The etcd behind the cluster; panics in Raft mode.
    pub fn etcd_server(&self) -> std::sync::MutexGuard<'_, etcd::Etcd> {
        match self {
            Backend::Etcd(e) => e.lock().unwrap_or_else(|e| e.into_inner()),
            Backend::Raft | Backend::RaftTls(_) => {
                panic!("this cluster runs the embedded Raft, not etcd")
            }
        }
    }
}

/// Runs each named test `fn name(backend: Backend)` once per backend: as
/// `raft::name` on the embedded Raft and `etcd::name` on a real etcd. The
/// same code, with the backend as its parameter.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod raft {
            $(
                #[test]
                fn $name() {
                    super::$name(super::harness::Backend::Raft)
                }
            )*
        }
        mod etcd {
            $(
                #[test]
                fn $name() {
                    super::$name(super::harness::Backend::etcd())
                }
            )*
        }
    };
}

/// All zeros: git's (and `piehole ref cas`'s) "absent".
pub const ZERO: &str = "0000000000000000000000000000000000000000";

/// The `piehole` binary under test.
pub fn piehole() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_piehole"))
}

thread_local! {
    /// Log files of the clusters alive on this thread, printed on a timeout.
    static LOGS: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
}

fn register_log(p: &Path) {
    LOGS.with(|l| {
        let mut l = l.borrow_mut();
        if !l.iter().any(|x| x == p) {
            l.push(p.to_path_buf());
        }
    });
}

fn unregister_logs(under: &Path) {
    LOGS.with(|l| l.borrow_mut().retain(|p| !p.starts_with(under)));
}

/// The last `max` bytes of a file (lossy), for diagnostics.
pub fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(no {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Prints the tails of the node logs of this thread's clusters.
pub fn dump_logs() {
    LOGS.with(|l| {
        for p in l.borrow().iter() {
            eprintln!(
                "----- tail of {} -----\n{}\n----- end -----",
                p.display(),
                tail(p, 4000)
            );
        }
    });
}

/// How often a poll looks again: often enough that a wait costs little
/// beyond the event itself, seldom enough not to load the nodes.
pub const POLL_EVERY: Duration = Duration::from_millis(50);

/// The request timeout (`--request-timeout-ms`) of test clusters that must
/// refuse quickly: those that lose their majority, or meet a frozen node.
pub const SHORT_REQUEST_TIMEOUT_MS: u64 = 3_000;

/// How soon a push (or any command) must be refused when the cluster cannot
/// answer: the node gives up on a consensus request after its request
/// timeout, and the hook waits 3 s beyond that for it (`MARGIN` in
/// client/src/cmd/hook.rs), so request timeout + 3 s is the bound a user is
/// promised; plus 1 s for starting git, the hook and their processes on a
/// loaded machine.
pub const REFUSAL_BOUND: Duration = Duration::from_millis(SHORT_REQUEST_TIMEOUT_MS + 3_000 + 1_000);

/// The one poll loop: calls `f` every `every` until it returns `Some`, or
/// gives `None` once `timeout` has passed without one. For callers that
/// handle a timeout themselves; the others use [`poll_until`].
pub fn poll<T>(every: Duration, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Polls `f` until it returns `Some`; after `timeout` prints the node logs
/// and panics naming `what`.
pub fn poll_until<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    poll_until_showing(what, timeout, f, String::new)
}

/// Like [`poll_until`], and the panic message also carries what
/// `last_state()` reports at the timeout (e.g. every replica's refs).
pub fn poll_until_showing<T>(
    what: &str,
    timeout: Duration,
    f: impl FnMut() -> Option<T>,
    last_state: impl FnOnce() -> String,
) -> T {
    if let Some(v) = poll(POLL_EVERY, timeout, f) {
        return v;
    }
    dump_logs();
    let state = last_state();
    if state.is_empty() {
        panic!("timed out after {timeout:?} waiting for: {what}");
    }
    panic!("timed out after {timeout:?} waiting for: {what}; last state:\n{state}");
}

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A listener on a loopback port that no other caller in this test process
/// was given, from [`free_port`] or from here.
pub fn fresh_listener() -> TcpListener {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        let mut g = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if g.get_or_insert_with(HashSet::new).insert(port) {
            return l;
        }
    }
}

/// Writes `text` to a file only its owner can read, as a node requires of
/// a secret.
pub fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).expect("write a private file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .expect("chmod 600 a private file");
}

/// A currently free loopback port (bound, read, dropped). Never returns the
/// same port twice within one test process.
pub fn free_port() -> u16 {
    fresh_listener().local_addr().expect("local_addr").port()
}

/// A 40-hex object id derived from `n` (distinct for distinct `n`; never zero).
pub fn oid(n: u64) -> String {
    format!("{:040x}", (n as u128) + 1)
}

/// Runs `piehole` with `args`; stdout and stderr captured.
pub fn run_piehole(args: &[&str]) -> Output {
    Command::new(piehole())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run the piehole binary")
}

/// Exit status and both streams of an output, for assertion messages.
pub fn show(o: &Output) -> String {
    format!(
        "exit {}\n--- stdout\n{}--- stderr\n{}",
        o.status,
        stdout(o),
        stderr(o)
    )
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the shape of a user-facing error: non-zero exit `code`, exactly
/// one non-empty line on stderr starting `piehole: `, no panic text.
/// Returns that line.
pub fn assert_one_line_error(o: &Output, code: i32) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "{}", show(o));
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr; {}", show(o));
    assert!(lines[0].starts_with("piehole: "), "{}", show(o));
    for bad in [
        "panicked",
        "internal error",
        "RUST_BACKTRACE",
        "stack backtrace",
    ] {
        assert!(!err.contains(bad), "panic text on stderr; {}", show(o));
    }
    lines[0].to_string()
}

/// Spawns a process and waits (bounded) for it to exit; kills it and panics
/// if it does not. For commands that are expected to fail fast, like a node
/// with a bad configuration.
pub fn run_expect_exit(mut cmd: Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let exited = poll(POLL_EVERY, timeout, || child.try_wait().expect("try_wait"));
    if exited.is_none() {
        let _ = child.kill();
        let out = child.wait_with_output().expect("wait");
        panic!("process did not exit within {timeout:?}; {}", show(&out));
    }
    // It has exited: this only collects its status and output.
    child.wait_with_output().expect("wait")
}

/// A small multi-thread tokio runtime for LocalClient calls in a sync test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Spawns `piehole args`, stderr and stdout appended to `log`, whose tail
/// is printed if a poll of this thread times out.
fn spawn_logged<S: AsRef<std::ffi::OsStr>>(args: &[S], log: &Path) -> Child {
    register_log(log);
    let f = File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("open log");
    Command::new(piehole())
        .args(args)
        // A test gives a node its secret itself, or none on purpose.
        .env_remove("PIEHOLE_CLUSTER_SECRET")
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("dup log"))
        .stderr(f)
        .spawn()
        .expect("spawn piehole")
}

/// A process killed (SIGKILL) and reaped when dropped.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Spawns `piehole args`, stderr and stdout appended to `log`.
    pub fn spawn_piehole(args: &[&str], log: &Path) -> ChildGuard {
        ChildGuard(spawn_logged(args, log))
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `piehole status --node SOCK --json` against any socket; None on failure.
pub fn status_at(sock: &Path) -> Option<serde_json::Value> {
    let o = run_piehole(&["status", "--node", sock.to_str()?, "--json"]);
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

pub struct Node {
    pub id: u64,
    pub data_dir: PathBuf,
    pub addr: String,
    /// For a node added to a running cluster ([`Cluster::new_node`]): its
    /// `--join` (members' addresses, comma-separated), given instead of
    /// `--peers` at every start. None for the founding members.
    pub join: Option<String>,
    child: Option<Child>,
}

impl Node {
    pub fn log_path(&self) -> PathBuf {
        self.data_dir
            .parent()
            .expect("data dir has a parent")
            .join(format!("node-{}.log", self.id))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    extra_args: Vec<String>,
    /// Arguments for one node only, after `extra_args`.
    node_args: BTreeMap<u64, Vec<String>>,
    /// In a partitionable cluster, the proxy of every directed link
    /// (from, to): node `from` names node `to` at that proxy's address, so
    /// every connection `from` opens to `to` goes through it. Empty otherwise.
    links: BTreeMap<(u64, u64), Proxy>,
    /// The nodes cut off by [`Cluster::isolate`] and not healed yet.
    isolated: BTreeSet<u64>,
    pub backend: Backend,
    /// The secret every node was given and its file, unless the test chose
    /// its own or the peers speak TLS: for tests that speak the peer API
    /// themselves.
    pub secret: Option<(String, PathBuf)>,
    /// In etcd mode, the key prefix of this cluster's keys.
    pub etcd_prefix: String,
    /// In etcd mode, the `--etcd` of a node that reaches etcd some other
    /// way (through a proxy), from its next (re)start on.
    pub etcd_via: BTreeMap<u64, String>,
}

impl Cluster {
    /// `n` nodes with `--request-timeout-ms 5000`; returns once they agree on a leader.
    pub fn start(n: usize) -> Cluster {
        Cluster::start_with(n, &[])
    }

    /// Like [`Cluster::start`], with `extra_args` passed to every `piehole
    /// node` (a `--request-timeout-ms` among them replaces the default 5000).
    pub fn start_with(n: usize, extra_args: &[&str]) -> Cluster {
        Cluster::start_on(&Backend::Raft, n, extra_args)
    }

    /// Like [`Cluster::start_with`], on `backend`; returns once every node
    /// is ready (a leader agreed on, or every node registered in etcd).
    pub fn start_on(backend: &Backend, n: usize, extra_args: &[&str]) -> Cluster {
        let c = Cluster::launch_inner(backend, n, extra_args, &|_| Vec::new(), false);
        c.wait_ready();
        c
    }

    /// Starts the processes and waits until every socket answers, without
    /// waiting for a leader (for clusters that are not meant to elect one).
    pub fn launch(n: usize, extra_args: &[&str]) -> Cluster {
        Cluster::launch_per_node(n, extra_args, &|_| Vec::new())
    }

    /// Like [`Cluster::launch`], with `per_node(id)` appended to node `id`'s
    /// arguments (e.g. a different secret file per node).
    pub fn launch_per_node(
        n: usize,
        extra_args: &[&str],
        per_node: &dyn Fn(u64) -> Vec<String>,
    ) -> Cluster {
        Cluster::launch_inner(&Backend::Raft, n, extra_args, per_node, false)
    }

    /// Spawns `n` node processes (with `per_node(id)` appended to node
    /// `id`'s arguments) and returns at once, waiting for nothing: for nodes
    /// that are not meant to bootstrap, whose local sockets never appear.
    /// No retry on a taken port (a node that cannot listen exits; the
    /// caller sees it in [`Cluster::is_running`] and the log).
    pub fn spawn_per_node(
        n: usize,
        extra_args: &[&str],
        per_node: &dyn Fn(u64) -> Vec<String>,
    ) -> Cluster {
        let mut c = Cluster::new_unstarted(&Backend::Raft, n, extra_args, per_node, false);
        for id in 1..=n as u64 {
            c.spawn(id);
        }
        c
    }

    /// The cluster's description (data dirs, ports, arguments), no process
    /// started yet.
    fn new_unstarted(
        backend: &Backend,
        n: usize,
        extra_args: &[&str],
        per_node: &dyn Fn(u64) -> Vec<String>,
        partitionable: bool,
    ) -> Cluster {
        let mut extra: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        if !extra.iter().any(|a| a.starts_with("--request-timeout-ms")) {
            extra.push("--request-timeout-ms".into());
            extra.push("5000".into());
        }
        let dir = tempfile::Builder::new()
            .prefix("piehole-test-")
            .tempdir()
            .expect("tempdir");
        // One secret for the whole cluster, as an operator gives every
        // member the same file: a loopback node given none generates its
        // own, which no other node would know. Not with TLS, which keeps
        // outsiders off by itself, and not when the test chose the secrets.
        let chosen = extra
            .iter()
            .chain((1..=n as u64).flat_map(per_node).collect::<Vec<_>>().iter())
            .any(|a| a.starts_with("--cluster-secret-file"));
        let secret = match backend {
            Backend::RaftTls(_) => None,
            _ if chosen => None,
            _ => {
                let secret = format!("harness secret {}", free_port());
                let file = dir.path().join("cluster-secret");
                write_private(&file, &format!("{secret}\n"));
                extra.extend(["--cluster-secret-file".into(), file.display().to_string()]);
                Some((secret, file))
            }
        };
        let nodes = (1..=n as u64)
            .map(|id| Node {
                id,
                data_dir: dir.path().join(format!("node-{id}")),
                addr: format!("127.0.0.1:{}", free_port()),
                join: None,
                child: None,
            })
            .collect::<Vec<Node>>();
        let links = if partitionable {
            links_between(&nodes)
        } else {
            BTreeMap::new()
        };
        Cluster {
            dir,
            nodes,
            extra_args: extra,
            node_args: (1..=n as u64).map(|id| (id, per_node(id))).collect(),
            links,
            isolated: BTreeSet::new(),
            backend: backend.clone(),
            secret,
            etcd_prefix: format!("/piehole-{}/", free_port()),
            etcd_via: BTreeMap::new(),
        }
    }

    /// Like [`Cluster::start_with`], but every directed link i -> j runs
    /// through its own [`Proxy`], so that [`Cluster::isolate`] can cut a
    /// node off the network while its process keeps running.
    pub fn start_partitionable(n: usize, extra_args: &[&str]) -> Cluster {
        let c = Cluster::launch_inner(&Backend::Raft, n, extra_args, &|_| Vec::new(), true);
        c.wait_leader();
        c
    }

    fn launch_inner(
        backend: &Backend,
        n: usize,
        extra_args: &[&str],
        per_node: &dyn Fn(u64) -> Vec<String>,
        partitionable: bool,
    ) -> Cluster {
        // A port handed out by free_port() can be taken by someone else
        // before the node binds it; then start over with fresh ports.
        for attempt in 0.. {
            let mut c = Cluster::new_unstarted(backend, n, extra_args, per_node, partitionable);
            for id in 1..=n as u64 {
                c.spawn(id);
            }
            match c.wait_sockets() {
                Ok(()) => return c,
                Err(why) if attempt < 3 && why.contains("cannot listen") => {
                    eprintln!("cluster start: {why}; retrying with other ports");
                    continue;
                }
                Err(why) => {
                    dump_logs();
                    panic!("cluster did not start: {why}");
                }
            }
        }
        unreachable!()
    }

    /// Node `id`'s `--peers`: every member at its listen address, or at the
    /// address of the link's proxy in a partitionable cluster. The node
    /// compares only member ids with what its data dir recorded, so each
    /// node may name the others at different addresses.
    ///
    /// Only the founding members are named (not nodes added later with
    /// [`Cluster::new_node`]), and all of them, removed or not: `--peers`
    /// seeds the first start; after that the data dir has the members.
    fn peers_arg(&self, id: u64) -> String {
        self.nodes
            .iter()
            .filter(|n| n.join.is_none())
            .map(|n| match self.links.get(&(id, n.id)) {
                Some(proxy) => format!("{}={}", n.id, proxy.addr()),
                None => format!("{}={}", n.id, n.addr),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The full argument list of `piehole node` for node `id`.
    pub fn node_args(&self, id: u64) -> Vec<String> {
        let n = self.node(id);
        let mut args = vec![
            "node".to_string(),
            "--id".into(),
            id.to_string(),
            "--data-dir".into(),
            n.data_dir.display().to_string(),
            "--listen".into(),
            n.addr.clone(),
        ];
        match &self.backend {
            Backend::Raft | Backend::RaftTls(_) => match &n.join {
                Some(join) => args.extend(["--join".into(), join.clone()]),
                None => args.extend(["--peers".into(), self.peers_arg(id)]),
            },
            Backend::Etcd(e) => {
                let endpoints = match self.etcd_via.get(&id) {
                    Some(via) => via.clone(),
                    None => e.lock().unwrap_or_else(|e| e.into_inner()).endpoints(),
                };
                args.extend([
                    "--etcd".into(),
                    endpoints,
                    "--etcd-prefix".into(),
                    self.etcd_prefix.clone(),
                ]);
            }
        }
        if let Backend::RaftTls(certs) = &self.backend {
            args.extend(certs.args(id));
        }
        args.extend(self.extra_args.iter().cloned());
        args.extend(self.node_args.get(&id).into_iter().flatten().cloned());
        args
    }

    fn spawn(&mut self, id: u64) {
        let child = spawn_logged(&self.node_args(id), &self.node(id).log_path());
        self.node_mut(id).child = Some(child);
    }

    /// Waits until every running node answers `status`; Err if a node exits.
    fn wait_sockets(&mut self) -> Result<(), String> {
        poll(POLL_EVERY, Duration::from_secs(20), || {
            for n in &mut self.nodes {
                if let Some(Ok(Some(st))) = n.child.as_mut().map(Child::try_wait) {
                    n.child = None;
                    let log = tail(&n.log_path(), 2000);
                    return Some(Err(format!("node {} exited ({st}): {log}", n.id)));
                }
            }
            let running = self.running_ids();
            running
                .iter()
                .all(|&id| self.try_status(id).is_some())
                .then_some(Ok(()))
        })
        .unwrap_or_else(|| Err("nodes' sockets did not answer within 20s".into()))
    }

    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[(id - 1) as usize]
    }

    fn node_mut(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    pub fn running_ids(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.id)
            .collect()
    }

    pub fn socket(&self, id: u64) -> PathBuf {
        self.node(id).data_dir.join("piehole.sock")
    }

    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.node(id).log_path()).unwrap_or_default()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.node_mut(id).child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `id` again with the same flags and data dir; returns once
    /// its socket answers `status`.
    pub fn restart(&mut self, id: u64) {
        assert!(!self.is_running(id), "node {id} is still running");
        self.spawn(id);
        self.wait_answers(id, "restarted", Duration::from_secs(20));
    }

    /// Starts every stopped node at once, then waits until each answers:
    /// nodes with empty data dirs bootstrap together, so none of them
    /// answers before all have started.
    pub fn restart_all(&mut self) {
        let stopped: Vec<u64> = self
            .ids()
            .into_iter()
            .filter(|&id| !self.is_running(id))
            .collect();
        for &id in &stopped {
            self.spawn(id);
        }
        for id in stopped {
            self.wait_answers(id, "restarted", Duration::from_secs(20));
        }
    }

    /// Starts node `id` (stopped) with `args` instead of its usual ones: a
    /// full `piehole node ...` argument list, e.g. [`Cluster::node_args`]
    /// altered. Output goes to its usual log; returns once its socket
    /// answers `status`. Its later restarts use its usual arguments again.
    pub fn restart_with_args(&mut self, id: u64, args: &[String]) {
        assert!(!self.is_running(id), "node {id} is still running");
        let child = spawn_logged(args, &self.node(id).log_path());
        self.node_mut(id).child = Some(child);
        self.wait_answers(id, "restarted", Duration::from_secs(20));
    }

    /// Polls until node `id`'s socket answers `status`; panics with its log
    /// if its process exits first.
    fn wait_answers(&self, id: u64, how: &str, timeout: Duration) {
        let log_path = self.node(id).log_path();
        poll_until(&format!("{how} node {id} answers status"), timeout, || {
            if !self.is_running_now(id) {
                panic!("{how} node {id} exited: {}", tail(&log_path, 2000));
            }
            self.try_status(id).map(|_| ())
        });
    }

    // -----------------------------------------------------------------
    // Membership (embedded Raft only)

    /// Describes node N+1 (N = the nodes so far), without starting it or
    /// making it a member: a fresh data dir and loopback port, and at every
    /// start `--join` with the listen addresses of `join_via` instead of
    /// `--peers`, plus the cluster's extra arguments. Announce it with
    /// [`Cluster::member_add`] (its address is fixed from here on), then
    /// start it with [`Cluster::start_node`]. Returns its id.
    pub fn new_node(&mut self, join_via: &[u64]) -> u64 {
        assert!(
            matches!(self.backend, Backend::Raft),
            "nodes join the embedded Raft only"
        );
        assert!(
            self.links.is_empty(),
            "a partitionable cluster has proxies for its first members only"
        );
        assert!(!join_via.is_empty(), "a joining node needs a member to ask");
        let id = self.nodes.len() as u64 + 1;
        let join = join_via
            .iter()
            .map(|&m| self.node(m).addr.clone())
            .collect::<Vec<_>>()
            .join(",");
        self.nodes.push(Node {
            id,
            data_dir: self.dir.path().join(format!("node-{id}")),
            addr: format!("127.0.0.1:{}", free_port()),
            join: Some(join),
            child: None,
        });
        id
    }

    /// Starts node `id` (stopped; typically the first start of a node from
    /// [`Cluster::new_node`]) with its usual arguments; returns once its
    /// socket answers `status`. Allows a joining node up to 60 s (it asks
    /// the members before it opens its socket).
    pub fn start_node(&mut self, id: u64) {
        assert!(!self.is_running(id), "node {id} is already running");
        self.spawn(id);
        self.wait_answers(id, "started", Duration::from_secs(60));
    }

    /// [`Cluster::new_node`] joining through `via`, announced with `member
    /// add` through `via` (which must succeed), and started. Returns its id.
    pub fn join_node(&mut self, via: u64) -> u64 {
        let id = self.new_node(&[via]);
        let o = self.member_add(via, id);
        assert!(
            o.status.success(),
            "member add {id} through node {via}: {}",
            show(&o)
        );
        self.start_node(id);
        id
    }

    /// `piehole member add ID=ADDR --node SOCK`: node `id` at its address,
    /// through node `via`'s socket.
    pub fn member_add(&self, via: u64, id: u64) -> Output {
        let spec = format!("{id}={}", self.node(id).addr);
        let sock = self.socket(via);
        self.run(&["member", "add", &spec, "--node", sock.to_str().unwrap()])
    }

    /// `piehole member remove ID --node SOCK` through node `via`'s socket.
    pub fn member_remove(&self, via: u64, id: u64) -> Output {
        let sock = self.socket(via);
        self.run(&[
            "member",
            "remove",
            &id.to_string(),
            "--node",
            sock.to_str().unwrap(),
        ])
    }

    /// `piehole member list --node SOCK --json` through node `via`, parsed;
    /// None if the command fails or prints no JSON.
    pub fn try_member_list(&self, via: u64) -> Option<serde_json::Value> {
        let sock = self.socket(via);
        let o = self.run(&["member", "list", "--node", sock.to_str()?, "--json"]);
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    /// Like [`Cluster::try_member_list`], panicking on failure.
    pub fn member_list(&self, via: u64) -> serde_json::Value {
        let sock = self.socket(via);
        let o = self.run(&["member", "list", "--node", sock.to_str().unwrap(), "--json"]);
        assert!(
            o.status.success(),
            "member list through node {via}: {}",
            show(&o)
        );
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("member list is not JSON ({e}): {}", show(&o)))
    }

    /// Member id -> role ("voter", "learner", "removed") as node `via`'s
    /// `member list` shows them; None on failure.
    pub fn try_roles(&self, via: u64) -> Option<BTreeMap<u64, String>> {
        roles_of(&self.try_member_list(via)?)
    }

    /// Polls until node `via`'s `member list` shows node `id` as `role`.
    pub fn wait_role(&self, via: u64, id: u64, role: &str, timeout: Duration) {
        poll_until_showing(
            &format!("node {via}'s member list shows node {id} as {role}"),
            timeout,
            || (self.try_roles(via)?.get(&id)? == role).then_some(()),
            || format!("{:?}", self.try_member_list(via)),
        )
    }

    /// Deletes node `id`'s data dir (the node must be stopped): its disk was lost.
    pub fn wipe(&mut self, id: u64) {
        assert!(!self.is_running(id), "node {id} is still running");
        let dir = self.node(id).data_dir.clone();
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("cannot delete {}: {e}", dir.display()),
        }
    }

    /// `piehole node` with node `id`'s usual arguments (RUST_LOG unset), not
    /// spawned: for [`run_expect_exit`].
    pub fn node_command(&self, id: u64) -> Command {
        let mut cmd = Command::new(piehole());
        cmd.args(self.node_args(id)).env_remove("RUST_LOG");
        cmd
    }

    /// Starts node `id` with its usual arguments, expecting the process to
    /// exit by itself within `timeout` (else it is killed and this panics);
    /// its status and output. The harness does not track this process.
    pub fn run_node_expect_exit(&self, id: u64, timeout: Duration) -> Output {
        assert!(!self.is_running(id), "node {id} is still running");
        run_expect_exit(self.node_command(id), timeout)
    }

    /// Extra arguments for node `id` alone, from its next (re)start on
    /// (replacing those it was given before).
    pub fn set_node_args(&mut self, id: u64, args: &[&str]) {
        self.node_args
            .insert(id, args.iter().map(|a| a.to_string()).collect());
    }

    /// Whether the harness has a live process for node `id`.
    pub fn is_running(&self, id: u64) -> bool {
        self.node(id).child.is_some() && self.is_running_now(id)
    }

    /// Checks the process itself (it may have exited on its own).
    fn is_running_now(&self, id: u64) -> bool {
        // try_wait needs &mut; the pid check through /proc is enough here.
        match self.node(id).pid() {
            None => false,
            Some(pid) => match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                // A zombie ("Z") has exited but is not reaped yet.
                Ok(stat) => !stat
                    .rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                    .unwrap_or(false),
                Err(_) => false,
            },
        }
    }

    /// `piehole status --node SOCK --json`; None if it fails.
    pub fn try_status(&self, id: u64) -> Option<serde_json::Value> {
        status_at(&self.socket(id))
    }

    /// `piehole status --node SOCK --json`; panics on failure.
    pub fn status(&self, id: u64) -> serde_json::Value {
        let sock = self.socket(id);
        let o = self.run(&["status", "--node", sock.to_str().unwrap(), "--json"]);
        assert!(
            o.status.success(),
            "status of node {id} failed: {}",
            show(&o)
        );
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("status of node {id} is not JSON ({e}): {}", show(&o)))
    }

    /// Until the running nodes can take pushes: they agree on a leader
    /// (Raft), or each sees every running node registered and alive (etcd).
    pub fn wait_ready(&self) {
        if !self.backend.is_etcd() {
            self.wait_leader();
            return;
        }
        let running = self.running_ids();
        poll_until(
            &format!("nodes {running:?} see each other alive in etcd"),
            Duration::from_secs(20),
            || {
                for &id in &running {
                    let st = self.try_status(id)?;
                    let alive: BTreeSet<u64> = st["members"]
                        .as_array()?
                        .iter()
                        .filter(|m| m["reachable"].as_bool() == Some(true))
                        .filter_map(|m| m["id"].as_u64())
                        .collect();
                    if !running.iter().all(|r| alive.contains(r)) {
                        return None;
                    }
                }
                Some(())
            },
        )
    }

    /// Polls (20 s) until every running node names the same non-null leader.
    pub fn wait_leader(&self) -> u64 {
        let running = self.running_ids();
        poll_until(
            &format!("nodes {running:?} agree on a leader"),
            Duration::from_secs(20),
            || {
                let mut leader = None;
                for &id in &running {
                    let l = self.try_status(id)?["leader_id"].as_u64()?;
                    if !running.contains(&l) || leader.is_some_and(|x| x != l) {
                        return None;
                    }
                    leader = Some(l);
                }
                leader
            },
        )
    }

    /// Runs `piehole` with `args` (no implicit `--node`).
    pub fn run(&self, args: &[&str]) -> Output {
        run_piehole(args)
    }

    /// `piehole ref --node SOCK cas GROUP REF OLD NEW`.
    pub fn cas(&self, id: u64, group: &str, r: &str, old: &str, new: &str) -> Output {
        let sock = self.socket(id);
        self.run(&[
            "ref",
            "--node",
            sock.to_str().unwrap(),
            "cas",
            group,
            r,
            old,
            new,
        ])
    }

    /// Like [`Cluster::cas`], asserting `applied` and returning the current value.
    pub fn cas_ok(&self, id: u64, group: &str, r: &str, old: &str, new: &str) -> String {
        let o = self.cas(id, group, r, old, new);
        let out = stdout(&o);
        assert!(
            o.status.success() && out.starts_with("applied "),
            "cas {group} {r} {old} -> {new} on node {id}: {}",
            show(&o)
        );
        out.trim_start_matches("applied ").trim().to_string()
    }

    /// `piehole ref --node SOCK get GROUP --json`, with `--local` when
    /// `local` (else linearizable); None on failure.
    pub fn try_refs(&self, id: u64, group: &str, local: bool) -> Option<BTreeMap<String, String>> {
        self.read_refs(id, group, local).ok()
    }

    /// Like [`Cluster::try_refs`], panicking on failure.
    pub fn refs(&self, id: u64, group: &str, local: bool) -> BTreeMap<String, String> {
        self.read_refs(id, group, local)
            .unwrap_or_else(|why| panic!("ref get {group} on node {id}: {why}"))
    }

    fn read_refs(
        &self,
        id: u64,
        group: &str,
        local: bool,
    ) -> Result<BTreeMap<String, String>, String> {
        let sock = self.socket(id);
        let sock = sock.to_str().expect("socket path is UTF-8");
        let mut args = vec!["ref", "--node", sock, "get", group, "--json"];
        if local {
            args.push("--local");
        }
        let o = self.run(&args);
        if !o.status.success() {
            return Err(show(&o));
        }
        serde_json::from_slice(&o.stdout).map_err(|e| format!("not JSON ({e}): {}", show(&o)))
    }

    /// Black-holes every link into and out of node `id` (see
    /// [`Proxy::blackhole`]): it and its peers stop hearing each other,
    /// silently, as behind a router that drops their packets. Its process,
    /// local socket and repositories carry on. Partitionable clusters only.
    pub fn isolate(&mut self, id: u64) {
        self.isolated.insert(id);
        self.cut_links();
    }

    /// Undoes [`Cluster::isolate`] for node `id`: its links carry traffic
    /// again, except those to a node that is still isolated.
    pub fn heal(&mut self, id: u64) {
        self.isolated.remove(&id);
        self.cut_links();
    }

    /// A link is black-holed exactly when either end is isolated.
    fn cut_links(&self) {
        assert!(
            !self.links.is_empty(),
            "isolate and heal need a cluster from Cluster::start_partitionable"
        );
        for (&(from, to), proxy) in &self.links {
            proxy.blackhole(self.isolated.contains(&from) || self.isolated.contains(&to));
        }
    }

    /// A LocalClient connected to node `id`'s socket.
    pub async fn client(&self, id: u64) -> piehole_client::LocalClient {
        piehole_client::LocalClient::connect(&self.socket(id))
            .await
            .unwrap_or_else(|e| panic!("connect to node {id}: {e}"))
    }
}

/// Member id -> role from `member list --json` output; None if it has no
/// `members` array.
pub fn roles_of(list: &serde_json::Value) -> Option<BTreeMap<u64, String>> {
    list["members"]
        .as_array()?
        .iter()
        .map(|m| Some((m["id"].as_u64()?, m["role"].as_str()?.to_string())))
        .collect()
}

/// One proxy per directed link between `nodes`, keyed (from, to), each
/// forwarding to the listen address of `to`.
fn links_between(nodes: &[Node]) -> BTreeMap<(u64, u64), Proxy> {
    let mut links = BTreeMap::new();
    for from in nodes {
        for to in nodes.iter().filter(|to| to.id != from.id) {
            let target: SocketAddr = to.addr.parse().expect("a node's address is IP:PORT");
            links.insert((from.id, to.id), Proxy::start(target));
        }
    }
    links
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            dump_logs();
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        unregister_logs(self.dir.path());
    }
}
