use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use piehole_client::{resolve_socket, LocalClient};
use piehole_protocol::validate;
use piehole_repo::hooks::{self, HookKind, InstallOptions};
use piehole_repo::Replica;

use super::{current_repo, default_group};

#[derive(clap::Args)]
pub struct Args {
    /// The group this repository belongs to [default: directory name without .git].
    #[arg(long)]
    group: Option<String>,
    /// The local node's socket (else PIEHOLE_NODE, else the default).
    #[arg(long)]
    node: Option<PathBuf>,
    /// Overwrite hooks that are not piehole's, and join a group whose refs
    /// would replace some of this repository's own (kept under refs/piehole/kept/).
    #[arg(long)]
    force: bool,
    /// Which hooks: proc-receive (git 2.29+) or update [default: by `git --version`].
    #[arg(long, value_parser = parse_kind)]
    hook: Option<HookKind>,
}

fn parse_kind(s: &str) -> Result<HookKind, String> {
    match s {
        "proc-receive" => Ok(HookKind::ProcReceive),
        "update" => Ok(HookKind::Update),
        _ => Err(format!("{s:?} is not one of: proc-receive, update")),
    }
}

/// The hooks the git on this host can run.
fn detect_kind() -> anyhow::Result<HookKind> {
    let out = std::process::Command::new("git")
        .arg("--version")
        .output()
        .context("cannot run `git --version` to choose the hooks (use --hook)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .split_whitespace()
        .nth(2)
        .context("cannot read the output of `git --version` (use --hook)")?;
    Ok(HookKind::for_git_version(version))
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let repo_path = current_repo()?;
    // Refuse a non-bare or missing repository before anything else is worked out.
    Replica::open(&repo_path)?;
    let group = match a.group {
        Some(g) => g,
        None => default_group(&repo_path)?,
    };
    validate::group_name(&group)?;
    // Only an explicit choice is written into the repo's config; install does not inherit an old one.
    let socket = resolve_socket(a.node, None);
    let socket = std::path::absolute(&socket).unwrap_or(socket);
    let mut client = LocalClient::connect(&socket).await?;
    let status = client.status(false).await?;
    let kind = match a.hook {
        Some(k) => k,
        None => detect_kind()?,
    };
    let exe = std::env::current_exe().context("cannot find the piehole executable")?;
    let opts = InstallOptions {
        group: group.clone(),
        node_socket: socket.clone(),
        piehole_exe: exe,
        force: a.force,
        kind,
        request_timeout_ms: Some(status.request_timeout_ms).filter(|&t| t > 0),
    };
    // A refusal (refs the group would delete, no quorum) before any hook is
    // written: a repository with piehole's hooks but no registration would
    // refuse every push.
    client.register(&group, &repo_path, a.force, true).await?;
    let report = hooks::install(&repo_path, &opts)?;
    let reply = client.register(&group, &repo_path, a.force, false).await?;

    if report.already_installed {
        println!(
            "piehole: {} already installed as group {group}",
            repo_path.display()
        );
    } else {
        println!(
            "piehole: installed hooks ({}) in {} (group {group})",
            report.hooks_written.join(", "),
            repo_path.display()
        );
    }
    if reply.seeded > 0 {
        println!(
            "piehole: group {group} was empty; its consensus now starts from this repository's {} refs",
            reply.seeded
        );
    }
    for kept in &reply.saved {
        println!("piehole: kept this repository's own tip as {kept}");
    }
    Ok(ExitCode::SUCCESS)
}
