//! `piehole demo`: a three-node cluster on loopback in a temporary
//! directory, driven with real `git push`es, so a newcomer sees the whole
//! system work — replication, a node killed, a push elsewhere, catch-up.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use piehole_client::LocalClient;

use super::block_on;

#[derive(clap::Args)]
pub struct Args {
    /// Leave the cluster running and print the remote URLs.
    #[arg(long)]
    keep: bool,
}

const NODES: u64 = 3;
const BOUND: Duration = Duration::from_secs(30);

struct Demo {
    root: PathBuf,
    exe: PathBuf,
    peers: String,
    /// Each node's `--tls-*` flags: the peer port runs mutual TLS, with a
    /// throw-away CA.
    tls: Vec<Vec<String>>,
    ports: Vec<u16>,
    children: Vec<Option<Child>>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let tmp = tempfile::Builder::new().prefix("piehole-demo-").tempdir()?;
    // Bound together so the three ports differ; released before the nodes bind.
    let listeners = (0..NODES)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()?;
    drop(listeners);
    let peers = (1..=NODES)
        .map(|i| format!("{i}=127.0.0.1:{}", ports[i as usize - 1]))
        .collect::<Vec<_>>()
        .join(",");
    let certs = tmp.path().join("certs");
    std::fs::create_dir_all(&certs)?;
    let authority = piehole_client::certs::Authority::new(&certs, "demo")?;
    let tls = (1..=NODES)
        .map(|id| authority.node(id).map(|c| c.args()))
        .collect::<anyhow::Result<_>>()?;
    let mut demo = Demo {
        root: tmp.path().to_path_buf(),
        exe: std::env::current_exe()?,
        peers,
        tls,
        ports,
        children: (0..NODES).map(|_| None).collect(),
    };
    println!("piehole demo in {}", demo.root.display());

    let t = Instant::now();
    for id in 1..=NODES {
        demo.start_node(id)?;
    }
    let leader = demo.wait_for("a leader to be elected", |d| d.leader(1))?;
    println!(
        "  3 nodes up, node {leader} leads, peers speak mutual TLS ({:.0} ms)",
        ms(t)
    );

    for id in 1..=NODES {
        let repo = demo.repo(id);
        git(
            &demo.root,
            &["init", "-q", "--bare", "-b", "main", path_str(&repo)?],
        )?;
        let out = Command::new(&demo.exe)
            .args(["install", "--node", path_str(&demo.socket(id))?])
            .current_dir(&repo)
            .output()?;
        if !out.status.success() {
            bail!(
                "install on node {id}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    println!(
        "  one bare repository per node, hooks installed: {}",
        demo.repo(1).display()
    );

    let work = demo.root.join("work");
    git(&demo.root, &["init", "-q", "-b", "main", path_str(&work)?])?;
    let first = demo.commit(&work, "first commit")?;
    let t = Instant::now();
    demo.push(&work, 1)?;
    let push_ms = ms(t);
    demo.wait_for("the push to reach every replica", |d| {
        d.everywhere(&first, &[1, 2, 3])
    })?;
    println!(
        "  pushed to replica 1 in {push_ms:.0} ms; on all three replicas after {:.0} ms",
        ms(t)
    );

    demo.kill(3);
    println!("  node 3 killed (SIGKILL)");
    let second = demo.commit(&work, "second commit")?;
    let t = Instant::now();
    demo.push(&work, 2)?;
    let push_ms = ms(t);
    demo.wait_for("the push to reach replica 1", |d| {
        d.everywhere(&second, &[1, 2])
    })?;
    println!("  pushed to replica 2 in {push_ms:.0} ms with node 3 down; replica 1 has it after {:.0} ms", ms(t));

    let t = Instant::now();
    demo.start_node(3)?;
    demo.wait_for("node 3 to catch up", |d| d.everywhere(&second, &[3]))?;
    println!("  node 3 restarted and caught up in {:.0} ms", ms(t));
    println!("demo ok: every replica is at {}", &second[..12]);

    if a.keep {
        let root = tmp.keep();
        println!(
            "\nthe cluster keeps running (Ctrl-C stops it; files stay in {}):",
            root.display()
        );
        for id in 1..=NODES {
            println!("  git remote add node{id} {}", demo.repo(id).display());
            println!("    piehole status --node {}", demo.socket(id).display());
        }
        block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
    }
    Ok(ExitCode::SUCCESS)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("temporary path is not UTF-8")
}

/// git with a fixed identity, so the demo works on a machine with no git config.
fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "piehole demo")
        .env("GIT_AUTHOR_EMAIL", "demo@piehole.invalid")
        .env("GIT_COMMITTER_NAME", "piehole demo")
        .env("GIT_COMMITTER_EMAIL", "demo@piehole.invalid")
        .stdin(Stdio::null())
        .output()
        .context("cannot run git (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Demo {
    fn data_dir(&self, id: u64) -> PathBuf {
        self.root.join(format!("node{id}"))
    }

    fn socket(&self, id: u64) -> PathBuf {
        self.data_dir(id).join("piehole.sock")
    }

    fn repo(&self, id: u64) -> PathBuf {
        self.root.join(format!("replica{id}")).join("demo.git")
    }

    fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.root.join(format!("node{id}.log")))?;
        let child = Command::new(&self.exe)
            .args(["node", "--id", &id.to_string()])
            .arg("--data-dir")
            .arg(self.data_dir(id))
            .args([
                "--listen",
                &format!("127.0.0.1:{}", self.ports[id as usize - 1]),
            ])
            .args(["--peers", &self.peers, "--reconcile-interval-ms", "1000"])
            .args(&self.tls[id as usize - 1])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.children[id as usize - 1] = Some(child);
        Ok(())
    }

    fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.children[id as usize - 1].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn leader(&self, id: u64) -> Option<u64> {
        block_on(async {
            let mut c = LocalClient::connect(&self.socket(id)).await.ok()?;
            let s = c.status(false).await.ok()?;
            (s.leader_id != 0).then_some(s.leader_id)
        })
    }

    fn everywhere(&self, commit: &str, replicas: &[u64]) -> Option<()> {
        replicas
            .iter()
            .all(|&id| {
                let repo = self.repo(id);
                git(&repo, &["rev-parse", "-q", "--verify", "refs/heads/main"])
                    .ok()
                    .as_deref()
                    == Some(commit)
            })
            .then_some(())
    }

    fn commit(&self, work: &Path, message: &str) -> anyhow::Result<String> {
        std::fs::write(work.join("README"), format!("{message}\n"))?;
        git(work, &["add", "README"])?;
        git(work, &["commit", "-q", "-m", message])?;
        git(work, &["rev-parse", "HEAD"])
    }

    fn push(&self, work: &Path, id: u64) -> anyhow::Result<()> {
        git(work, &["push", "-q", path_str(&self.repo(id))?, "main"]).map(|_| ())
    }

    fn wait_for<T>(&self, what: &str, mut f: impl FnMut(&Self) -> Option<T>) -> anyhow::Result<T> {
        let start = Instant::now();
        loop {
            if let Some(v) = f(self) {
                return Ok(v);
            }
            if start.elapsed() > BOUND {
                bail!(
                    "timed out waiting for {what} (node logs in {})",
                    self.root.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
