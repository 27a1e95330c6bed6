//! The git hooks. Thin on purpose: read what git says, make one call to the
//! local node, report its answer. The node does all the git and consensus
//! work.
//!
//! - `proc-receive` (git 2.29+; `receive.procReceiveRefs = refs/`): every
//!   ref of a push in one process and one call; the node moves the refs.
//! - `update` (older git): one ref per process; git moves it after we accept.
//! - `post-update`: a nudge after git moved refs (update-hook path only).
//!
//! Every call to the node has a deadline: the node's request timeout (which
//! `install` records as piehole.requestTimeoutMs) plus a margin, so a frozen
//! or overloaded node fails the push with a clear message, never hangs it.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use piehole_client::{resolve_socket, ClientError, LocalClient, PushUpdate};
use piehole_protocol::pb;
use piehole_protocol::validate;

use super::{block_on, current_repo};
use crate::pkt_line;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    hook: Hook,
}

#[derive(clap::Subcommand)]
enum Hook {
    /// git's proc-receive hook: every ref of a push, as pkt-lines on stdin.
    ProcReceive,
    /// git's update hook: REF OLD NEW.
    Update {
        ref_name: String,
        old: String,
        new: String,
    },
    /// git's post-update hook: the refs that moved.
    PostUpdate { ref_names: Vec<String> },
}

/// post-update must never hold a push up for long.
const POST_UPDATE_BOUND: Duration = Duration::from_secs(2);
/// The node's default request timeout, when install recorded none.
const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 10_000;
/// Beyond the node's own bound: connecting, the local ref moves, git.
const MARGIN: Duration = Duration::from_secs(3);

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let repo = current_repo()?;
    let socket = resolve_socket(None, Some(&repo));
    let config = piehole_repo::config::read(&repo).unwrap_or_default();
    let deadline = Duration::from_millis(
        config
            .request_timeout_ms
            .unwrap_or(DEFAULT_REQUEST_TIMEOUT_MS),
    ) + MARGIN;
    let node = Node {
        repo: &repo,
        socket: &socket,
        deadline,
    };
    match a.hook {
        Hook::ProcReceive => proc_receive(&node),
        Hook::Update { ref_name, old, new } => update(&node, ref_name, &old, &new),
        Hook::PostUpdate { ref_names } => {
            let nudge = async {
                let mut client = LocalClient::connect(&socket).await?;
                client.hook_post_update(&repo, ref_names).await
            };
            let result = block_on(async { tokio::time::timeout(POST_UPDATE_BOUND, nudge).await });
            if let Ok(Err(e)) = result {
                // The periodic reconcile replicates anyway; say so and let the push succeed.
                eprintln!(
                    "piehole: could not nudge replication ({e}); it will catch up on its own"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

struct Node<'a> {
    repo: &'a Path,
    socket: &'a Path,
    deadline: Duration,
}

impl Node<'_> {
    /// One HookPush call, bounded; Err is one line that says what happened.
    fn push(
        &self,
        updates: Vec<PushUpdate>,
        atomic: bool,
        git_moves_refs: bool,
    ) -> Result<Vec<pb::RefVerdict>, String> {
        let call = async {
            let mut client = LocalClient::connect(self.socket).await?;
            client
                .hook_push(self.repo, updates, atomic, git_moves_refs)
                .await
        };
        match block_on(async { tokio::time::timeout(self.deadline, call).await }) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e @ ClientError::Unreachable { .. })) => {
                Err(format!("{e}; nothing was changed, try again later"))
            }
            // The connection broke after the request went out: the node died
            // (or restarted) while deciding, so the outcome is unknown.
            Ok(Err(e)) if e.is_unreachable() => Err(format!(
                "the local piehole node at {} went away during the push ({e}); \
                 the push may or may not have taken effect",
                self.socket.display()
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "the local piehole node at {} did not answer within {} s; \
                 if it is only slow, the push may still take effect",
                self.socket.display(),
                self.deadline.as_secs()
            )),
        }
    }
}

/// What the proc-receive hook answers for one command.
enum Answer {
    Ok,
    /// Not ours to decide: receive-pack updates the ref itself.
    FallThrough,
    Ng(String),
}

fn proc_receive(node: &Node) -> anyhow::Result<ExitCode> {
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let version = pkt_line::read_section(&mut stdin)?;
    let atomic = version.iter().any(|line| {
        line.split(|&b| b == 0)
            .nth(1)
            .is_some_and(|caps| caps.split(|&b| b == b' ').any(|c| c == b"atomic"))
    });
    pkt_line::write(&mut stdout, b"version=1\0")?;
    pkt_line::flush(&mut stdout)?;
    // Push options would follow only if our version line had asked for them.
    let commands = pkt_line::read_section(&mut stdin)?;

    let mut refs = Vec::with_capacity(commands.len());
    let mut answers = Vec::with_capacity(commands.len());
    let mut to_node = Vec::new();
    for line in &commands {
        let lossy = String::from_utf8_lossy(line);
        let mut parts = lossy.splitn(3, ' ');
        let (old, new, name) = match (parts.next(), parts.next(), parts.next()) {
            (Some(o), Some(n), Some(r)) => (o, n, r.to_string()),
            _ => anyhow::bail!("receive-pack sent a command piehole cannot read: {lossy:?}"),
        };
        let answer = if std::str::from_utf8(line).is_err() {
            // Not the name git sent: refuse it rather than decide another.
            Answer::Ng(format!("{name}: ref names must be UTF-8 here"))
        } else if !name.starts_with("refs/") || name.starts_with("refs/remotes/") {
            Answer::FallThrough
        } else if name.starts_with(validate::OWN_NAMESPACE) {
            Answer::Ng(format!("{name}: refs/piehole/ is piehole's own namespace"))
        } else {
            match (validate::git_object_id(old), validate::git_object_id(new)) {
                (Ok(old), Ok(new)) => {
                    to_node.push(PushUpdate {
                        ref_name: name.clone(),
                        old,
                        new,
                    });
                    Answer::Ok
                }
                (Err(e), _) | (_, Err(e)) => Answer::Ng(format!("{name}: {e}")),
            }
        };
        refs.push(name);
        answers.push(answer);
    }
    // git applies refs we let fall through in its own transaction, after
    // the consensus took the others: all or nothing could not hold.
    if atomic && !to_node.is_empty() && answers.iter().any(|a| matches!(a, Answer::FallThrough)) {
        for (name, answer) in refs.iter().zip(answers.iter_mut()) {
            *answer = Answer::Ng(format!(
                "{name}: an atomic push cannot mix refs piehole replicates with refs it does not (refs/remotes/, outside refs/)"
            ));
        }
        to_node.clear();
    }
    let refused_here = answers.iter().any(|a| matches!(a, Answer::Ng(_)));
    if !to_node.is_empty() {
        let names: Vec<String> = to_node.iter().map(|u| u.ref_name.clone()).collect();
        let verdicts = if atomic && refused_here {
            Err("not changed, because another ref of this atomic push was refused".to_string())
        } else {
            node.push(to_node, atomic, false)
        };
        apply_verdicts(&refs, &mut answers, &names, verdicts);
    }
    let mut ok = true;
    for (name, answer) in refs.iter().zip(&answers) {
        match answer {
            Answer::Ok => pkt_line::write(&mut stdout, format!("ok {name}").as_bytes())?,
            Answer::FallThrough => {
                pkt_line::write(&mut stdout, format!("ok {name}").as_bytes())?;
                pkt_line::write(&mut stdout, b"option fall-through")?;
            }
            Answer::Ng(message) => {
                ok = false;
                // Shown as "remote: ..." lines, and in brackets by the ref.
                eprintln!("{message}");
                let reason = message
                    .strip_prefix(name.as_str())
                    .and_then(|m| m.strip_prefix(": "))
                    .unwrap_or(message);
                let reason = reason.replace('\n', " ");
                pkt_line::write(&mut stdout, format!("ng {name} {reason}").as_bytes())?;
            }
        }
    }
    pkt_line::flush(&mut stdout)?;
    stdout.flush()?;
    // The exit status only matters to git for an atomic push; the verdicts
    // above are what it reports per ref.
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Puts the node's verdicts (or its failure, for every ref it was asked
/// about) into the answers.
fn apply_verdicts(
    refs: &[String],
    answers: &mut [Answer],
    asked: &[String],
    verdicts: Result<Vec<pb::RefVerdict>, String>,
) {
    for (name, answer) in refs.iter().zip(answers.iter_mut()) {
        if !asked.contains(name) {
            continue;
        }
        *answer = match &verdicts {
            Err(e) => Answer::Ng(format!("{name}: {e}")),
            Ok(vs) => match vs.iter().find(|v| &v.ref_name == name) {
                Some(v) if v.accepted => Answer::Ok,
                Some(v) => Answer::Ng(v.message.clone()),
                None => Answer::Ng(format!("{name}: the node gave no verdict")),
            },
        };
    }
}

fn update(node: &Node, ref_name: String, old: &str, new: &str) -> anyhow::Result<ExitCode> {
    let (old, new) = match (validate::git_object_id(old), validate::git_object_id(new)) {
        (Ok(o), Ok(n)) => (o, n),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("{ref_name}: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    if !validate::is_replicated(&ref_name) {
        if ref_name.starts_with(validate::OWN_NAMESPACE) {
            eprintln!("{ref_name}: refs/piehole/ is piehole's own namespace");
            return Ok(ExitCode::from(1));
        }
        // Not replicated: git decides alone.
        return Ok(ExitCode::SUCCESS);
    }
    let update = PushUpdate {
        ref_name: ref_name.clone(),
        old,
        new,
    };
    match node.push(vec![update], false, true) {
        Ok(v) if v.first().is_some_and(|v| v.accepted) => Ok(ExitCode::SUCCESS),
        Ok(v) => {
            let message = v.first().map(|v| v.message.clone()).unwrap_or_default();
            eprintln!("{message}");
            Ok(ExitCode::from(1))
        }
        Err(e) => {
            eprintln!("{ref_name}: {e}");
            Ok(ExitCode::from(1))
        }
    }
}
