use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use piehole_client::{resolve_socket, LocalClient};
use piehole_protocol::validate;
use piehole_repo::hooks::{self, InstallOptions};
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
    /// Overwrite existing update/post-update hooks that are not piehole's.
    #[arg(long)]
    force: bool,
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
    let exe = std::env::current_exe().context("cannot find the piehole executable")?;
    let opts = InstallOptions {
        group: group.clone(),
        node_socket: socket.clone(),
        piehole_exe: exe,
        force: a.force,
    };
    let report = hooks::install(&repo_path, &opts)?;

    let mut client = LocalClient::connect(&socket).await?;
    let seeded = client.register(&group, &repo_path).await?;

    if report.already_installed {
        println!(
            "piehole: {} already installed as group {group}",
            repo_path.display()
        );
    } else {
        println!(
            "piehole: installed hooks in {} (group {group})",
            repo_path.display()
        );
    }
    if seeded > 0 {
        println!("piehole: group {group} was empty; its consensus now starts from this repository's {seeded} refs");
    }
    Ok(ExitCode::SUCCESS)
}
