//! `piehole`: one binary for the node, the operator's commands and the git
//! hooks. Each subcommand lives in its own file under `cmd/`. Errors reach
//! the user as one line on stderr and a non-zero exit, never a panic.

mod cmd;
mod pkt_line;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // A panic is a bug; still, the user sees one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        eprintln!("piehole: internal error: {msg} (please report this)");
    }));
    let cli = match cmd::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cmd::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("piehole: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

/// anyhow's chain joined on one line: "cannot listen on X: address in use".
fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}
