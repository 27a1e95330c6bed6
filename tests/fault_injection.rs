//! Jepsen-style fault injection: pushers push while a nemesis kills and
//! freezes nodes; afterwards a checker judges the whole history.
//!
//! The scenario, per seed, on a fresh three-node cluster (request timeout
//! 3 s, reconcile every second) with one replica per node:
//!
//! - four pushers (threads, each with its own work repository) loop until
//!   the deadline: pick a replica at random, fetch a branch from it, commit
//!   on top of that replica's tip and push to the same replica — never
//!   forced. Two branches are shared by every pusher (real contention);
//!   each pusher also has a branch of its own, so some pushes can succeed
//!   whatever the others do. Every push is recorded: branch, commit, and
//!   the outcome (acknowledged = git exited 0, else the kind of failure read
//!   from git's stderr).
//! - a nemesis thread, seeded, alternates a healthy pause with one fault:
//!   SIGKILL one or two nodes, SIGSTOP one or two, or kill one and stop
//!   another, for a random time; then restarts / continues them. The run
//!   always ends with a fault in effect, so the heal at the end has
//!   something to heal.
//! - a sampler reads every branch in every replica, each from a thread of
//!   its own, about every 0.6 ms (a read of the ref file, else of
//!   `packed-refs`; see `harness/sampler.rs`). The run line reports the
//!   mean and the longest gap between two samples.
//!
//! Then the pushers are joined, every node restarted or continued, and the
//! checks run, all of them, before the test fails naming each one broken:
//!
//! 1. no acknowledged push is lost: for every acknowledged push of commit X
//!    to branch B, the final consensus value of B is X or a descendant of X;
//! 2. no replica was ever seen moving a branch to a value that does not
//!    descend from the previous one, nor losing it (SPEC §3, monotonic
//!    replicas) — and every replica was sampled every 20 ms or faster on
//!    average;
//! 3. within 2 s of the moment the last node answers `status` again, every
//!    replica's refs equal the consensus (a linearizable read) and every
//!    node has applied that same consensus;
//! 4. `git fsck --full` is clean in every replica;
//! 5. the run was not vacuous: some pushes were acknowledged and some
//!    faults injected (how many pushes each kind of failure stopped is in
//!    the run line); and every push ended within a bound (none hung).
//!
//! Every run prints its seed first and one line at the end in a stable
//! format (`fault-injection: seed=...`). Environment:
//! `PIEHOLE_FAULT_SECONDS` (default 25: the faults' span, chosen so the
//! whole test stays under 60 s) and `PIEHOLE_FAULT_SEEDS` (comma-separated,
//! decimal or 0x-hex; default one seed from the clock). Several seeds run
//! one after another, each on a fresh cluster; a failed run keeps its node
//! logs and names the directory.

#[path = "harness/mod.rs"]
mod harness;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use harness::git::{self, Work};
use harness::nemesis::{Fault, Nemesis, Rng};
use harness::sampler::{History, RefSampler};
use harness::{poll, Backend, Cluster};

const GROUP: &str = "proj";
/// The branches every pusher pushes to.
const SHARED: [&str; 2] = ["main", "shared"];
const PUSHERS: usize = 4;
/// The faults' span when `PIEHOLE_FAULT_SECONDS` is not set: with cluster
/// start, the drain of the last pushes, the heal and the checks, the test
/// takes well under 60 s.
const DEFAULT_SECONDS: f64 = 25.0;
/// The bound on convergence after the heal.
const HEAL_BOUND: Duration = Duration::from_secs(2);
/// The sampling bound (what the sampler must at least achieve, on average).
const SAMPLE_EVERY: Duration = Duration::from_millis(20);
/// Far beyond any push's own bound (the hook gives up after the request
/// timeout, 3 s, plus a 3 s margin): a push still running then has hung.
const PUSH_BOUND: Duration = Duration::from_secs(30);
/// A fault lasts this long (killed: until the restart begins; frozen: until SIGCONT).
const FAULT_MIN: Duration = Duration::from_millis(200);
const KILL_MAX: Duration = Duration::from_millis(3000);
/// Longer than the request timeout and an election: pushes to a frozen
/// node then see "did not answer", and a frozen leader is replaced.
const PAUSE_MAX: Duration = Duration::from_millis(5000);
/// The healthy time between two faults.
const GAP_MIN: Duration = Duration::from_millis(300);
const GAP_MAX: Duration = Duration::from_millis(2000);

/// See the module documentation: the scenario once per seed.
fn pushers_under_kills_and_pauses_lose_no_ack_never_step_back_and_converge_after_heal(
    backend: Backend,
) {
    let span = fault_seconds();
    let seeds = fault_seeds();
    let mut failed = Vec::new();
    for &seed in &seeds {
        if let Err(why) = run(&backend, seed, span) {
            failed.push(format!("seed {seed}:\n{why}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} runs failed:\n{}",
        failed.len(),
        seeds.len(),
        failed.join("\n")
    );
}

fn fault_seconds() -> Duration {
    let secs = match std::env::var("PIEHOLE_FAULT_SECONDS") {
        Ok(s) => s
            .trim()
            .parse::<f64>()
            .unwrap_or_else(|e| panic!("PIEHOLE_FAULT_SECONDS={s:?}: {e}")),
        Err(_) => DEFAULT_SECONDS,
    };
    assert!(secs > 0.0, "PIEHOLE_FAULT_SECONDS must be positive");
    Duration::from_secs_f64(secs)
}

/// The seeds asked for, else one from the clock (printed by the run, so a
/// failure can be replayed).
fn fault_seeds() -> Vec<u64> {
    match std::env::var("PIEHOLE_FAULT_SEEDS") {
        Ok(s) if !s.trim().is_empty() => s.split(',').map(parse_seed).collect(),
        _ => {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("the clock is after 1970")
                .as_nanos() as u64;
            // Small and decimal: easy to read back from a log.
            vec![Rng::new(nanos).next_u64() % 1_000_000_000]
        }
    }
}

fn parse_seed(s: &str) -> u64 {
    let s = s.trim();
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.unwrap_or_else(|e| panic!("PIEHOLE_FAULT_SEEDS: {s:?} is not a seed: {e}"))
}

/// One push as a pusher saw it.
#[derive(Debug, Clone)]
struct Push {
    pusher: usize,
    replica: usize,
    branch: String,
    commit: String,
    /// None: acknowledged (git exited 0); else the kind of failure.
    failure: Option<&'static str>,
    /// git's stderr, kept for failures of an unexpected kind.
    stderr: String,
    took: Duration,
}

/// What a whole run produced, for the checks and the run line.
struct Outcome {
    pushes: Vec<Push>,
    /// Fetches that failed (the pusher then skipped its push), by replica.
    failed_fetches: Vec<(usize, String)>,
    faults: BTreeMap<String, usize>,
    /// The fault in effect at the deadline, which the final heal ended.
    last_fault: Option<Fault>,
}

/// The scenario for one seed; Err names every check that failed.
fn run(backend: &Backend, seed: u64, span: Duration) -> Result<(), String> {
    eprintln!(
        "fault-injection: seed {seed}, {span:?} of faults \
         (replay: PIEHOLE_FAULT_SEEDS={seed} PIEHOLE_FAULT_SECONDS={})",
        span.as_secs_f64()
    );
    let began = Instant::now();
    let mut rng = Rng::new(seed);
    let mut c = Cluster::start_on(
        backend,
        3,
        &[
            "--request-timeout-ms",
            "3000",
            "--reconcile-interval-ms",
            "1000",
        ],
    );
    let reps = git::replicas(&c, GROUP);
    let branches: Vec<String> = SHARED
        .iter()
        .map(|b| b.to_string())
        .chain((0..PUSHERS).map(own_branch))
        .collect();
    start_every_branch(&c, &reps, &branches);
    let works: Vec<Work> = (0..PUSHERS)
        .map(|i| Work::new(&c, &format!("pusher-{i}")))
        .collect();
    let checker = checker_repo(&c, &reps, &works);

    let samplers: Vec<RefSampler> = branches
        .iter()
        .map(|b| RefSampler::start(&reps, &format!("refs/heads/{b}")))
        .collect();
    let faults_began = Instant::now();
    let deadline = faults_began + span;
    let pusher_rngs: Vec<Rng> = (0..PUSHERS).map(|_| rng.fork()).collect();
    let nemesis_rng = rng.fork();
    let (outcome, mut nemesis) = std::thread::scope(|s| {
        let pushers: Vec<_> = works
            .into_iter()
            .zip(pusher_rngs)
            .enumerate()
            .map(|(i, (work, rng))| {
                let reps = &reps;
                s.spawn(move || pusher(i, work, reps, rng, deadline))
            })
            .collect();
        let cluster = &mut c;
        let nemesis = s.spawn(move || nemesis(cluster, nemesis_rng, deadline));
        let mut outcome = Outcome {
            pushes: Vec::new(),
            failed_fetches: Vec::new(),
            faults: BTreeMap::new(),
            last_fault: None,
        };
        for p in pushers {
            let (pushes, fetches) = p.join().expect("a pusher panicked");
            outcome.pushes.extend(pushes);
            outcome.failed_fetches.extend(fetches);
        }
        let (nemesis, faults, last) = nemesis.join().expect("the nemesis panicked");
        outcome.faults = faults;
        outcome.last_fault = Some(last);
        (outcome, nemesis)
    });
    let pushed_for = faults_began.elapsed();

    // The heal: every node continued or restarted; the clock of check 3
    // starts when the last of them answers `status`.
    nemesis.heal(&mut c);
    let ids = c.ids();
    harness::poll_until(
        "every node to answer status",
        Duration::from_secs(20),
        || {
            ids.iter()
                .all(|&id| c.try_status(id).is_some())
                .then_some(())
        },
    );
    let healed_at = Instant::now();
    let converged = |c: &Cluster| -> Option<BTreeMap<String, String>> {
        let agreed = c.try_refs(1, GROUP, false)?;
        for &id in &ids {
            if c.try_refs(id, GROUP, true)? != agreed {
                return None;
            }
        }
        reps.iter()
            .all(|r| git::replicated_refs(r) == agreed)
            .then_some(agreed)
    };
    let mut failures = Vec::new();
    // Watched beyond the bound, to report how late it is; what the replicas
    // and nodes held when the bound passed is kept for the message.
    let mut at_bound = None;
    let agreed = poll(Duration::from_millis(20), git::CONVERGE, || {
        let agreed = converged(&c);
        if agreed.is_none() && at_bound.is_none() && healed_at.elapsed() >= HEAL_BOUND {
            at_bound = Some(state(&c, &reps));
        }
        agreed
    });
    // When the check that found convergence returned: an upper bound.
    let converged_after = healed_at.elapsed();
    if agreed.is_none() || converged_after > HEAL_BOUND {
        failures.push(format!(
            "check 3: the replicas and nodes had not converged {HEAL_BOUND:?} after the heal; \
             {}; at {HEAL_BOUND:?}:\n{}",
            if agreed.is_some() {
                format!("they did after {converged_after:?}")
            } else {
                format!("not even after {converged_after:?}")
            },
            at_bound.unwrap_or_else(|| state(&c, &reps))
        ));
    }
    // Sampling ends after convergence: the moves of the heal are judged too.
    let histories: Vec<History> = samplers.into_iter().flat_map(|s| s.stop()).collect();

    check_acks(&outcome.pushes, agreed.as_ref(), &checker, &mut failures);
    check_monotonic(&histories, &checker, &mut failures);
    for r in &reps {
        let out = git::git(r, &["fsck", "--full", "--no-dangling"]);
        if !out.status.success() {
            failures.push(format!(
                "check 4: git fsck in {}: {}",
                r.display(),
                harness::show(&out)
            ));
        }
    }
    check_not_vacuous(&outcome, &mut failures);

    let line = run_line(
        seed,
        pushed_for,
        &outcome,
        &histories,
        converged_after,
        failures.is_empty(),
    );
    for (replica, err) in outcome.failed_fetches.iter().take(3) {
        eprintln!(
            "  a fetch from replica {} failed: {}",
            replica + 1,
            err.trim()
        );
    }
    for p in outcome
        .pushes
        .iter()
        .filter(|p| p.failure == Some("other"))
        .take(5)
    {
        eprintln!(
            "  push of {} to replica {} failed so: {}",
            p.branch,
            p.replica + 1,
            p.stderr.trim()
        );
    }
    if let Some(worst) = histories.iter().max_by_key(|h| h.max_gap) {
        eprintln!("  the least often sampled: {}", worst.summary());
    }
    eprintln!("{line} (whole run {:?})", began.elapsed());
    if failures.is_empty() {
        return Ok(());
    }
    let kept = keep_logs(&c, seed);
    harness::dump_logs();
    Err(format!(
        "{line}\nnode logs kept in {}\n{}",
        kept.display(),
        failures.join("\n")
    ))
}

fn own_branch(pusher: usize) -> String {
    format!("pusher-{pusher}")
}

/// One commit on every branch, pushed to replica 1 and replicated
/// everywhere, so every pusher finds every branch on every replica.
fn start_every_branch(c: &Cluster, reps: &[PathBuf], branches: &[String]) {
    let setup = Work::new(c, "setup");
    setup.commit("the start of every branch");
    let refspecs: Vec<String> = branches
        .iter()
        .map(|b| format!("HEAD:refs/heads/{b}"))
        .collect();
    let refspecs: Vec<&str> = refspecs.iter().map(String::as_str).collect();
    setup.push_ok(&reps[0], &refspecs);
    git::wait_all_refs(c, reps, &git::replicated_refs(&reps[0]));
}

/// A bare repository that sees every object of every replica and every
/// pusher through `objects/info/alternates`: every commit a sampler or a
/// pusher saw can be compared there.
fn checker_repo(c: &Cluster, reps: &[PathBuf], works: &[Work]) -> PathBuf {
    let checker = c.dir.path().join("checker.git");
    git::init_bare(&checker);
    let dirs: Vec<String> = reps
        .iter()
        .map(|r| r.join("objects"))
        .chain(works.iter().map(|w| w.path.join(".git").join("objects")))
        .map(|p| p.display().to_string())
        .collect();
    std::fs::write(
        checker.join("objects/info/alternates"),
        dirs.join("\n") + "\n",
    )
    .expect("write the checker's alternates");
    checker
}

/// One pusher until `deadline`: fetch a branch from a random replica,
/// commit on its tip, push it back there. Returns every push and every
/// failed fetch.
fn pusher(
    i: usize,
    work: Work,
    reps: &[PathBuf],
    mut rng: Rng,
    deadline: Instant,
) -> (Vec<Push>, Vec<(usize, String)>) {
    let own = own_branch(i);
    let err_path = work.path.join(".git").join("push.stderr");
    let (mut pushes, mut fetches) = (Vec::new(), Vec::new());
    let mut n = 0;
    while Instant::now() < deadline {
        n += 1;
        let replica = rng.below(reps.len() as u64) as usize;
        let rep = reps[replica].to_str().expect("UTF-8 path");
        let branch = if rng.chance(2, 3) {
            rng.pick(&SHARED).to_string()
        } else {
            own.clone()
        };
        let tracking = format!("refs/remotes/r/{branch}");
        let fetch = work.git(&[
            "fetch",
            "--quiet",
            "--no-tags",
            rep,
            &format!("+refs/heads/{branch}:{tracking}"),
        ]);
        if !fetch.status.success() {
            fetches.push((replica, harness::stderr(&fetch)));
            continue;
        }
        work.git_ok(&["checkout", "--quiet", "--force", "-B", &branch, &tracking]);
        let commit = work.commit_file(
            &format!("pusher-{i}.txt"),
            format!("pusher {i}, push {n}\n").as_bytes(),
            &format!("pusher {i}, push {n}, to replica {}", replica + 1),
        );
        let started = Instant::now();
        let (status, stderr) = git::push_bounded(
            &work,
            &err_path,
            &["push", rep, &format!("HEAD:refs/heads/{branch}")],
            PUSH_BOUND,
        );
        let failure = match status {
            Some(s) if s.success() => None,
            Some(_) => Some(git::failure_kind(&stderr)),
            None => Some("hung"),
        };
        pushes.push(Push {
            pusher: i,
            replica,
            branch,
            commit,
            failure,
            stderr,
            took: started.elapsed(),
        });
        // Pacing the workload (not a wait for any state): a random breath
        // between pushes varies how the pushers interleave.
        std::thread::sleep(rng.between(Duration::ZERO, Duration::from_millis(30)));
    }
    (pushes, fetches)
}

/// The nemesis until `deadline`: a healthy gap, then a random fault for a
/// random time, then its heal; the sleeps are the fault schedule, not waits
/// for a state. At the deadline the fault in effect is left in effect (one
/// is injected if none is), for the caller's heal. Returns the nemesis
/// (with what is still broken), the faults injected by kind, and the one
/// left in effect.
fn nemesis(
    c: &mut Cluster,
    mut rng: Rng,
    deadline: Instant,
) -> (Nemesis, BTreeMap<String, usize>, Fault) {
    let mut nemesis = Nemesis::new();
    let mut faults = BTreeMap::new();
    let ids = c.ids();
    loop {
        sleep_until_or(Instant::now() + rng.between(GAP_MIN, GAP_MAX), deadline);
        let fault = Fault::random(&mut rng, &ids);
        let max = if fault.pause.is_empty() {
            KILL_MAX
        } else {
            PAUSE_MAX
        };
        let lasts = rng.between(FAULT_MIN, max);
        nemesis.inject(c, &fault);
        *faults.entry(fault.kind()).or_insert(0) += 1;
        if Instant::now() >= deadline {
            return (nemesis, faults, fault);
        }
        sleep_until_or(Instant::now() + lasts, deadline);
        if Instant::now() >= deadline {
            return (nemesis, faults, fault);
        }
        nemesis.heal(c);
    }
}

/// Sleeps until `when` or `deadline`, whichever comes first.
fn sleep_until_or(when: Instant, deadline: Instant) {
    std::thread::sleep(when.min(deadline).saturating_duration_since(Instant::now()));
}

/// Check 1: every acknowledged commit is in the final consensus history of
/// its branch.
fn check_acks(
    pushes: &[Push],
    agreed: Option<&BTreeMap<String, String>>,
    checker: &Path,
    failures: &mut Vec<String>,
) {
    let Some(agreed) = agreed else {
        failures.push("check 1: no final consensus to check the acknowledged pushes on".into());
        return;
    };
    let mut history: BTreeMap<&str, HashSet<String>> = BTreeMap::new();
    let mut lost = Vec::new();
    for p in pushes.iter().filter(|p| p.failure.is_none()) {
        let name = format!("refs/heads/{}", p.branch);
        let Some(tip) = agreed.get(&name) else {
            lost.push(format!("{} ({name} is not in the consensus)", p.commit));
            continue;
        };
        let reachable = history.entry(p.branch.as_str()).or_insert_with(|| {
            git::git_ok(checker, &["rev-list", tip])
                .lines()
                .map(str::to_string)
                .collect()
        });
        if !reachable.contains(&p.commit) {
            lost.push(format!(
                "{} pushed by pusher {} to replica {} on {name}, which ended at {tip}",
                p.commit,
                p.pusher,
                p.replica + 1
            ));
        }
    }
    if !lost.is_empty() {
        failures.push(format!(
            "check 1: {} acknowledged pushes are lost:\n  {}",
            lost.len(),
            lost.join("\n  ")
        ));
    }
}

/// Check 2: no replica stepped back or lost a branch, and the sampling was
/// as fine as promised.
fn check_monotonic(histories: &[History], checker: &Path, failures: &mut Vec<String>) {
    let violations: Vec<String> = histories
        .iter()
        .flat_map(|h| h.violations(checker))
        .collect();
    if !violations.is_empty() {
        failures.push(format!(
            "check 2: a replica's branch stepped back:\n  {}",
            violations.join("\n  ")
        ));
    }
    for h in histories {
        let mean = (h.ended - h.started) / (h.samples.max(1) as u32);
        if mean > SAMPLE_EVERY {
            failures.push(format!(
                "check 2: sampled less often than every {SAMPLE_EVERY:?}: {}",
                h.summary()
            ));
        }
    }
}

/// Check 5: the run exercised something.
fn check_not_vacuous(outcome: &Outcome, failures: &mut Vec<String>) {
    let acked = outcome
        .pushes
        .iter()
        .filter(|p| p.failure.is_none())
        .count();
    let faults: usize = outcome.faults.values().sum();
    if acked == 0 || faults == 0 {
        failures.push(format!(
            "check 5: a vacuous run: {acked} pushes acknowledged, {faults} faults injected"
        ));
    }
    let hung: Vec<&Push> = outcome
        .pushes
        .iter()
        .filter(|p| p.failure == Some("hung"))
        .collect();
    if !hung.is_empty() {
        failures.push(format!(
            "check 5: {} pushes had not ended after {PUSH_BOUND:?}: {:?}",
            hung.len(),
            hung.iter()
                .map(|p| (p.replica + 1, &p.branch, p.stderr.trim()))
                .collect::<Vec<_>>()
        ));
    }
}

/// The run's one line, in a stable format (keys in a fixed order, counts
/// sorted by name), for a log to quote.
fn run_line(
    seed: u64,
    pushed_for: Duration,
    outcome: &Outcome,
    histories: &[History],
    converged_after: Duration,
    ok: bool,
) -> String {
    let acked = outcome
        .pushes
        .iter()
        .filter(|p| p.failure.is_none())
        .count();
    let mut failed: BTreeMap<&str, usize> = BTreeMap::new();
    for kind in outcome.pushes.iter().filter_map(|p| p.failure) {
        *failed.entry(kind).or_insert(0) += 1;
    }
    let show = |m: &mut dyn Iterator<Item = (String, usize)>| {
        m.map(|(k, v)| format!("{k}:{v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let samples: u64 = histories.iter().map(|h| h.samples).sum();
    let watched: Duration = histories.iter().map(|h| h.ended - h.started).sum();
    let mean_gap = watched / (samples.max(1) as u32);
    let max_gap = histories
        .iter()
        .map(|h| h.max_gap)
        .max()
        .unwrap_or_default();
    let changes: usize = histories.iter().map(|h| h.changes.len() - 1).sum();
    let slowest_push = outcome
        .pushes
        .iter()
        .map(|p| p.took)
        .max()
        .unwrap_or_default();
    format!(
        "fault-injection: seed={seed} secs={:.1} pushes={} acked={acked} failed={{{}}} \
         fetch-failed={} faults={{{}}} last-fault={} sampled={}x{}samples,mean-gap={:.2}ms,max-gap={}ms,changes={} \
         slowest-push={}ms converged-ms={} result={}",
        pushed_for.as_secs_f64(),
        outcome.pushes.len(),
        show(&mut failed.iter().map(|(k, v)| (k.to_string(), *v))),
        outcome.failed_fetches.len(),
        show(&mut outcome.faults.iter().map(|(k, v)| (k.clone(), *v))),
        outcome
            .last_fault
            .as_ref()
            .map(Fault::describe)
            .unwrap_or_default(),
        histories.len(),
        samples,
        mean_gap.as_secs_f64() * 1000.0,
        max_gap.as_millis(),
        changes,
        slowest_push.as_millis(),
        converged_after.as_millis(),
        if ok { "ok" } else { "FAILED" }
    )
}

/// Where the cluster stands, for a failure message: the consensus (a
/// linearizable read, else node 1's local one), then per replica the refs
/// that differ from it and any ref lock file left behind, and per node its
/// Raft view and whether its applied refs differ.
fn state(c: &Cluster, reps: &[PathBuf]) -> String {
    let linearizable = c.try_refs(1, GROUP, false);
    let mut s = format!(
        "the linearizable read through node 1 {}\n",
        if linearizable.is_some() {
            "answered"
        } else {
            "failed; comparing with node 1's local read"
        }
    );
    let agreed = linearizable
        .or_else(|| c.try_refs(1, GROUP, true))
        .unwrap_or_default();
    let differences = |refs: &BTreeMap<String, String>| -> String {
        let names: BTreeSet<&String> = refs.keys().chain(agreed.keys()).collect();
        let short = |v: Option<&String>| v.map_or("absent".to_string(), |v| v[..10].to_string());
        let diff: Vec<String> = names
            .into_iter()
            .filter(|n| refs.get(*n) != agreed.get(*n))
            .map(|n| {
                format!(
                    "{n} {} (consensus {})",
                    short(refs.get(n)),
                    short(agreed.get(n))
                )
            })
            .collect();
        if diff.is_empty() {
            "agrees".to_string()
        } else {
            diff.join(", ")
        }
    };
    for r in reps {
        s.push_str(&format!(
            "{}: {}\n",
            r.display(),
            differences(&git::replicated_refs(r))
        ));
        let mut locks = BTreeSet::new();
        lock_files(&r.join("refs"), &mut locks);
        if !locks.is_empty() {
            s.push_str(&format!("  lock files: {locks:?}\n"));
        }
    }
    for id in c.ids() {
        let raft = c.try_status(id).map_or("no status".to_string(), |st| {
            format!(
                "leader {} term {} commit {} applied {}",
                st["leader_id"], st["term"], st["commit_index"], st["applied_index"]
            )
        });
        let applied = git::consensus_local(c, id, GROUP)
            .map_or("no answer".to_string(), |refs| differences(&refs));
        s.push_str(&format!("node {id}: {raft}; applied refs: {applied}\n"));
    }
    s
}

fn lock_files(dir: &Path, found: &mut BTreeSet<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            lock_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "lock") {
            found.insert(path);
        }
    }
}

/// Copies the node logs of a failed run out of the cluster's temporary
/// directory (which is removed with the cluster), for a post-mortem.
fn keep_logs(c: &Cluster, seed: u64) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("piehole-fault-seed-{seed}"));
    std::fs::create_dir_all(&dir).expect("create the directory for kept logs");
    for n in &c.nodes {
        let log = n.log_path();
        if let Some(name) = log.file_name() {
            let _ = std::fs::copy(&log, dir.join(name));
        }
    }
    dir
}

on_both_backends!(
    pushers_under_kills_and_pauses_lose_no_ack_never_step_back_and_converge_after_heal
);

/// The same storm over mutual TLS on the peer port.
#[test]
fn over_tls_pushers_under_kills_and_pauses_lose_no_ack_never_step_back_and_converge_after_heal() {
    pushers_under_kills_and_pauses_lose_no_ack_never_step_back_and_converge_after_heal(
        Backend::raft_tls(),
    )
}
