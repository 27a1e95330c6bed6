use std::path::PathBuf;
use std::process::ExitCode;

use piehole_client::{resolve_socket, LocalClient};
use piehole_protocol::validate;
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    /// The node's socket (else PIEHOLE_NODE, else the default).
    #[arg(long, global = true)]
    node: Option<PathBuf>,
    #[command(subcommand)]
    op: Op,
}

#[derive(clap::Subcommand)]
enum Op {
    /// Print a group's consensus refs (linearizable unless --local).
    Get {
        group: String,
        /// Answer from this node's applied state without asking the cluster.
        #[arg(long)]
        local: bool,
        #[arg(long)]
        json: bool,
    },
    /// Compare-and-swap one consensus ref. OLD/NEW: 40-hex ids, all zeros for absent.
    Cas {
        group: String,
        ref_name: String,
        old: String,
        new: String,
    },
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let socket = resolve_socket(a.node, None);
    let mut client = LocalClient::connect(&socket).await?;
    match a.op {
        Op::Get { group, local, json } => {
            let refs = client.refs(&group, !local).await?;
            if json {
                println!("{}", json!(refs));
            } else {
                for (name, value) in refs {
                    println!("{value} {name}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Op::Cas {
            group,
            ref_name,
            old,
            new,
        } => {
            let old = validate::git_object_id(&old)?;
            let new = validate::git_object_id(&new)?;
            let out = client
                .cas(
                    &group,
                    &ref_name,
                    Some(&old).filter(|s| !s.is_empty()).map(|s| s.as_str()),
                    Some(&new).filter(|s| !s.is_empty()).map(|s| s.as_str()),
                )
                .await?;
            let current = out.current.unwrap_or_else(|| validate::ZERO_ID.to_string());
            if out.applied {
                println!("applied {current}");
                Ok(ExitCode::SUCCESS)
            } else {
                println!("conflict {current}");
                Ok(ExitCode::from(3))
            }
        }
    }
}
