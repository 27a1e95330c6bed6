use std::path::PathBuf;
use std::process::ExitCode;

use piehole_client::{resolve_socket, LocalClient};
use piehole_protocol::validate;
use piehole_repo::Replica;

use super::{current_repo, group_of};

#[derive(clap::Args)]
pub struct Args {
    /// The local node's socket (else PIEHOLE_NODE, else piehole.node, else the default).
    #[arg(long)]
    node: Option<PathBuf>,
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let repo_path = current_repo()?;
    let group = group_of(&repo_path)?;
    let repo = Replica::open(&repo_path)?;
    let refs: std::collections::BTreeMap<String, String> = repo
        .refs()?
        .into_iter()
        .filter(|(name, _)| validate::ref_name(name).is_ok())
        .collect();
    for (name, id) in &refs {
        if !repo.is_complete(id)? {
            anyhow::bail!("{name} points at {id}, which is incomplete here; refusing to make it the consensus");
        }
    }
    let socket = resolve_socket(a.node, Some(&repo_path));
    let mut client = LocalClient::connect(&socket).await?;
    client.clobber(&group, &refs).await?;
    println!(
        "piehole: group {group} now follows {} ({} refs)",
        repo_path.display(),
        refs.len()
    );
    Ok(ExitCode::SUCCESS)
}
