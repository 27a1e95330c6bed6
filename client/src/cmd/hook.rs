//! The git hooks. Thin on purpose: read the arguments, make one call to the
//! local node, print its answer. The node does all the git and consensus work.

use std::process::ExitCode;
use std::time::Duration;

use piehole_client::{resolve_socket, ClientError, LocalClient};
use piehole_protocol::validate;

use super::{block_on, current_repo};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    hook: Hook,
}

#[derive(clap::Subcommand)]
enum Hook {
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

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let repo = current_repo()?;
    let socket = resolve_socket(None, Some(&repo));
    match a.hook {
        Hook::Update { ref_name, old, new } => {
            let (old, new) = match (validate::git_object_id(&old), validate::git_object_id(&new)) {
                (Ok(o), Ok(n)) => (o, n),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("{ref_name}: {e}");
                    return Ok(ExitCode::from(1));
                }
            };
            let reply = block_on(async {
                let mut client = LocalClient::connect(&socket).await?;
                client.hook_update(&repo, &ref_name, &old, &new).await
            });
            match reply {
                Ok(r) if r.accepted => Ok(ExitCode::SUCCESS),
                Ok(r) => {
                    eprintln!("{}", r.message);
                    Ok(ExitCode::from(1))
                }
                Err(e @ ClientError::Unreachable { .. }) => {
                    eprintln!("{ref_name}: {e}; nothing was changed, try again later");
                    Ok(ExitCode::from(1))
                }
                Err(e) => {
                    eprintln!("{ref_name}: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
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
