//! Wall-clock figures for the push path, measured in one run on one machine:
//!
//! - one consensus CAS through the local API of a three-node loopback cluster;
//! - `piehole hook update` alone (process start + one round trip);
//! - `git push` of one small commit into a replica with the hooks installed,
//!   next to the same push into a bare repository without hooks;
//! - replication lag: push acknowledged -> ref visible on both other replicas.
//!
//! Run: `cargo bench -p piehole --bench push` (release profile). Results go to
//! stdout; BENCHMARKS.md records them with the machine they came from.

#[path = "../tests/harness/mod.rs"]
mod harness;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::git::{bare_repo, init_bare, install_ok, Work};
use harness::Cluster;

const SAMPLES: usize = 31;
const CAS_SAMPLES: usize = 500;

fn main() {
    let cluster = Cluster::start_with(3, &["--reconcile-interval-ms", "1000"]);
    cas_latency(&cluster);
    let replicas: Vec<_> = (1..=3).map(|id| bare_repo(&cluster, id, "bench")).collect();
    for (i, r) in replicas.iter().enumerate() {
        install_ok(&cluster, i as u64 + 1, r);
    }
    let plain = cluster.dir.path().join("plain.git");
    init_bare(&plain);
    // The same durability piehole's install asks of git, without the hooks.
    let plain_fsync = cluster.dir.path().join("plain-fsync.git");
    init_bare(&plain_fsync);
    harness::git::git_ok(&plain_fsync, &["config", "core.fsync", "committed"]);
    let work = Work::new(&cluster, "bench");
    work.commit("seed");
    work.push_ok(&replicas[0], &["HEAD:refs/heads/main"]);
    work.push_ok(&plain, &["HEAD:refs/heads/main"]);
    work.push_ok(&plain_fsync, &["HEAD:refs/heads/main"]);
    wait_for(&replicas, &work.head());

    hook_alone(&replicas[0]);

    let (mut cluster_push, mut plain_push, mut lag) = (vec![], vec![], vec![]);
    let mut fsync_push = vec![];
    let mut start_to_everywhere = vec![];
    for i in 0..SAMPLES {
        let id = work.commit(&format!("c{i}"));
        let t = Instant::now();
        work.push_ok(&replicas[0], &["HEAD:refs/heads/main"]);
        cluster_push.push(t.elapsed());
        wait_for(&replicas[1..], &id);
        let everywhere = t.elapsed();
        lag.push(everywhere.saturating_sub(cluster_push[i]));
        start_to_everywhere.push(everywhere);
        let t = Instant::now();
        work.push_ok(&plain, &["HEAD:refs/heads/main"]);
        plain_push.push(t.elapsed());
        let t = Instant::now();
        work.push_ok(&plain_fsync, &["HEAD:refs/heads/main"]);
        fsync_push.push(t.elapsed());
    }
    report(
        "git push, 1 small commit, plain bare repo (no hooks)",
        &mut plain_push,
    );
    report(
        "git push, 1 small commit, plain bare repo with core.fsync=committed",
        &mut fsync_push,
    );
    report(
        "git push, 1 small commit, into the 3-node cluster",
        &mut cluster_push,
    );
    report(
        "push started -> ref on all three replicas",
        &mut start_to_everywhere,
    );
    report(
        "replication lag (push returned -> ref on both other replicas)",
        &mut lag,
    );
}

fn cas_latency(cluster: &Cluster) {
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
        "one CAS through the local API (node 1, 3-node cluster)",
        &mut times,
    );
}

/// The hook as git runs it, for a ref already at the agreed value (rule 1).
fn hook_alone(repo: &Path) {
    let main = harness::git::rev_parse(repo, "refs/heads/main").expect("main exists");
    let mut times = Vec::new();
    for _ in 0..SAMPLES {
        let t = Instant::now();
        let out = Command::new(harness::piehole())
            .args(["hook", "update", "refs/heads/main", &main, &main])
            .current_dir(repo)
            .output()
            .expect("run the hook");
        times.push(t.elapsed());
        assert!(out.status.success(), "{}", harness::show(&out));
    }
    report(
        "`piehole hook update` alone (process start + 1 round trip)",
        &mut times,
    );
    let mut times = Vec::new();
    for _ in 0..SAMPLES {
        let t = Instant::now();
        let out = Command::new(harness::piehole())
            .args(["hook", "post-update", "refs/heads/main"])
            .current_dir(repo)
            .output()
            .expect("run the hook");
        times.push(t.elapsed());
        assert!(out.status.success(), "{}", harness::show(&out));
    }
    report("`piehole hook post-update` alone", &mut times);
    let mut times = Vec::new();
    for _ in 0..SAMPLES {
        let t = Instant::now();
        let out = Command::new(harness::piehole())
            .arg("--version")
            .output()
            .expect("run piehole");
        times.push(t.elapsed());
        assert!(out.status.success());
    }
    report("`piehole --version` (process start only)", &mut times);
}

/// Spins on the loose ref files (the replicator writes loose refs), so the
/// lag figure has sub-millisecond resolution rather than a poll interval's.
fn wait_for(repos: &[std::path::PathBuf], id: &str) {
    let at = |r: &std::path::PathBuf| {
        std::fs::read_to_string(r.join("refs/heads/main")).is_ok_and(|s| s.trim() == id)
    };
    let done = harness::poll(Duration::from_micros(200), Duration::from_secs(30), || {
        repos.iter().all(at).then_some(())
    });
    assert!(done.is_some(), "replication of {id} did not finish in 30 s");
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
