use std::path::PathBuf;
use std::process::ExitCode;

use piehole_client::{resolve_socket, LocalClient};

use super::current_repo;

#[derive(clap::Args)]
pub struct Args {
    /// The local node's socket (else PIEHOLE_NODE, else piehole.node, else the default).
    #[arg(long)]
    node: Option<PathBuf>,
    /// Also remove the group's refs that this repository lacks.
    #[arg(long)]
    prune: bool,
}

/// The node reads the refs itself, from the replica it has registered at
/// this path: a repository that merely has the group's name cannot clobber.
pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let repo_path = current_repo()?;
    let socket = resolve_socket(a.node, Some(&repo_path));
    let mut client = LocalClient::connect(&socket).await?;
    let reply = client.clobber(&repo_path, a.prune).await?;
    println!(
        "piehole: group {} now follows {} ({} refs, {} removed)",
        reply.group,
        repo_path.display(),
        reply.refs,
        reply.removed
    );
    Ok(ExitCode::SUCCESS)
}
