use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Leave the cluster running and print the remote URLs.
    #[arg(long)]
    keep: bool,
}

pub fn run(_a: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("demo is not written yet")
}
