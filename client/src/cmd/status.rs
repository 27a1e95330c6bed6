use std::path::PathBuf;
use std::process::ExitCode;

use piehole_client::{resolve_socket, LocalClient};
use piehole_protocol::pb;
use serde_json::json;

use super::short;

#[derive(clap::Args)]
pub struct Args {
    /// The node's socket (else PIEHOLE_NODE, else the default).
    #[arg(long)]
    node: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let socket = resolve_socket(a.node, None);
    let mut client = LocalClient::connect(&socket).await?;
    let s = client.status(true).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&s))?);
    } else {
        print_text(&s);
    }
    Ok(ExitCode::SUCCESS)
}

fn to_json(s: &pb::StatusReply) -> serde_json::Value {
    json!({
        "node_id": s.node_id,
        "backend": s.backend,
        "store": s.store,
        "leader_id": if s.leader_id == 0 { serde_json::Value::Null } else { json!(s.leader_id) },
        "term": s.term,
        "commit_index": s.commit_index,
        "applied_index": s.applied_index,
        "first_log_index": s.first_log_index,
        "snapshot_index": s.snapshot_index,
        "snapshots_installed": s.snapshots_installed,
        "request_timeout_ms": s.request_timeout_ms,
        "lag_omitted": s.lag_omitted,
        "durability": s.durability,
        "groups": s.groups,
        "refs": s.refs,
        "cluster_id": if s.cluster_id.is_empty() { serde_json::Value::Null } else { json!(s.cluster_id) },
        "members": s.members.iter().map(super::member::member_json).collect::<Vec<_>>(),
        "replicas": s.lag.iter().map(|l| json!({
            "group": l.group,
            "node_id": l.node_id,
            "ref": l.ref_name,
            "consensus": l.consensus,
            "local": l.local,
            "differs_since_unix_ms": if l.differs_since_unix_ms == 0 { serde_json::Value::Null } else { json!(l.differs_since_unix_ms) },
            "unfetchable": l.unfetchable,
        })).collect::<Vec<_>>(),
    })
}

fn print_text(s: &pb::StatusReply) {
    let leader = if s.leader_id == 0 {
        "none".to_string()
    } else {
        s.leader_id.to_string()
    };
    if s.store.is_empty() {
        println!(
            "node {} ({}, durability {}): leader {leader}, term {}",
            s.node_id, s.backend, s.durability, s.term
        );
        println!(
            "log: commit {}, applied {}, first {}, snapshot {}",
            s.commit_index, s.applied_index, s.first_log_index, s.snapshot_index
        );
    } else {
        println!(
            "node {} ({}, durability {}): {}",
            s.node_id, s.backend, s.durability, s.store
        );
    }
    println!("{} groups, {} consensus refs", s.groups, s.refs);
    println!("members:");
    for m in &s.members {
        let health = if m.reachable {
            "reachable"
        } else {
            "UNREACHABLE"
        };
        let leader = if m.id == s.leader_id { " (leader)" } else { "" };
        let role = if m.role.is_empty() || m.role == "voter" {
            String::new()
        } else {
            format!(" {}", m.role)
        };
        let health = if m.role == "removed" { "" } else { health };
        let progress = if m.has_progress {
            format!(", matched {} (lag {})", m.matched, m.lag)
        } else {
            String::new()
        };
        println!("  {} {}{role} {health}{leader}{progress}", m.id, m.addr);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let behind: Vec<_> = s
        .lag
        .iter()
        .filter(|l| l.differs_since_unix_ms != 0)
        .collect();
    if behind.is_empty() && s.lag_omitted == 0 {
        println!("replicas: all in step with the consensus");
    } else {
        println!("replicas behind the consensus:");
        for l in behind {
            let secs = now.saturating_sub(l.differs_since_unix_ms) as f64 / 1000.0;
            let nobody = if l.unfetchable {
                " -- no replica has it; `piehole clobber` in a good replica"
            } else {
                ""
            };
            println!(
                "  {} node {} {}: consensus {} local {} (for {secs:.1}s){nobody}",
                l.group,
                l.node_id,
                l.ref_name,
                short(&l.consensus),
                short(&l.local)
            );
        }
    }
    if s.lag_omitted > 0 {
        println!("  ... and {} more refs not listed", s.lag_omitted);
    }
}
