//! Git helpers for the integration tests: bare replicas with piehole's hooks
//! installed, work repositories that commit and push with the real `git`
//! CLI, and checks that read refs and verify object databases.
//!
//! Every git (and piehole repo command) run here gets a hermetic
//! environment: a harmless empty HOME, no global or system config, fixed
//! author/committer identity and dates, and none of the GIT_* / PIEHOLE_*
//! variables a developer's shell (or an enclosing git hook) might have set.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{piehole, poll_until_showing, show, stderr, stdout, Cluster};

/// How long replication may take before a test gives up.
pub const CONVERGE: Duration = Duration::from_secs(30);

/// The variables that would make git or piehole look somewhere we did not ask.
const SCRUBBED: &[&str] = &[
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_QUARANTINE_PATH",
    "GIT_NAMESPACE",
    "GIT_CEILING_DIRECTORIES",
    "GIT_CONFIG",
    "GIT_CONFIG_PARAMETERS",
    "GIT_CONFIG_COUNT",
    "GIT_PROTOCOL",
    "GIT_TRACE",
    "GIT_EXEC_PATH",
    "GIT_TEMPLATE_DIR",
    "GIT_SSH",
    "GIT_SSH_COMMAND",
    "GIT_ASKPASS",
    "XDG_CONFIG_HOME",
    "PIEHOLE_NODE",
    "PIEHOLE_CLUSTER_SECRET",
];

/// An empty directory used as HOME, so no developer config leaks in.
fn harmless_home() -> &'static Path {
    static HOME: OnceLock<PathBuf> = OnceLock::new();
    HOME.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("piehole-tests-home-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a HOME for the tests");
        dir
    })
}

/// Applies the hermetic environment to any command (git or piehole).
pub fn hermetic(cmd: &mut Command) -> &mut Command {
    for v in SCRUBBED {
        cmd.env_remove(v);
    }
    cmd.env("HOME", harmless_home())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "Pie Tester")
        .env("GIT_AUTHOR_EMAIL", "tester@piehole.invalid")
        .env("GIT_AUTHOR_DATE", "1700000000 +0000")
        .env("GIT_COMMITTER_NAME", "Pie Tester")
        .env("GIT_COMMITTER_EMAIL", "tester@piehole.invalid")
        .env("GIT_COMMITTER_DATE", "1700000000 +0000")
        .env("LC_ALL", "C")
        .env("LANG", "C")
        .env_remove("LANGUAGE")
}

/// A `git` command in `dir` with the hermetic environment.
pub fn git_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("git");
    hermetic(&mut cmd);
    cmd.current_dir(dir)
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "advice.detachedHead=false",
        ])
        .args(args)
        .stdin(Stdio::null());
    cmd
}

/// Runs git in `dir`; the caller judges the outcome.
pub fn git(dir: &Path, args: &[&str]) -> Output {
    git_cmd(dir, args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run git {args:?}: {e}"))
}

/// Runs git in `dir`, panics with its stderr on failure, returns trimmed stdout.
pub fn git_ok(dir: &Path, args: &[&str]) -> String {
    let out = git(dir, args);
    assert_ok(&out, &format!("git {args:?} in {}", dir.display()));
    stdout(&out).trim().to_string()
}

#[track_caller]
pub fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} failed:\n{}", show(out));
}

#[track_caller]
pub fn assert_failed_with(out: &Output, what: &str, needle: &str) {
    assert!(
        !out.status.success(),
        "{what} should have failed:\n{}",
        show(out)
    );
    assert!(
        stderr(out).contains(needle),
        "{what}: stderr should contain {needle:?}:\n{}",
        show(out)
    );
}

/// A piehole command (not a node) run with cwd = `dir` in the hermetic environment.
pub fn piehole_in(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(piehole());
    hermetic(&mut cmd);
    cmd.current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run piehole {args:?}: {e}"))
}

// ---------------------------------------------------------------------------
// Bare replicas

/// Where node `id`'s replica of `group` lives: `DIR/node<id>/<group>.git`.
pub fn replica_path(cluster: &Cluster, id: u64, group: &str) -> PathBuf {
    cluster
        .dir
        .path()
        .join(format!("node{id}"))
        .join(format!("{group}.git"))
}

/// `git init --bare DIR/node<id>/<group>.git` (no hooks yet).
pub fn bare_repo(cluster: &Cluster, id: u64, group: &str) -> PathBuf {
    let path = replica_path(cluster, id, group);
    init_bare(&path);
    path
}

/// `git init --bare PATH`, creating parent directories.
pub fn init_bare(path: &Path) {
    std::fs::create_dir_all(path).expect("create the bare repository's directory");
    git_ok(path, &["init", "--bare", "--quiet", "."]);
}

/// `piehole install --node SOCK` with cwd = the bare repository.
pub fn install(cluster: &Cluster, id: u64, repo: &Path) -> Output {
    install_with(cluster, id, repo, &[])
}

/// `piehole install --node SOCK EXTRA...` with cwd = the bare repository.
pub fn install_with(cluster: &Cluster, id: u64, repo: &Path, extra: &[&str]) -> Output {
    let sock = cluster.socket(id);
    let mut args = vec![
        "install",
        "--node",
        sock.to_str().expect("socket path is UTF-8"),
    ];
    args.extend_from_slice(extra);
    piehole_in(repo, &args)
}

#[track_caller]
pub fn install_ok(cluster: &Cluster, id: u64, repo: &Path) {
    let out = install(cluster, id, repo);
    assert_ok(&out, &format!("piehole install in {}", repo.display()));
}

/// One bare replica of `group` per node, each with the hooks installed
/// (node 1 first, so a pre-filled replica 1 would seed the group).
/// Returned in node order: `replicas[i]` belongs to node `i + 1`.
pub fn replicas(cluster: &Cluster, group: &str) -> Vec<PathBuf> {
    (1..=cluster.nodes.len() as u64)
        .map(|id| {
            let repo = bare_repo(cluster, id, group);
            install_ok(cluster, id, &repo);
            repo
        })
        .collect()
}

/// `piehole check` in the repository (its piehole.node config names the socket).
pub fn check(repo: &Path) -> Output {
    piehole_in(repo, &["check"])
}

/// `piehole clobber` in the repository.
pub fn clobber(repo: &Path) -> Output {
    piehole_in(repo, &["clobber"])
}

// ---------------------------------------------------------------------------
// Reading refs

/// The object id `name` points at (not peeled: an annotated tag gives the tag
/// object), or None if the ref does not exist.
pub fn rev_parse(repo: &Path, name: &str) -> Option<String> {
    let out = git(repo, &["rev-parse", "--verify", "--quiet", name]);
    if out.status.success() {
        Some(stdout(&out).trim().to_string())
    } else {
        None
    }
}

/// Every ref under refs/ in the repository, name -> object id.
pub fn refs(repo: &Path) -> BTreeMap<String, String> {
    let out = git_ok(
        repo,
        &["for-each-ref", "--format=%(objectname) %(refname)", "refs/"],
    );
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(id, name)| (name.to_string(), id.to_string()))
        .collect()
}

/// The replicated refs (what piehole keeps in agreement): all but
/// refs/remotes/ and piehole's own refs/piehole/.
pub fn replicated_refs(repo: &Path) -> BTreeMap<String, String> {
    refs(repo)
        .into_iter()
        .filter(|(name, _)| {
            !name.starts_with("refs/remotes/") && !name.starts_with("refs/piehole/")
        })
        .collect()
}

/// The group's consensus refs as node `id` has applied them (`ref get --local --json`).
/// None when the node does not answer.
pub fn consensus_local(
    cluster: &Cluster,
    id: u64,
    group: &str,
) -> Option<BTreeMap<String, String>> {
    cluster.try_refs(id, group, true)
}

/// The group's consensus refs, linearizable read through node `id`.
pub fn consensus(cluster: &Cluster, id: u64, group: &str) -> BTreeMap<String, String> {
    cluster.refs(id, group, false)
}

// ---------------------------------------------------------------------------
// Waiting for replication

fn state_of(cluster: &Cluster, repos: &[PathBuf]) -> String {
    let mut s = String::new();
    for r in repos {
        s.push_str(&format!("{}: {:?}\n", r.display(), replicated_refs(r)));
    }
    for n in &cluster.nodes {
        if cluster.is_running(n.id) {
            let group_refs = repos
                .first()
                .and_then(|r| r.file_name())
                .and_then(|f| f.to_str())
                .map(|f| f.trim_end_matches(".git").to_string());
            if let Some(g) = group_refs {
                s.push_str(&format!(
                    "node {} consensus (local read): {:?}\n",
                    n.id,
                    consensus_local(cluster, n.id, &g)
                ));
            }
        } else {
            s.push_str(&format!("node {} is down\n", n.id));
        }
    }
    s
}

/// Waits (bounded by [`CONVERGE`]) until `name` has `value` (None = absent) in every repo.
pub fn wait_converged(cluster: &Cluster, repos: &[PathBuf], name: &str, value: Option<&str>) {
    poll_until_showing(
        &format!("{name} = {value:?} in every replica"),
        CONVERGE,
        || {
            repos
                .iter()
                .all(|r| rev_parse_ref(r, name).as_deref() == value)
                .then_some(())
        },
        || state_of(cluster, repos),
    )
}

/// Waits (bounded by [`CONVERGE`]) until every repo's replicated refs equal `expected` exactly.
pub fn wait_all_refs(cluster: &Cluster, repos: &[PathBuf], expected: &BTreeMap<String, String>) {
    poll_until_showing(
        &format!("every replica to hold exactly {expected:?}"),
        CONVERGE,
        || {
            repos
                .iter()
                .all(|r| &replicated_refs(r) == expected)
                .then_some(())
        },
        || state_of(cluster, repos),
    )
}

/// The value of a full ref name (like `refs/heads/main`), read without
/// rev-parse's guessing, so `refs/tags/x` never resolves a branch called x.
pub fn rev_parse_ref(repo: &Path, name: &str) -> Option<String> {
    let out = git(
        repo,
        &["for-each-ref", "--format=%(objectname) %(refname)", name],
    );
    stdout(&out)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(_, n)| *n == name)
        .map(|(id, _)| id.to_string())
}

// ---------------------------------------------------------------------------
// Verifying object databases

/// `git fsck --full` right in the repository; panics with its output on failure.
#[track_caller]
pub fn fsck(repo: &Path) {
    let out = git(repo, &["fsck", "--full", "--no-dangling"]);
    assert_ok(&out, &format!("git fsck --full in {}", repo.display()));
}

/// A fresh clone (all refs, objects sent as a pack, not hard-linked) passes
/// `git fsck --full`, and every ref of the source is in the clone.
#[track_caller]
pub fn fsck_clone(repo: &Path) {
    let tmp = tempfile::tempdir().expect("tempdir for a clone");
    let dest = tmp.path().join("clone.git");
    let out = git(
        tmp.path(),
        &[
            "clone",
            "--mirror",
            "--no-local",
            "--quiet",
            repo.to_str().expect("UTF-8 path"),
            dest.to_str().expect("UTF-8 path"),
        ],
    );
    assert_ok(&out, &format!("git clone of {}", repo.display()));
    fsck(&dest);
    let want = replicated_refs(repo);
    let got = replicated_refs(&dest);
    assert_eq!(got, want, "the clone of {} lacks refs", repo.display());
}

/// Every ref of the repository names an object that exists there.
#[track_caller]
pub fn assert_refs_resolve(repo: &Path) {
    for (name, id) in refs(repo) {
        let out = git(repo, &["cat-file", "-e", &id]);
        assert!(
            out.status.success(),
            "{name} in {} points at missing object {id}",
            repo.display()
        );
    }
}

// ---------------------------------------------------------------------------
// Work repositories (what a user pushes from)

/// A non-bare repository a "user" commits in and pushes from.
pub struct Work {
    pub path: PathBuf,
    counter: std::cell::Cell<u64>,
}

impl Work {
    /// `git init` a fresh work repository at `path` (branch main).
    pub fn init(path: &Path) -> Work {
        std::fs::create_dir_all(path).expect("create the work repository");
        git_ok(path, &["init", "--quiet", "."]);
        Work {
            path: path.to_path_buf(),
            counter: 0.into(),
        }
    }

    /// A fresh work repository under the cluster's directory.
    pub fn new(cluster: &Cluster, name: &str) -> Work {
        Work::init(&cluster.dir.path().join(format!("work-{name}")))
    }

    /// `git clone` of `from` into the cluster's directory.
    pub fn clone_from(cluster: &Cluster, name: &str, from: &Path) -> Work {
        let path = cluster.dir.path().join(format!("work-{name}"));
        git_ok(
            cluster.dir.path(),
            &[
                "clone",
                "--quiet",
                from.to_str().expect("UTF-8 path"),
                path.to_str().expect("UTF-8 path"),
            ],
        );
        Work {
            path,
            counter: 0.into(),
        }
    }

    pub fn git(&self, args: &[&str]) -> Output {
        git(&self.path, args)
    }

    pub fn git_ok(&self, args: &[&str]) -> String {
        git_ok(&self.path, args)
    }

    /// Writes `content` to `file` and commits it; returns the new commit id.
    pub fn commit_file(&self, file: &str, content: &[u8], msg: &str) -> String {
        let p = self.path.join(file);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("create directories in the work tree");
        }
        std::fs::write(&p, content).expect("write a file in the work tree");
        self.git_ok(&["add", "--", file]);
        self.git_ok(&["commit", "--quiet", "--allow-empty", "-m", msg]);
        self.head()
    }

    /// A commit that changes a file with a unique content; returns its id.
    pub fn commit(&self, msg: &str) -> String {
        let n = self.counter.get() + 1;
        self.counter.set(n);
        self.commit_file(
            &format!("file-{}.txt", sanitize(msg)),
            format!("{msg}\n{n}\n").as_bytes(),
            msg,
        )
    }

    /// The id HEAD points at.
    pub fn head(&self) -> String {
        self.git_ok(&["rev-parse", "HEAD"])
    }

    pub fn rev(&self, what: &str) -> String {
        self.git_ok(&["rev-parse", what])
    }

    /// `git push <remote> <refspecs>`; returns the output (stderr carries the
    /// hook's "remote: " lines).
    pub fn push(&self, remote: &Path, refspecs: &[&str]) -> Output {
        let mut args = vec!["push", remote.to_str().expect("UTF-8 path")];
        args.extend_from_slice(refspecs);
        self.git(&args)
    }

    /// `git push`, panicking with the output unless it succeeds.
    #[track_caller]
    pub fn push_ok(&self, remote: &Path, refspecs: &[&str]) {
        let out = self.push(remote, refspecs);
        assert_ok(&out, &format!("git push {} {refspecs:?}", remote.display()));
    }

    /// `git push <remote> main` to a replica whose node has no majority:
    /// refused with "no quorum" for refs/heads/main within `bound` (the
    /// nodes' request timeout plus a margin).
    #[track_caller]
    pub fn push_main_says_no_quorum(&self, remote: &Path, bound: Duration) {
        let started = Instant::now();
        let out = self.push(remote, &["main"]);
        let took = started.elapsed();
        assert_failed_with(
            &out,
            &format!("git push {} main", remote.display()),
            "remote: refs/heads/main: no quorum",
        );
        assert!(
            took < bound,
            "\"no quorum\" must come within {bound:?}; took {took:?}"
        );
    }

    /// `git fetch <remote>` of every branch and tag into refs/remotes/r/* and refs/tags/*.
    pub fn fetch(&self, remote: &Path) -> Output {
        self.git(&[
            "fetch",
            "--quiet",
            "--force",
            remote.to_str().expect("UTF-8 path"),
            "+refs/heads/*:refs/remotes/r/*",
            "+refs/tags/*:refs/tags/*",
        ])
    }

    /// `git pull --ff-only <remote> <branch>` (fast-forward onto what the replica has).
    pub fn pull(&self, remote: &Path, branch: &str) -> Output {
        self.git(&[
            "pull",
            "--quiet",
            "--ff-only",
            remote.to_str().expect("UTF-8 path"),
            branch,
        ])
    }

    /// Feeds a `git fast-import` stream on stdin; panics on failure.
    pub fn fast_import(&self, stream: &[u8]) {
        let mut child = git_cmd(&self.path, &["fast-import", "--quiet", "--done"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn git fast-import");
        {
            let mut stdin = child.stdin.take().expect("fast-import stdin");
            stdin.write_all(stream).expect("write to git fast-import");
        }
        let out = child.wait_with_output().expect("wait for git fast-import");
        assert_ok(&out, "git fast-import");
    }

    /// Appends `n` commits to `branch` (each changing one small file) via
    /// `git fast-import`; returns the tip. Fast: 1,000 commits take well under a second.
    pub fn fast_import_commits(&self, branch: &str, n: usize) -> String {
        let parent = rev_parse(&self.path, &format!("refs/heads/{branch}"));
        let mut s = Vec::new();
        for i in 0..n {
            let msg = format!("generated commit {i}\n");
            let content = format!("line {i}\n");
            write!(
                s,
                "commit refs/heads/{branch}\nmark :{m}\ncommitter Pie Tester <tester@piehole.invalid> {t} +0000\ndata {ml}\n{msg}",
                m = i + 1,
                t = 1_700_000_000 + i,
                ml = msg.len()
            )
            .unwrap();
            if i == 0 {
                if let Some(p) = &parent {
                    writeln!(s, "from {p}").unwrap();
                }
            } else {
                writeln!(s, "from :{}", i).unwrap();
            }
            write!(
                s,
                "M 100644 inline generated/file-{}.txt\ndata {}\n{content}\n",
                i % 50,
                content.len()
            )
            .unwrap();
        }
        s.extend_from_slice(b"done\n");
        self.fast_import(&s);
        // fast-import does not touch the work tree or index; keep them in step.
        if self.git_ok(&["symbolic-ref", "--short", "HEAD"]) == branch {
            self.git_ok(&["reset", "--quiet", "--hard", branch]);
        }
        self.rev(&format!("refs/heads/{branch}"))
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// `len` pseudo-random bytes from a seeded xorshift64* generator (incompressible,
/// reproducible).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    // Spread the seed first: `seed | 1` alone would make seeds 2k and 2k+1
    // give the same bytes.
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The kind of a failed push, from what git and the hook wrote: the
/// README's "What a pusher sees". "other" for anything it does not list.
pub fn failure_kind(stderr: &str) -> &'static str {
    let kinds: [(&str, &'static str); 11] = [
        ("catching up", "catching-up"),
        ("lost its majority", "lost-quorum"),
        ("no quorum", "no-quorum"),
        ("did not answer", "no-answer"),
        ("timed out", "timed-out"),
        ("unreachable", "unreachable"),
        // The node went away in the middle of the hook's call (killed).
        ("went away during the push", "node-went-away"),
        ("shutting down", "shutting-down"),
        // etcd refused or could not be reached (compatibility mode).
        ("etcd at ", "etcd"),
        ("fetch first", "stale"),
        ("non-fast-forward", "stale"),
    ];
    kinds
        .iter()
        .find(|(needle, _)| stderr.contains(needle))
        .map(|&(_, kind)| kind)
        .unwrap_or("other")
}

/// Runs git in the work repository with stderr to a file (a hook that
/// hangs would hold a pipe open), waiting at most `bound`; returns its
/// status (None if it had to be killed) and stderr.
pub fn push_bounded(
    work: &Work,
    err_path: &Path,
    args: &[&str],
    bound: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    let err_file = std::fs::File::create(err_path).expect("create the push's stderr file");
    let mut child = git_cmd(&work.path, args)
        .stdout(Stdio::null())
        .stderr(err_file)
        .spawn()
        .expect("spawn git push");
    // Waiting for a process to end, bounded; 10 ms adds little to a push.
    let status = super::poll(Duration::from_millis(10), bound, || {
        child.try_wait().expect("try_wait on git push")
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    (
        status,
        std::fs::read_to_string(err_path).unwrap_or_default(),
    )
}
