//! `piehole consensus export|import`: the whole consensus as one JSON
//! document, to move a deployment between the embedded Raft and etcd
//! (README: "Moving between Raft and etcd").

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use piehole_client::{resolve_socket, LocalClient};
use piehole_protocol::pb;
use serde::{Deserialize, Serialize};

/// Names the document, so that a file of anything else is refused.
const FORMAT: &str = "piehole-consensus/1";

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
    /// Print every group's consensus refs and replicas as JSON (linearizable).
    Export,
    /// Write an export into this node's consensus, which must be empty.
    Import {
        /// The file `export` wrote (- for standard input).
        file: PathBuf,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    format: String,
    groups: BTreeMap<String, Group>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Group {
    /// node id -> repository path on that node's host
    replicas: BTreeMap<u64, String>,
    /// ref name -> object id
    refs: BTreeMap<String, String>,
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let socket = resolve_socket(a.node, None);
    let mut client = LocalClient::connect(&socket).await?;
    match a.op {
        Op::Export => {
            let export = client.export_consensus().await?;
            let doc = Document {
                format: FORMAT.into(),
                groups: export
                    .groups
                    .into_iter()
                    .map(|g| {
                        let group = Group {
                            replicas: g
                                .replicas
                                .into_iter()
                                .map(|r| (r.node_id, r.path))
                                .collect(),
                            refs: g.refs.into_iter().map(|r| (r.ref_name, r.value)).collect(),
                        };
                        (g.name, group)
                    })
                    .collect(),
            };
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        Op::Import { file } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading standard input")?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?
            };
            let doc: Document = serde_json::from_str(&text).map_err(|e| {
                anyhow!("{} is not a piehole consensus export: {e}", file.display())
            })?;
            if doc.format != FORMAT {
                return Err(anyhow!(
                    "{} is format {:?}; this piehole reads {FORMAT:?}",
                    file.display(),
                    doc.format
                ));
            }
            let export = pb::ConsensusExport {
                groups: doc
                    .groups
                    .into_iter()
                    .map(|(name, g)| pb::GroupState {
                        name,
                        version: 0,
                        replicas: g
                            .replicas
                            .into_iter()
                            .map(|(node_id, path)| pb::Replica { node_id, path })
                            .collect(),
                        refs: g
                            .refs
                            .into_iter()
                            .map(|(ref_name, value)| pb::ConsensusRef {
                                ref_name,
                                value,
                                proposer: 0,
                            })
                            .collect(),
                    })
                    .collect(),
            };
            let reply = client.import_consensus(export).await?;
            println!(
                "piehole: imported {} groups, {} consensus refs",
                reply.groups, reply.refs
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
