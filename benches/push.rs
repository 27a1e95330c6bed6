//! Wall-clock figures for the push path, measured in one run on one machine,
//! every kind of push interleaved with the others sample by sample so that
//! whatever else the machine does weighs on all of them alike:
//!
//! - `git push` of one small commit into a plain bare repository, without
//!   and with `core.fsync=committed` (what `piehole install` sets);
//! - the same push into a replica of a three-node loopback cluster with
//!   `--durability local`, and into one with `--durability quorum`;
//! - when the pushed ref is on every replica: a watcher thread reads the
//!   other replicas' ref files from the moment the push starts, so the
//!   clock cannot start after they already have it;
//! - `git push --tags` of 200 new tags, plain and into the cluster;
//! - `git push` of one 8 MB commit, plain and into each cluster;
//! - the small push again into a three-node cluster in etcd mode, against
//!   a three-member etcd 3.5 on the same machine (`--durability local`);
//! - one consensus CAS through the local API, and the proc-receive hook
//!   alone (process start + one round trip).
//!
//! Run: `cargo bench -p piehole --bench push` (release profile). Results go to
//! stdout; BENCHMARKS.md records them with the machine they came from.

#[path = "../tests/harness/mod.rs"]
mod harness;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use harness::git::{init_bare, replicas, Work};
use harness::{Backend, Cluster};

const SAMPLES: usize = 31;
const CAS_SAMPLES: usize = 500;
const TAG_SAMPLES: usize = 5;
const TAGS: usize = 200;
const BIG_SAMPLES: usize = 5;
const BIG_BYTES: usize = 8 * 1024 * 1024;

fn main() {
    let local = Cluster::start_with(3, &["--reconcile-interval-ms", "1000"]);
    let quorum = Cluster::start_with(
        3,
        &["--durability", "quorum", "--reconcile-interval-ms", "1000"],
    );
    let etcd = Cluster::start_on(
        &Backend::etcd_cluster(3, harness::etcd::Version::V3_5),
        3,
        &["--reconcile-interval-ms", "1000"],
    );
    cas_latency("embedded Raft", &local);
    cas_latency("etcd (3 members)", &etcd);
    let local_reps = replicas(&local, "bench");
    let etcd_reps = replicas(&etcd, "bench");
    let quorum_reps = replicas(&quorum, "bench");
    let plain = local.dir.path().join("plain.git");
    init_bare(&plain);
    // The same durability piehole's install asks of git, without the hooks.
    let plain_fsync = local.dir.path().join("plain-fsync.git");
    init_bare(&plain_fsync);
    harness::git::git_ok(&plain_fsync, &["config", "core.fsync", "committed"]);

    let work = Work::new(&local, "bench");
    work.commit("seed");
    for target in [
        &local_reps[0],
        &quorum_reps[0],
        &etcd_reps[0],
        &plain,
        &plain_fsync,
    ] {
        work.push_ok(target, &["HEAD:refs/heads/main"]);
    }
    hook_alone(&local_reps[0]);

    let mut t = Timings::default();
    for i in 0..SAMPLES {
        work.commit(&format!("c{i}"));
        let id = work.head();
        t.plain
            .push(timed(|| work.push_ok(&plain, &["HEAD:refs/heads/main"])));
        t.plain_fsync.push(timed(|| {
            work.push_ok(&plain_fsync, &["HEAD:refs/heads/main"])
        }));
        let (push, everywhere, after) = replicated_push(&work, &local_reps, &id);
        t.local.push(push);
        t.local_everywhere.push(everywhere);
        t.local_after_ack.push(after);
        let (push, everywhere, after) = replicated_push(&work, &quorum_reps, &id);
        t.quorum.push(push);
        t.quorum_everywhere.push(everywhere);
        t.quorum_after_ack.push(after);
        let (push, everywhere, after) = replicated_push(&work, &etcd_reps, &id);
        t.etcd.push(push);
        t.etcd_everywhere.push(everywhere);
        t.etcd_after_ack.push(after);
    }
    let (mut plain_tags, mut fsync_tags, mut cluster_tags) = (vec![], vec![], vec![]);
    for s in 0..TAG_SAMPLES {
        for n in 0..TAGS {
            work.git_ok(&["tag", &format!("t{s}-{n}")]);
        }
        plain_tags.push(timed(|| work.push_ok(&plain, &["--tags"])));
        fsync_tags.push(timed(|| work.push_ok(&plain_fsync, &["--tags"])));
        cluster_tags.push(timed(|| work.push_ok(&local_reps[0], &["--tags"])));
    }
    let (mut big_plain, mut big_local, mut big_quorum) = (vec![], vec![], vec![]);
    for s in 0..BIG_SAMPLES {
        let data = harness::git::random_bytes(0x1000 * (s as u64 + 1), BIG_BYTES);
        work.commit_file(&format!("big-{s}.bin"), &data, &format!("big {s}"));
        let id = work.head();
        big_plain.push(timed(|| {
            work.push_ok(&plain_fsync, &["HEAD:refs/heads/main"])
        }));
        big_local.push(replicated_push(&work, &local_reps, &id).0);
        big_quorum.push(replicated_push(&work, &quorum_reps, &id).0);
    }

    report(
        "git push, 1 small commit, plain bare repo (no hooks)",
        &mut t.plain,
    );
    report(
        "git push, 1 small commit, plain bare repo with core.fsync=committed",
        &mut t.plain_fsync,
    );
    report(
        "git push, 1 small commit, 3-node cluster, --durability local",
        &mut t.local,
    );
    report(
        "git push, 1 small commit, 3-node cluster, --durability quorum",
        &mut t.quorum,
    );
    report(
        "local: push started -> ref on all three replicas",
        &mut t.local_everywhere,
    );
    report_after_ack("local", &mut t.local_after_ack);
    report(
        "quorum: push started -> ref on all three replicas",
        &mut t.quorum_everywhere,
    );
    report_after_ack("quorum", &mut t.quorum_after_ack);
    report(
        "git push, 1 small commit, 3-node cluster on a 3-member etcd, --durability local",
        &mut t.etcd,
    );
    report(
        "etcd: push started -> ref on all three replicas",
        &mut t.etcd_everywhere,
    );
    report_after_ack("etcd", &mut t.etcd_after_ack);
    report(
        &format!("git push --tags, {TAGS} new tags, plain bare repo"),
        &mut plain_tags,
    );
    report(
        &format!("git push --tags, {TAGS} new tags, plain bare repo with core.fsync=committed"),
        &mut fsync_tags,
    );
    report(
        &format!("git push --tags, {TAGS} new tags, 3-node cluster (local)"),
        &mut cluster_tags,
    );
    let mb = BIG_BYTES / (1024 * 1024);
    report(
        &format!("git push, one {mb} MB commit, plain bare repo with core.fsync=committed"),
        &mut big_plain,
    );
    report(
        &format!("git push, one {mb} MB commit, 3-node cluster, --durability local"),
        &mut big_local,
    );
    report(
        &format!("git push, one {mb} MB commit, 3-node cluster, --durability quorum"),
        &mut big_quorum,
    );
}

#[derive(Default)]
struct Timings {
    plain: Vec<Duration>,
    plain_fsync: Vec<Duration>,
    local: Vec<Duration>,
    local_everywhere: Vec<Duration>,
    /// None: every replica already had it when the push returned.
    local_after_ack: Vec<Option<Duration>>,
    quorum: Vec<Duration>,
    quorum_everywhere: Vec<Duration>,
    quorum_after_ack: Vec<Option<Duration>>,
    etcd: Vec<Duration>,
    etcd_everywhere: Vec<Duration>,
    etcd_after_ack: Vec<Option<Duration>>,
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// Pushes HEAD (= `id`) to `reps[0]` while a watcher reads the other
/// replicas' ref files from before the push starts. Returns the push's
/// time, the time until every replica had the ref, and how long after the
/// push returned that was (None if they all had it by then).
fn replicated_push(
    work: &Work,
    reps: &[PathBuf],
    id: &str,
) -> (Duration, Duration, Option<Duration>) {
    let start = Instant::now();
    let watcher = watch(reps[1..].to_vec(), id.to_string(), start);
    let push = timed(|| work.push_ok(&reps[0], &["HEAD:refs/heads/main"]));
    let acked = start + push;
    let everywhere_at = watcher.join().expect("watcher thread");
    let everywhere = everywhere_at.max(acked) - start;
    let after = (everywhere_at > acked).then(|| everywhere_at - acked);
    (push, everywhere, after)
}

/// Spins on the loose ref files (nodes write loose refs) until every repo
/// has `id`; returns when. Sub-millisecond resolution, not a poll interval's.
fn watch(repos: Vec<PathBuf>, id: String, start: Instant) -> JoinHandle<Instant> {
    let ready = Arc::new(AtomicBool::new(false));
    let started = ready.clone();
    let handle = std::thread::spawn(move || {
        started.store(true, Ordering::SeqCst);
        let at = |r: &PathBuf| {
            std::fs::read_to_string(r.join("refs/heads/main")).is_ok_and(|s| s.trim() == id)
        };
        let done = harness::poll(Duration::from_micros(100), Duration::from_secs(30), || {
            repos.iter().all(at).then(Instant::now)
        });
        done.unwrap_or_else(|| panic!("replication did not finish in 30 s (started {start:?})"))
    });
    while !ready.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
    handle
}

fn cas_latency(backend: &str, cluster: &Cluster) {
    let rt = harness::runtime();
    let mut times = rt.block_on(async {
        let mut client = piehole_client::LocalClient::connect(&cluster.socket(1))
            .await
            .expect("connect");
        let mut times = Vec::with_capacity(CAS_SAMPLES);
        let mut current: Option<String> = None;
        for n in 1..=CAS_SAMPLES as u64 {
            let next = harness::oid(n);
            let t = Instant::now();
            let out = client
                .cas(
                    "cas-bench",
                    "refs/heads/main",
                    current.as_deref(),
                    Some(&next),
                )
                .await
                .expect("cas");
            times.push(t.elapsed());
            assert!(out.applied);
            current = Some(next);
        }
        times
    });
    report(
        &format!("one CAS through the local API (node 1, 3-node cluster, {backend})"),
        &mut times,
    );
}

/// The proc-receive hook as git runs it, for a ref already at the agreed
/// value (rule 1: one round trip, nothing moves), and process start alone.
fn hook_alone(repo: &Path) {
    let main = harness::git::rev_parse(repo, "refs/heads/main").expect("main exists");
    let mut input = Vec::new();
    pkt(&mut input, b"version=1\0");
    input.extend_from_slice(b"0000");
    pkt(
        &mut input,
        format!("{main} {main} refs/heads/main").as_bytes(),
    );
    input.extend_from_slice(b"0000");
    let mut times = Vec::new();
    for _ in 0..SAMPLES {
        let t = Instant::now();
        let mut child = Command::new(harness::piehole())
            .args(["hook", "proc-receive"])
            .current_dir(repo)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the hook");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&input)
            .expect("feed the hook");
        let out = child.wait_with_output().expect("the hook ends");
        times.push(t.elapsed());
        assert!(out.status.success(), "{}", harness::show(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("ok refs/heads/main"));
    }
    report(
        "`piehole hook proc-receive` alone, 1 ref (process start + 1 round trip)",
        &mut times,
    );
    let mut times = Vec::new();
    for _ in 0..SAMPLES {
        times.push(timed(|| {
            let out = Command::new(harness::piehole())
                .arg("--version")
                .output()
                .expect("run piehole");
            assert!(out.status.success());
        }));
    }
    report("`piehole --version` (process start only)", &mut times);
}

fn pkt(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(format!("{:04x}", payload.len() + 4).as_bytes());
    out.extend_from_slice(payload);
}

fn report(what: &str, times: &mut [Duration]) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!(
        "{what}: median {:.2} ms, p10 {:.2} ms, p90 {:.2} ms (n={})",
        ms(p(0.5)),
        ms(p(0.1)),
        ms(p(0.9)),
        times.len()
    );
}

/// How long after the push returned the other replicas had the ref; a push
/// they had already received by then counts as 0.
fn report_after_ack(level: &str, after: &mut [Option<Duration>]) {
    let already = after.iter().filter(|a| a.is_none()).count();
    let mut times: Vec<Duration> = after.iter().map(|a| a.unwrap_or_default()).collect();
    report(
        &format!(
            "{level}: push returned -> ref on both other replicas ({already} of {} already there)",
            after.len()
        ),
        &mut times,
    );
}
