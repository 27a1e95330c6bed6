//! External programs some tests need beyond git. The README's test command
//! must pass on a fresh machine, so a missing one is installed here the
//! way the CI machine can (Debian's apt, as root), once per test process;
//! anywhere else the test fails saying what to install.

use std::process::{Command, Stdio};
use std::sync::Mutex;

/// Makes sure `program` (from the Debian package `package`) can be run.
pub fn require(program: &str, package: &str) {
    static INSTALLING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    if runs(program) {
        return;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if root && runs("apt-get") {
        // Another test process may be installing it too; apt's own lock
        // makes one of them wait, and the loser finds it installed.
        for _ in 0..3 {
            let _ = Command::new("apt-get")
                .args(["install", "-y", "-qq", package])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if runs(program) {
                return;
            }
            let _ = Command::new("apt-get")
                .args(["update", "-qq"])
                .stdout(Stdio::null())
                .status();
        }
    }
    panic!("this test needs `{program}`: install the Debian package {package} (apt-get install {package})");
}

fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}
