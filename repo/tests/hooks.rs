//! Installing and checking hooks, and reading piehole's config keys.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{commit, git, git_output, init_bare, init_work};
use piehole_repo::hooks::{self, HookKind, InstallOptions, InstallReport, MARKER};
use piehole_repo::{config, RepoError};

fn options(root: &Path) -> InstallOptions {
    InstallOptions {
        group: "widgets".to_string(),
        node_socket: root.join("node/piehole.sock"),
        piehole_exe: PathBuf::from("/usr/local/bin/piehole"),
        force: false,
        kind: HookKind::ProcReceive,
        request_timeout_ms: Some(7000),
    }
}

/// The same, for git older than 2.29.
fn legacy_options(root: &Path) -> InstallOptions {
    InstallOptions {
        kind: HookKind::Update,
        ..options(root)
    }
}

fn config_all(repo: &Path, key: &str) -> Vec<String> {
    let out = git_output(repo, &["config", "--get-all", key]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn install_writes_executable_hooks_and_config() {
    let root = tempfile::tempdir().unwrap();
    let bare = init_bare(root.path(), "widgets.git");
    let opts = options(root.path());

    let report = hooks::install(&bare, &opts).unwrap();
    assert_eq!(
        report,
        InstallReport {
            hooks_written: vec!["proc-receive".to_string()],
            hooks_removed: vec![],
            already_installed: false,
        }
    );
    let path = bare.join("hooks/proc-receive");
    assert_eq!(mode(&path), 0o755);
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        format!(
            "#!/bin/sh\n{MARKER} (written by `piehole install`; `piehole install --force` rewrites it)\n\
             exec '/usr/local/bin/piehole' hook proc-receive \"$@\"\n"
        )
    );
    assert!(!bare.join("hooks/update").exists());
    assert_eq!(git(&bare, &["config", "core.logAllRefUpdates"]), "always");
    assert_eq!(git(&bare, &["config", "core.fsync"]), "committed");
    assert_eq!(config_all(&bare, "receive.procReceiveRefs"), vec!["refs/"]);
    assert_eq!(config_all(&bare, "receive.hideRefs"), vec!["refs/piehole/"]);
    assert_eq!(git(&bare, &["config", "piehole.requestTimeoutMs"]), "7000");
    assert_eq!(git(&bare, &["config", "piehole.group"]), "widgets");
    assert_eq!(
        git(&bare, &["config", "piehole.node"]),
        opts.node_socket.to_str().unwrap()
    );
    // Nothing left over from the atomic writes.
    let stray: Vec<_> = fs::read_dir(bare.join("hooks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    assert!(hooks::local_problems(&bare).unwrap().is_empty());
}

#[test]
fn install_is_idempotent_and_notices_changed_options() {
    let root = tempfile::tempdir().unwrap();
    let bare = init_bare(root.path(), "widgets.git");
    let opts = options(root.path());
    hooks::install(&bare, &opts).unwrap();
    let update = bare.join("hooks/proc-receive");
    let config_before = fs::read(bare.join("config")).unwrap();
    let modified_before = fs::metadata(&update).unwrap().modified().unwrap();

    let again = hooks::install(&bare, &opts).unwrap();
    assert_eq!(
        again,
        InstallReport {
            hooks_written: vec![],
            hooks_removed: vec![],
            already_installed: true
        }
    );
    assert_eq!(fs::read(bare.join("config")).unwrap(), config_before);
    assert_eq!(
        fs::metadata(&update).unwrap().modified().unwrap(),
        modified_before
    );

    // A different group rewrites the config but not the hooks.
    let regrouped = InstallOptions {
        group: "gadgets".to_string(),
        ..opts.clone()
    };
    let report = hooks::install(&bare, &regrouped).unwrap();
    assert!(report.hooks_written.is_empty());
    assert!(!report.already_installed);
    assert_eq!(git(&bare, &["config", "piehole.group"]), "gadgets");

    // A hook that lost its execute bit is rewritten.
    fs::set_permissions(&update, fs::Permissions::from_mode(0o644)).unwrap();
    let report = hooks::install(&bare, &regrouped).unwrap();
    assert_eq!(report.hooks_written, vec!["proc-receive".to_string()]);
    assert_eq!(mode(&update), 0o755);
}

#[test]
fn switching_hook_kinds_removes_pieholes_own_other_hooks() {
    let root = tempfile::tempdir().unwrap();
    let bare = init_bare(root.path(), "widgets.git");
    hooks::install(&bare, &legacy_options(root.path())).unwrap();
    assert!(bare.join("hooks/update").exists());
    assert!(config_all(&bare, "receive.procReceiveRefs").is_empty());
    assert!(hooks::local_problems(&bare).unwrap().is_empty());

    let report = hooks::install(&bare, &options(root.path())).unwrap();
    assert_eq!(report.hooks_written, vec!["proc-receive".to_string()]);
    assert_eq!(
        report.hooks_removed,
        vec!["update".to_string(), "post-update".to_string()]
    );
    assert_eq!(config_all(&bare, "receive.procReceiveRefs"), vec!["refs/"]);
    assert!(hooks::local_problems(&bare).unwrap().is_empty());

    let report = hooks::install(&bare, &legacy_options(root.path())).unwrap();
    assert_eq!(report.hooks_removed, vec!["proc-receive".to_string()]);
    assert!(config_all(&bare, "receive.procReceiveRefs").is_empty());
    assert!(hooks::local_problems(&bare).unwrap().is_empty());
}

#[test]
fn the_hook_kind_follows_the_git_version() {
    assert_eq!(HookKind::for_git_version("2.47.3"), HookKind::ProcReceive);
    assert_eq!(HookKind::for_git_version("2.29.0"), HookKind::ProcReceive);
    assert_eq!(HookKind::for_git_version("3.0"), HookKind::ProcReceive);
    assert_eq!(HookKind::for_git_version("2.28.1"), HookKind::Update);
    assert_eq!(HookKind::for_git_version("1.9.5"), HookKind::Update);
}

#[test]
fn install_refuses_a_foreign_update_hook_that_proc_receive_would_silence() {
    let root = tempfile::tempdir().unwrap();
    let bare = init_bare(root.path(), "widgets.git");
    let foreign = "#!/bin/sh\necho mine\n";
    let update = bare.join("hooks/update");
    fs::write(&update, foreign).unwrap();
    match hooks::install(&bare, &options(root.path())) {
        Err(RepoError::SilencedHook(name)) => assert_eq!(name, "update"),
        other => panic!("expected SilencedHook, got {other:?}"),
    }
    assert!(!bare.join("hooks/proc-receive").exists());
    assert!(config_all(&bare, "receive.procReceiveRefs").is_empty());
    // Forced: installed, and the foreign hook is left where it was.
    let forced = InstallOptions {
        force: true,
        ..options(root.path())
    };
    hooks::install(&bare, &forced).unwrap();
    assert_eq!(fs::read_to_string(&update).unwrap(), foreign);
    // A foreign post-update keeps running under proc-receive: no refusal.
    let other = init_bare(root.path(), "other.git");
    fs::write(other.join("hooks/post-update"), foreign).unwrap();
    hooks::install(&other, &options(root.path())).unwrap();
}

#[test]
fn install_refuses_a_foreign_hook_unless_forced() {
    let root = tempfile::tempdir().unwrap();
    let bare = init_bare(root.path(), "widgets.git");
    let foreign = "#!/bin/sh\necho mine\n";
    let post_update = bare.join("hooks/post-update");
    fs::write(&post_update, foreign).unwrap();

    match hooks::install(&bare, &legacy_options(root.path())) {
        Err(RepoError::ForeignHook(name)) => assert_eq!(name, "post-update"),
        other => panic!("expected ForeignHook, got {other:?}"),
    }
    // Refused before anything was written.
    assert_eq!(fs::read_to_string(&post_update).unwrap(), foreign);
    assert!(!bare.join("hooks/update").exists());
    assert!(git_output(&bare, &["config", "piehole.group"])
        .stdout
        .is_empty());

    let forced = InstallOptions {
        force: true,
        ..legacy_options(root.path())
    };
    let report = hooks::install(&bare, &forced).unwrap();
    assert_eq!(report.hooks_written.len(), 2);
    assert!(fs::read_to_string(&post_update).unwrap().contains(MARKER));
    assert!(hooks::local_problems(&bare).unwrap().is_empty());
}

#[test]
fn install_refuses_non_bare_and_missing_repositories() {
    let root = tempfile::tempdir().unwrap();
    let work = init_work(root.path(), "w");
    assert!(matches!(
        hooks::install(&work, &options(root.path())),
        Err(RepoError::NotBare(_))
    ));
    assert!(!work.join(".git/hooks/proc-receive").exists());
    assert!(matches!(
        hooks::install(&root.path().join("absent"), &options(root.path())),
        Err(RepoError::NotARepository(_))
    ));
}

#[test]
fn local_problems_names_each_problem() {
    let root = tempfile::tempdir().unwrap();
    let bare = init_bare(root.path(), "widgets.git");
    assert_eq!(
        hooks::local_problems(&bare).unwrap(),
        vec![
            "receive.procReceiveRefs is not refs/, so git does not run the proc-receive hook",
            "hook proc-receive is missing",
            "reflog is off (core.logAllRefUpdates)",
        ]
    );

    hooks::install(&bare, &legacy_options(root.path())).unwrap();
    fs::set_permissions(bare.join("hooks/update"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(bare.join("hooks/post-update"), "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(
        bare.join("hooks/post-update"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    git(&bare, &["config", "core.logAllRefUpdates", "false"]);
    assert_eq!(
        hooks::local_problems(&bare).unwrap(),
        vec![
            "hook update is not executable",
            "hook post-update is not piehole's",
            "reflog is off (core.logAllRefUpdates)",
        ]
    );

    // "always" is a stronger form of on.
    git(&bare, &["config", "core.logAllRefUpdates", "always"]);
    hooks::install(
        &bare,
        &InstallOptions {
            force: true,
            ..legacy_options(root.path())
        },
    )
    .unwrap();
    assert_eq!(git(&bare, &["config", "core.logAllRefUpdates"]), "always");
    assert!(hooks::local_problems(&bare).unwrap().is_empty());

    git(&bare, &["config", "core.hooksPath", "/somewhere/else"]);
    let problems = hooks::local_problems(&bare).unwrap();
    assert_eq!(problems.len(), 1);
    assert!(problems[0].starts_with("core.hooksPath is /somewhere/else"));
    // Pointing at our own hooks directory is fine.
    git(&bare, &["config", "core.hooksPath", "hooks"]);
    assert!(hooks::local_problems(&bare).unwrap().is_empty());
}

#[test]
fn local_problems_reports_a_non_bare_repository() {
    let root = tempfile::tempdir().unwrap();
    let work = init_work(root.path(), "w");
    let problems = hooks::local_problems(&work).unwrap();
    assert_eq!(problems[0], "repository is not bare");
    assert!(problems.contains(&"hook proc-receive is missing".to_string()));
    assert!(matches!(
        hooks::local_problems(&root.path().join("absent")),
        Err(RepoError::NotARepository(_))
    ));
}

/// The written shims really run under git, with git's arguments, even when
/// the executable's path needs quoting.
#[test]
fn installed_hooks_exec_piehole_during_a_push() {
    let root = tempfile::tempdir().unwrap();
    let bin = root.path().join("it's a $dir");
    fs::create_dir(&bin).unwrap();
    let fake = bin.join("piehole");
    // Records its arguments; refuses pushes to refs/heads/blocked like a
    // rejecting update hook would.
    fs::write(
        &fake,
        "#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls.log\"\n\
         [ \"$3\" != refs/heads/blocked ]\n",
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();

    let bare = init_bare(root.path(), "widgets.git");
    let opts = InstallOptions {
        piehole_exe: fake.clone(),
        ..legacy_options(root.path())
    };
    hooks::install(&bare, &opts).unwrap();

    let work = init_work(root.path(), "w");
    let c1 = commit(&work, &[("f.txt", "f\n")], "first");
    let url = bare.to_str().unwrap();
    git(&work, &["push", "--quiet", url, "main"]);
    let zeros = "0".repeat(40);
    assert_eq!(
        fs::read_to_string(bin.join("calls.log")).unwrap(),
        format!("hook update refs/heads/main {zeros} {c1}\nhook post-update refs/heads/main\n")
    );

    let refused = git_output(&work, &["push", "--quiet", url, "main:refs/heads/blocked"]);
    assert!(!refused.status.success());
    assert!(
        git_output(&bare, &["rev-parse", "--verify", "refs/heads/blocked"])
            .stdout
            .is_empty()
    );
}

#[test]
fn config_read_gets_what_install_wrote() {
    let root = tempfile::tempdir().unwrap();
    let bare = init_bare(root.path(), "widgets.git");
    assert_eq!(
        config::read(&bare).unwrap(),
        config::PieholeConfig::default()
    );

    let opts = options(root.path());
    hooks::install(&bare, &opts).unwrap();
    let read = config::read(&bare).unwrap();
    assert_eq!(read.group.as_deref(), Some("widgets"));
    assert_eq!(read.node, Some(opts.node_socket));
    assert_eq!(read.request_timeout_ms, Some(7000));

    git(&bare, &["config", "--unset", "piehole.node"]);
    let read = config::read(&bare).unwrap();
    assert_eq!(read.group.as_deref(), Some("widgets"));
    assert_eq!(read.node, None);
}

#[test]
fn relative_paths_are_made_absolute() {
    let root = tempfile::tempdir().unwrap();
    let bare = init_bare(root.path(), "widgets.git");
    let opts = InstallOptions {
        node_socket: PathBuf::from("run/piehole.sock"),
        piehole_exe: PathBuf::from("bin/piehole"),
        ..options(root.path())
    };
    hooks::install(&bare, &opts).unwrap();
    let cwd = std::env::current_dir().unwrap();
    let node = config::read(&bare).unwrap().node.unwrap();
    assert_eq!(node, cwd.join("run/piehole.sock"));
    let hook = fs::read_to_string(bare.join("hooks/proc-receive")).unwrap();
    assert!(hook.contains(&format!("exec '{}'", cwd.join("bin/piehole").display())));
}
