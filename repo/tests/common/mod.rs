//! Shared fixtures: repositories made with the real git CLI, isolated from
//! the machine's and the user's git configuration.

#![allow(dead_code)] // each test binary uses a different subset

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn git_output(dir: &Path, args: &[&str]) -> Output {
    Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "Test Author")
        .env("GIT_AUTHOR_EMAIL", "author@example.com")
        .env("GIT_COMMITTER_NAME", "Test Committer")
        .env("GIT_COMMITTER_EMAIL", "committer@example.com")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .env_remove("GIT_OBJECT_DIRECTORY")
        .output()
        .expect("git runs")
}

/// Runs git and returns trimmed stdout; panics with git's stderr on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = git_output(dir, args);
    assert!(
        out.status.success(),
        "git {args:?} in {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub fn init_bare(root: &Path, name: &str) -> PathBuf {
    let path = root.join(name);
    git(
        root,
        &[
            "init",
            "--quiet",
            "--bare",
            "-b",
            "main",
            path.to_str().unwrap(),
        ],
    );
    path
}

pub fn init_work(root: &Path, name: &str) -> PathBuf {
    let path = root.join(name);
    git(
        root,
        &["init", "--quiet", "-b", "main", path.to_str().unwrap()],
    );
    path
}

/// Writes `files` (path, content) into the work tree and commits them all.
pub fn commit(work: &Path, files: &[(&str, &str)], message: &str) -> String {
    for (name, content) in files {
        let path = work.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }
    git(work, &["add", "--all"]);
    git(work, &["commit", "--quiet", "-m", message]);
    git(work, &["rev-parse", "HEAD"])
}

/// A bare repository with some history, pushed from a work repository:
///
/// ```text
/// c1 -- c2 -- c3        main
///   \
///    c4                 side
/// ```
/// plus lightweight tag `light` at c1 and annotated tag `v1` at c2.
pub struct History {
    pub bare: PathBuf,
    pub work: PathBuf,
    pub c1: String,
    pub c2: String,
    pub c3: String,
    pub c4: String,
    pub v1: String,
}

pub fn history(root: &Path) -> History {
    let bare = init_bare(root, "a.git");
    let work = init_work(root, "a-work");
    let c1 = commit(
        &work,
        &[
            ("a.txt", "one\n"),
            ("dir/b.txt", "bee\n"),
            ("dir/deep/d.txt", "dee\n"),
        ],
        "c1",
    );
    let c2 = commit(&work, &[("a.txt", "two\n")], "c2");
    git(&work, &["tag", "-a", "-m", "version one", "v1"]);
    let c3 = commit(&work, &[("dir/c.txt", "sea\n")], "c3");
    git(&work, &["tag", "light", &c1]);
    git(&work, &["checkout", "--quiet", "-b", "side", &c1]);
    let c4 = commit(&work, &[("side.txt", "side\n")], "c4");
    git(&work, &["checkout", "--quiet", "main"]);
    let url = bare.to_str().unwrap();
    git(&work, &["push", "--quiet", url, "main", "side", "--tags"]);
    let v1 = git(&bare, &["rev-parse", "refs/tags/v1"]);
    History {
        bare,
        work,
        c1,
        c2,
        c3,
        c4,
        v1,
    }
}

/// Names of the files in objects/pack, to prove that nothing was written.
pub fn pack_dir_listing(bare: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(bare.join("objects/pack"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The object count from a pack's header.
pub fn pack_object_count(pack: &[u8]) -> u32 {
    assert_eq!(&pack[..4], b"PACK");
    u32::from_be_bytes(pack[8..12].try_into().unwrap())
}

pub fn fsck(bare: &Path) {
    git(bare, &["fsck", "--full", "--strict", "--no-dangling"]);
}
