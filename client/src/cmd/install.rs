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
    client.register(&group, &repo_path).await?;
    let seeded = seed_new_group(&mut client, &group, &repo_path).await?;

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

/// The first repository installed into a new group brings its refs with it.
/// CAS from "absent" never overwrites a value the group already has.
async fn seed_new_group(
    client: &mut LocalClient,
    group: &str,
    path: &std::path::Path,
) -> anyhow::Result<usize> {
    if !client.refs(group, true).await?.is_empty() {
        return Ok(0);
    }
    let local = Replica::open(path)?.refs()?;
    let mut seeded = 0;
    for (name, value) in &local {
        if validate::ref_name(name).is_err() {
            continue;
        }
        if client.cas(group, name, None, Some(value)).await?.applied {
            seeded += 1;
        }
    }
    Ok(seeded)
}
