//! The command line (SPEC §6). One file per subcommand.

mod check;
mod clobber;
mod consensus;
mod demo;
mod hook;
mod install;
mod member;
mod node;
mod refs;
mod status;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "piehole",
    version,
    about = "Several Git repositories on different hosts that act as one"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (one per host): consensus member, peer API, local API, replicator.
    Node(Box<node::Args>),
    /// Install piehole's hooks into the bare repository in the current directory and register it.
    Install(install::Args),
    /// Check this bare repository's piehole setup; exit 0 only if all is well.
    Check(check::Args),
    /// Make this repository's refs the group's consensus (the operator's way out).
    Clobber(clobber::Args),
    /// Show the cluster and each replica's lag.
    Status(status::Args),
    /// Start a three-node cluster on loopback and show a push replicating.
    Demo(demo::Args),
    /// Called by git: `hook proc-receive`, `hook update REF OLD NEW`, `hook post-update REF...`.
    Hook(hook::Args),
    /// Read or compare-and-swap consensus refs directly (operators, tests).
    Ref(refs::Args),
    /// Export or import the whole consensus, to move between Raft and etcd.
    Consensus(consensus::Args),
    /// List, add or remove the embedded Raft's members (admins only).
    Member(member::Args),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Node(a) => node::run(*a),
        Command::Install(a) => block_on(install::run(a)),
        Command::Check(a) => block_on(check::run(a)),
        Command::Clobber(a) => block_on(clobber::run(a)),
        Command::Status(a) => block_on(status::run(a)),
        Command::Demo(a) => demo::run(a),
        Command::Hook(a) => hook::run(a),
        Command::Ref(a) => block_on(refs::run(a)),
        Command::Consensus(a) => block_on(consensus::run(a)),
        Command::Member(a) => block_on(member::run(a)),
    }
}

/// Short-lived commands need no thread pool.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime always builds")
        .block_on(f)
}

/// The bare repository a repo command runs in: `$GIT_DIR` if set, else the
/// current directory, made absolute and canonical.
fn current_repo() -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("GIT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    dir.canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))
}

/// The group name of a repository: `piehole.group`, else the directory name
/// without `.git`.
fn group_of(repo: &Path) -> anyhow::Result<String> {
    if let Some(g) = piehole_repo::config::read(repo)?.group {
        return Ok(g);
    }
    default_group(repo)
}

fn default_group(repo: &Path) -> anyhow::Result<String> {
    let name = repo
        .file_name()
        .and_then(|n| n.to_str())
        .context("the repository's directory name is not valid UTF-8")?;
    Ok(name.strip_suffix(".git").unwrap_or(name).to_string())
}

/// Consensus values are full hex ids; users read the short form. Cut by
/// characters, so that no value can make it panic.
fn short(id: &str) -> String {
    if id.is_empty() {
        "(absent)".to_string()
    } else {
        id.chars().take(12).collect()
    }
}
