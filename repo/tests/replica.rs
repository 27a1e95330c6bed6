//! Opening, listing refs, ancestry and compare-and-swap ref updates.

mod common;

use std::fs;

use common::{commit, git, history, init_bare, init_work};
use piehole_repo::{Replica, RepoError};

const ABSENT_ID: &str = "0123456789abcdef0123456789abcdef01234567";

#[test]
fn open_accepts_bare_and_refuses_work_trees_and_non_repositories() {
    let root = tempfile::tempdir().unwrap();
    let bare = init_bare(root.path(), "b.git");
    let replica = Replica::open(&bare).unwrap();
    assert_eq!(replica.path(), bare);

    let work = init_work(root.path(), "w");
    assert!(matches!(Replica::open(&work), Err(RepoError::NotBare(p)) if p == work));
    assert!(matches!(
        Replica::open(&work.join(".git")),
        Err(RepoError::NotBare(_))
    ));

    let empty = root.path().join("empty");
    fs::create_dir(&empty).unwrap();
    assert!(matches!(
        Replica::open(&empty),
        Err(RepoError::NotARepository(p)) if p == empty
    ));
    assert!(matches!(
        Replica::open(&root.path().join("nowhere")),
        Err(RepoError::NotARepository(_))
    ));
}

#[test]
fn refs_lists_direct_refs_but_not_head_remotes_or_symbolic_refs() {
    let root = tempfile::tempdir().unwrap();
    let h = history(root.path());
    git(&h.bare, &["update-ref", "refs/remotes/origin/main", &h.c1]);
    git(&h.bare, &["update-ref", "refs/notes/commits", &h.c2]);
    git(
        &h.bare,
        &["symbolic-ref", "refs/heads/alias", "refs/heads/main"],
    );

    let expected = [
        ("refs/heads/main", h.c3.as_str()),
        ("refs/heads/side", h.c4.as_str()),
        ("refs/notes/commits", h.c2.as_str()),
        ("refs/tags/light", h.c1.as_str()),
        // The tag object, not the commit it points at.
        ("refs/tags/v1", h.v1.as_str()),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    assert_ne!(h.v1, h.c2);

    let replica = Replica::open(&h.bare).unwrap();
    let listed: Vec<(String, String)> = replica.refs().unwrap().into_iter().collect();
    assert_eq!(listed, expected);

    // Same answer once the refs live in packed-refs instead of loose files.
    git(&h.bare, &["pack-refs", "--all"]);
    let listed: Vec<(String, String)> = replica.refs().unwrap().into_iter().collect();
    assert_eq!(listed, expected);
}

#[test]
fn ref_value_reads_present_absent_and_symbolic_refs() {
    let root = tempfile::tempdir().unwrap();
    let h = history(root.path());
    let replica = Replica::open(&h.bare).unwrap();
    assert_eq!(
        replica.ref_value("refs/heads/main").unwrap(),
        Some(h.c3.clone())
    );
    assert_eq!(replica.ref_value("refs/tags/v1").unwrap(), Some(h.v1));
    assert_eq!(replica.ref_value("refs/heads/nope").unwrap(), None);
    assert_eq!(replica.ref_value("HEAD").unwrap(), Some(h.c3));
    assert!(matches!(
        replica.ref_value("refs/heads/bad..name"),
        Err(RepoError::InvalidRefName(_))
    ));
}

#[test]
fn has_object_and_is_descendant() {
    let root = tempfile::tempdir().unwrap();
    let h = history(root.path());
    let r = Replica::open(&h.bare).unwrap();
    let tree = git(&h.bare, &["rev-parse", &format!("{}^{{tree}}", h.c2)]);

    assert!(r.has_object(&h.c1));
    assert!(r.has_object(&h.v1));
    assert!(r.has_object(&tree));
    assert!(!r.has_object(ABSENT_ID));
    assert!(!r.has_object("not-an-id"));
    // A prefix must not be zero-padded into some other id.
    assert!(!r.has_object(&h.c1[..10]));

    assert!(r.is_descendant(&h.c3, &h.c1));
    assert!(r.is_descendant(&h.c2, &h.c1));
    assert!(r.is_descendant(&h.c2, &h.c2));
    assert!(!r.is_descendant(&h.c1, &h.c2));
    assert!(
        !r.is_descendant(&h.c4, &h.c2),
        "side branch is not after c2"
    );
    assert!(!r.is_descendant(&h.c3, &h.c4));
    // Annotated tags are peeled on both sides.
    assert!(r.is_descendant(&h.c3, &h.v1));
    assert!(r.is_descendant(&h.v1, &h.c1));
    assert!(r.is_descendant(&h.v1, &h.c2));
    // Missing objects and non-commits answer false.
    assert!(!r.is_descendant(ABSENT_ID, &h.c1));
    assert!(!r.is_descendant(&h.c3, ABSENT_ID));
    assert!(!r.is_descendant(&tree, &h.c1));
    assert!(!r.is_descendant("garbage", &h.c1));
}

#[test]
fn set_ref_creates_updates_and_deletes_with_compare_and_swap() {
    let root = tempfile::tempdir().unwrap();
    let h = history(root.path());
    git(&h.bare, &["config", "core.logAllRefUpdates", "true"]);
    let r = Replica::open(&h.bare).unwrap();
    let name = "refs/heads/topic";

    // Create: expected None means "must not exist".
    r.set_ref(name, None, Some(&h.c1), "piehole: create")
        .unwrap();
    assert_eq!(git(&h.bare, &["rev-parse", name]), h.c1);
    match r.set_ref(name, None, Some(&h.c2), "piehole: create again") {
        Err(RepoError::RefMoved { name: n, current }) => {
            assert_eq!(n, name);
            assert_eq!(current, Some(h.c1.clone()));
        }
        other => panic!("expected RefMoved, got {other:?}"),
    }

    // Update: succeeds from the right value, refuses from a stale one.
    r.set_ref(name, Some(&h.c1), Some(&h.c2), "piehole: advance")
        .unwrap();
    assert_eq!(git(&h.bare, &["rev-parse", name]), h.c2);
    match r.set_ref(name, Some(&h.c1), Some(&h.c3), "piehole: stale") {
        Err(RepoError::RefMoved { current, .. }) => assert_eq!(current, Some(h.c2.clone())),
        other => panic!("expected RefMoved, got {other:?}"),
    }
    assert_eq!(git(&h.bare, &["rev-parse", name]), h.c2);

    let reflog = git(&h.bare, &["reflog", "show", "--format=%gs", name]);
    assert_eq!(reflog, "piehole: advance\npiehole: create");

    // Delete: only from the current value.
    match r.set_ref(name, Some(&h.c1), None, "piehole: stale delete") {
        Err(RepoError::RefMoved { current, .. }) => assert_eq!(current, Some(h.c2.clone())),
        other => panic!("expected RefMoved, got {other:?}"),
    }
    r.set_ref(name, Some(&h.c2), None, "piehole: delete")
        .unwrap();
    assert_eq!(r.ref_value(name).unwrap(), None);
    match r.set_ref(name, Some(&h.c2), None, "piehole: delete again") {
        Err(RepoError::RefMoved { current, .. }) => assert_eq!(current, None),
        other => panic!("expected RefMoved, got {other:?}"),
    }
    match r.set_ref(name, Some(&h.c2), Some(&h.c3), "piehole: update absent") {
        Err(RepoError::RefMoved { current, .. }) => assert_eq!(current, None),
        other => panic!("expected RefMoved, got {other:?}"),
    }

    // None -> None: fine while absent, a mismatch when present.
    r.set_ref(name, None, None, "noop").unwrap();
    match r.set_ref("refs/heads/main", None, None, "noop") {
        Err(RepoError::RefMoved { current, .. }) => assert_eq!(current, Some(h.c3.clone())),
        other => panic!("expected RefMoved, got {other:?}"),
    }
}

#[test]
fn set_ref_works_on_packed_refs_and_tags() {
    let root = tempfile::tempdir().unwrap();
    let h = history(root.path());
    git(&h.bare, &["pack-refs", "--all"]);
    let r = Replica::open(&h.bare).unwrap();

    r.set_ref("refs/heads/side", Some(&h.c4), Some(&h.c3), "move")
        .unwrap();
    assert_eq!(git(&h.bare, &["rev-parse", "refs/heads/side"]), h.c3);
    r.set_ref("refs/tags/v1", Some(&h.v1), None, "drop tag")
        .unwrap();
    assert!(!git(&h.bare, &["show-ref"]).contains("refs/tags/v1"));
    r.set_ref("refs/tags/v1", None, Some(&h.v1), "restore tag")
        .unwrap();
    assert_eq!(git(&h.bare, &["rev-parse", "refs/tags/v1"]), h.v1);
    common::fsck(&h.bare);
}

#[test]
fn set_ref_refuses_missing_objects_and_bad_input() {
    let root = tempfile::tempdir().unwrap();
    let h = history(root.path());
    let r = Replica::open(&h.bare).unwrap();

    match r.set_ref("refs/heads/main", Some(&h.c3), Some(ABSENT_ID), "bad") {
        Err(RepoError::MissingObject(id)) => assert_eq!(id, ABSENT_ID),
        other => panic!("expected MissingObject, got {other:?}"),
    }
    assert!(matches!(
        r.set_ref("refs/heads/new", None, Some(ABSENT_ID), "bad"),
        Err(RepoError::MissingObject(_))
    ));
    assert_eq!(git(&h.bare, &["rev-parse", "refs/heads/main"]), h.c3);
    assert_eq!(r.ref_value("refs/heads/new").unwrap(), None);

    assert!(matches!(
        r.set_ref("refs/heads/main", Some(&h.c3), Some("abc"), "bad"),
        Err(RepoError::InvalidId(_))
    ));
    assert!(matches!(
        r.set_ref("HEAD", None, Some(&h.c1), "bad"),
        Err(RepoError::InvalidRefName(_))
    ));
    assert!(matches!(
        r.set_ref("refs/heads/a b", None, Some(&h.c1), "bad"),
        Err(RepoError::InvalidRefName(_))
    ));
}

#[test]
fn set_ref_honours_the_lock_a_concurrent_push_holds() {
    let root = tempfile::tempdir().unwrap();
    let h = history(root.path());
    let r = Replica::open(&h.bare).unwrap();
    // What git receive-pack holds while it updates refs/heads/main.
    let lock = h.bare.join("refs/heads/main.lock");
    fs::write(&lock, format!("{}\n", h.c1)).unwrap();

    match r.set_ref("refs/heads/main", Some(&h.c3), Some(&h.c2), "racing") {
        Err(RepoError::RefLocked { name, stale_at }) => {
            assert_eq!(name, "refs/heads/main");
            assert!(stale_at.is_some_and(|t| t > std::time::SystemTime::now()));
        }
        other => panic!("wrote through git's lock: {other:?}"),
    }
    assert!(lock.exists(), "someone else's lock was removed");
    fs::remove_file(&lock).unwrap();
    assert_eq!(git(&h.bare, &["rev-parse", "refs/heads/main"]), h.c3);

    // Once the lock is gone the same update goes through.
    r.set_ref("refs/heads/main", Some(&h.c3), Some(&h.c2), "retry")
        .unwrap();
    assert_eq!(git(&h.bare, &["rev-parse", "refs/heads/main"]), h.c2);
}

/// A lock no writer can still hold (a killed process's) is removed and the
/// update goes through; a fresh one is a live writer's and is honoured.
#[test]
fn set_ref_removes_a_stale_lock_but_not_a_fresh_one() {
    let root = tempfile::tempdir().unwrap();
    let h = history(root.path());
    let r = Replica::open(&h.bare).unwrap();
    let lock = h.bare.join("refs/heads/main.lock");
    fs::write(&lock, format!("{}\n", h.c1)).unwrap();
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    fs::File::options()
        .write(true)
        .open(&lock)
        .and_then(|f| f.set_modified(old))
        .unwrap();
    r.set_ref("refs/heads/main", Some(&h.c3), Some(&h.c2), "after a crash")
        .unwrap();
    assert!(!lock.exists());
    assert_eq!(git(&h.bare, &["rev-parse", "refs/heads/main"]), h.c2);
}

#[test]
fn set_ref_sees_a_change_made_by_git_after_open() {
    let root = tempfile::tempdir().unwrap();
    let h = history(root.path());
    let r = Replica::open(&h.bare).unwrap();
    assert_eq!(r.ref_value("refs/heads/main").unwrap(), Some(h.c3.clone()));

    // A push lands through git while the replica is open.
    let c5 = commit(&h.work, &[("e.txt", "e\n")], "c5");
    git(
        &h.work,
        &["push", "--quiet", h.bare.to_str().unwrap(), "main"],
    );

    match r.set_ref("refs/heads/main", Some(&h.c3), Some(&h.c2), "stale") {
        Err(RepoError::RefMoved { current, .. }) => assert_eq!(current, Some(c5.clone())),
        other => panic!("expected RefMoved, got {other:?}"),
    }
    assert_eq!(git(&h.bare, &["rev-parse", "refs/heads/main"]), c5);
}

/// Whoever may write `refs/` can plant symlinks there, but the node writes
/// with its own rights: no ref is created, moved or deleted, and no reflog
/// appended to, through a symlink; what lies behind it is untouched.
#[test]
fn set_ref_never_writes_through_a_symlink_in_the_repository() {
    use std::os::unix::fs::symlink;
    let root = tempfile::tempdir().unwrap();
    let h = history(root.path());
    git(&h.bare, &["config", "core.logAllRefUpdates", "true"]);
    let elsewhere = init_bare(root.path(), "elsewhere.git");
    git(
        &h.work,
        &["push", "--quiet", elsewhere.to_str().unwrap(), "main"],
    );
    let victim = root.path().join("victim");
    fs::write(&victim, "untouched\n").unwrap();
    let r = Replica::open(&h.bare).unwrap();
    let refused = |result: Result<(), RepoError>, link: &str| match result {
        Err(RepoError::RefThroughSymlink { link: l, .. }) => {
            assert_eq!(l, h.bare.join(link));
        }
        other => panic!("expected a refusal at {link}, got {other:?}"),
    };

    // A directory under refs/heads leading into another repository.
    symlink(elsewhere.join("refs/heads"), h.bare.join("refs/heads/evil")).unwrap();
    let theirs = "refs/heads/evil/main";
    refused(
        r.set_ref(theirs, Some(&h.c3), None, "delete"),
        "refs/heads/evil",
    );
    refused(
        r.set_ref(theirs, Some(&h.c3), Some(&h.c1), "move"),
        "refs/heads/evil",
    );
    refused(
        r.set_ref("refs/heads/evil/new", None, Some(&h.c1), "create"),
        "refs/heads/evil",
    );
    refused(
        r.set_ref_keeping_old(theirs, Some(&h.c3), Some(&h.c4), "move"),
        "refs/heads/evil",
    );
    assert_eq!(
        git(
            &elsewhere,
            &["for-each-ref", "--format=%(refname) %(objectname)"]
        ),
        format!("refs/heads/main {}", h.c3)
    );

    // A ref file that is a symlink, and a reflog leading to a file.
    symlink(
        elsewhere.join("refs/heads/main"),
        h.bare.join("refs/heads/linked"),
    )
    .unwrap();
    refused(
        r.set_ref("refs/heads/linked", Some(&h.c3), Some(&h.c1), "move"),
        "refs/heads/linked",
    );
    r.set_ref("refs/heads/topic", None, Some(&h.c1), "create")
        .unwrap();
    fs::remove_file(h.bare.join("logs/refs/heads/topic")).unwrap();
    symlink(&victim, h.bare.join("logs/refs/heads/topic")).unwrap();
    refused(
        r.set_ref("refs/heads/topic", Some(&h.c1), Some(&h.c2), "move"),
        "logs/refs/heads/topic",
    );
    // HEAD's reflog, appended to when the ref HEAD names moves.
    fs::rename(h.bare.join("logs/HEAD"), root.path().join("HEAD.log")).ok();
    symlink(&victim, h.bare.join("logs/HEAD")).unwrap();
    refused(
        r.set_ref("refs/heads/main", Some(&h.c3), Some(&h.c4), "move"),
        "logs/HEAD",
    );
    fs::remove_file(h.bare.join("logs/HEAD")).unwrap();
    // The packed refs: another repository's, or a FIFO that would hold
    // the node until the pusher lets go.
    symlink(elsewhere.join("packed-refs"), h.bare.join("packed-refs")).unwrap();
    refused(
        r.set_ref("refs/heads/main", Some(&h.c3), Some(&h.c4), "move"),
        "packed-refs",
    );
    fs::remove_file(h.bare.join("packed-refs")).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(h.bare.join("packed-refs"))
        .status()
        .unwrap();
    assert!(made.success());
    refused(
        r.set_ref("refs/heads/main", Some(&h.c3), Some(&h.c4), "move"),
        "packed-refs",
    );
    fs::remove_file(h.bare.join("packed-refs")).unwrap();
    // The whole logs directory moved aside for one of its own.
    fs::rename(h.bare.join("logs"), root.path().join("logs.away")).unwrap();
    symlink(root.path().join("logs.away"), h.bare.join("logs")).unwrap();
    refused(
        r.set_ref("refs/heads/main", Some(&h.c3), Some(&h.c4), "move"),
        "logs",
    );
    assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched\n");
    assert_eq!(git(&h.bare, &["rev-parse", "refs/heads/main"]), h.c3);
    assert_eq!(git(&h.bare, &["rev-parse", "refs/heads/topic"]), h.c1);
}
