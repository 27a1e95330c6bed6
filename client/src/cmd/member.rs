//! `piehole member list|add|remove`: the embedded Raft's members (SPEC §10,
//! README "Replacing a dead host").

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use piehole_client::{resolve_socket, LocalClient};
use piehole_protocol::pb;
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
    /// Voters, learners and removed members, with each one's progress.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Announce a new member (a new id) at its peer address. It joins as a
    /// learner when started with `--join`, and the leader makes it a voter
    /// once it has caught up.
    Add {
        /// ID=HOST:PORT
        member: String,
    },
    /// Remove a member, live or dead (the leader included). Its id is
    /// never used again.
    Remove { id: u64 },
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let socket = resolve_socket(a.node, None);
    let mut client = LocalClient::connect(&socket).await?;
    match a.op {
        Op::List { json } => {
            let s = client.status(true).await?;
            if s.backend != "raft" {
                return Err(anyhow!(
                    "this node runs in etcd mode: its nodes are whatever registers under the prefix (see `piehole status`)"
                ));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&to_json(&s))?);
            } else {
                print_text(&s);
            }
        }
        Op::Add { member } => {
            let (id, addr) = member
                .split_once('=')
                .ok_or_else(|| anyhow!("{member:?} is not ID=HOST:PORT"))?;
            let id: u64 = id
                .trim()
                .parse()
                .map_err(|_| anyhow!("member id {id:?} is not a positive integer"))?;
            client
                .change_member(pb::MemberChangeKind::AddLearner, id, addr.trim())
                .await?;
            println!(
                "piehole: node {id} added as a learner at {}; start it with an empty data dir and \
                 `--join` naming a member; the leader makes it a voter once it has caught up",
                addr.trim()
            );
        }
        Op::Remove { id } => {
            client
                .change_member(pb::MemberChangeKind::Remove, id, "")
                .await?;
            println!("piehole: node {id} removed from the cluster");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One member as `member list --json` and `status --json` show it.
pub fn member_json(m: &pb::Member) -> serde_json::Value {
    let progress = |v: u64| {
        if m.has_progress {
            json!(v)
        } else {
            serde_json::Value::Null
        }
    };
    json!({
        "id": m.id,
        "addr": m.addr,
        "role": m.role,
        "reachable": m.reachable,
        "matched": progress(m.matched),
        "lag": progress(m.lag),
    })
}

fn to_json(s: &pb::StatusReply) -> serde_json::Value {
    json!({
        "cluster_id": s.cluster_id,
        "leader_id": if s.leader_id == 0 { serde_json::Value::Null } else { json!(s.leader_id) },
        "members": s.members.iter().map(member_json).collect::<Vec<_>>(),
    })
}

fn print_text(s: &pb::StatusReply) {
    println!("cluster {}", s.cluster_id);
    for m in &s.members {
        let leader = if m.id == s.leader_id { ", leader" } else { "" };
        let health = match (m.role.as_str(), m.reachable) {
            ("removed", _) => "",
            (_, true) => ", reachable",
            (_, false) => ", UNREACHABLE",
        };
        let progress = if m.has_progress {
            format!(", matched {} (lag {})", m.matched, m.lag)
        } else {
            String::new()
        };
        println!("  {} {} {}{leader}{health}{progress}", m.id, m.addr, m.role);
    }
}
