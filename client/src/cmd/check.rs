use std::path::PathBuf;
use std::process::ExitCode;

use piehole_client::{resolve_socket, LocalClient};
use piehole_repo::hooks;
use piehole_repo::Replica;

use super::{current_repo, group_of, short};

#[derive(clap::Args)]
pub struct Args {
    /// The local node's socket (else PIEHOLE_NODE, else piehole.node, else the default).
    #[arg(long)]
    node: Option<PathBuf>,
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let repo_path = current_repo()?;
    let mut problems = hooks::local_problems(&repo_path)?;
    let group = group_of(&repo_path)?;
    let socket = resolve_socket(a.node, Some(&repo_path));
    match LocalClient::connect(&socket).await {
        Err(e) => problems.push(e.to_string()),
        Ok(mut client) => match client.read_group(&group, true).await {
            Err(e) => problems.push(format!("cannot read group {group}: {e}")),
            Ok(view) => {
                let status = client.status(false).await?;
                let me = status.node_id;
                for l in status
                    .lag
                    .iter()
                    .filter(|l| l.group == group && l.unfetchable)
                {
                    problems.push(format!(
                        "{}: no replica has it: the group's value {} is on no node that answers (a lost push?); `piehole clobber` in a replica with good refs is the way out",
                        l.ref_name,
                        short(&l.consensus)
                    ));
                }
                let registered = view
                    .replicas
                    .iter()
                    .any(|r| r.node_id == me && std::path::Path::new(&r.path) == repo_path);
                if !registered {
                    problems.push(format!(
                        "repository is not registered with node {me} as group {group} (run `piehole install`)"
                    ));
                }
                let consensus: std::collections::BTreeMap<_, _> = view
                    .refs
                    .into_iter()
                    .map(|r| (r.ref_name, r.value))
                    .collect();
                let local = Replica::open(&repo_path).and_then(|r| r.refs());
                match local {
                    Err(e) => problems.push(e.to_string()),
                    Ok(local) => {
                        let names: std::collections::BTreeSet<_> =
                            consensus.keys().chain(local.keys()).collect();
                        for name in names {
                            let (c, l) = (consensus.get(name), local.get(name));
                            if c != l {
                                problems.push(format!(
                                    "{name} differs from the consensus: consensus {} local {}",
                                    short(c.map(|s| s.as_str()).unwrap_or("")),
                                    short(l.map(|s| s.as_str()).unwrap_or(""))
                                ));
                            }
                        }
                    }
                }
            }
        },
    }
    if problems.is_empty() {
        println!("piehole: {} ok (group {group})", repo_path.display());
        Ok(ExitCode::SUCCESS)
    } else {
        for p in &problems {
            eprintln!("piehole: problem: {p}");
        }
        Ok(ExitCode::from(1))
    }
}
