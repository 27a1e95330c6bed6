//! Building packs in one repository, indexing them in another, and the
//! completeness check that guards ref moves.

mod common;

use std::fs;

use common::{fsck, git, history, init_bare, pack_dir_listing, pack_object_count, History};
use piehole_repo::{Replica, RepoError};

const ABSENT_ID: &str = "0123456789abcdef0123456789abcdef01234567";

fn ids(list: &[&String]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Every object `git rev-list --objects` lists for `spec`.
fn objects(repo: &std::path::Path, spec: &[&str]) -> Vec<String> {
    let mut args = vec!["rev-list", "--objects"];
    args.extend_from_slice(spec);
    git(repo, &args)
        .lines()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

fn setup() -> (tempfile::TempDir, History) {
    let root = tempfile::tempdir().unwrap();
    let h = history(root.path());
    (root, h)
}

#[test]
fn full_pack_makes_an_empty_replica_complete() {
    let (root, h) = setup();
    let a = Replica::open(&h.bare).unwrap();
    let b_path = init_bare(root.path(), "b.git");
    let b = Replica::open(&b_path).unwrap();
    assert!(!b.has_object(&h.c2));
    assert!(!b.is_complete(&h.c2).unwrap());

    let pack = a.build_pack(&ids(&[&h.c2]), &[]).unwrap();
    let expected = objects(&h.bare, &[&h.c2]);
    assert_eq!(pack_object_count(&pack) as usize, expected.len());

    b.index_pack(&pack).unwrap();
    // The pack keeps its trailer checksum as its name (index_pack relies on
    // this to fsync it).
    let trailer: String = pack[pack.len() - 20..]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        pack_dir_listing(&b_path),
        [
            format!("pack-{trailer}.idx"),
            format!("pack-{trailer}.pack")
        ]
    );
    for id in &expected {
        assert!(b.has_object(id), "{id} missing after indexing");
    }
    assert!(b.is_complete(&h.c2).unwrap());
    assert!(b.is_complete(&h.c1).unwrap());
    assert!(!b.has_object(&h.c3));
    assert!(!b.is_complete(&h.c3).unwrap());

    b.set_ref("refs/heads/main", None, Some(&h.c2), "replicate")
        .unwrap();
    fsck(&b_path);
    assert_eq!(
        git(&b_path, &["log", "--format=%H", "main"]),
        format!("{}\n{}", h.c2, h.c1)
    );
}

#[test]
fn haves_leave_out_what_the_receiver_already_has() {
    let (root, h) = setup();
    let a = Replica::open(&h.bare).unwrap();
    let b_path = init_bare(root.path(), "b.git");
    let b = Replica::open(&b_path).unwrap();
    b.index_pack(&a.build_pack(&ids(&[&h.c2]), &[]).unwrap())
        .unwrap();
    b.set_ref("refs/heads/main", None, Some(&h.c2), "replicate")
        .unwrap();

    // An unknown have is ignored rather than failing the request.
    let haves = vec![h.c2.clone(), ABSENT_ID.to_string()];
    let pack = a.build_pack(&ids(&[&h.c3]), &haves).unwrap();
    let new_objects = objects(&h.bare, &[&h.c3, &format!("^{}", h.c2)]);
    // c3, its root tree, dir/ and dir/c.txt.
    assert_eq!(new_objects.len(), 4);
    assert_eq!(pack_object_count(&pack) as usize, new_objects.len());

    b.index_pack(&pack).unwrap();
    assert!(b.is_complete(&h.c3).unwrap());
    b.set_ref("refs/heads/main", Some(&h.c2), Some(&h.c3), "replicate")
        .unwrap();
    fsck(&b_path);

    // The same thin slice alone, in a replica without c2, is not complete:
    // the parent commit and the unchanged subtrees are absent.
    let c_path = init_bare(root.path(), "c.git");
    let c = Replica::open(&c_path).unwrap();
    c.index_pack(&pack).unwrap();
    assert!(c.has_object(&h.c3));
    assert!(!c.is_complete(&h.c3).unwrap());
}

#[test]
fn annotated_tag_pack_carries_the_tag_and_its_history() {
    let (root, h) = setup();
    let a = Replica::open(&h.bare).unwrap();
    let b_path = init_bare(root.path(), "b.git");
    let b = Replica::open(&b_path).unwrap();

    let pack = a.build_pack(&ids(&[&h.v1]), &[]).unwrap();
    assert_eq!(
        pack_object_count(&pack) as usize,
        objects(&h.bare, &[&h.c2]).len() + 1
    );
    b.index_pack(&pack).unwrap();
    assert!(b.has_object(&h.v1));
    assert!(b.is_complete(&h.v1).unwrap());
    assert!(b.is_complete(&h.c2).unwrap());
    b.set_ref("refs/tags/v1", None, Some(&h.v1), "replicate tag")
        .unwrap();
    assert_eq!(git(&b_path, &["rev-parse", "refs/tags/v1^{commit}"]), h.c2);
    assert_eq!(git(&b_path, &["cat-file", "-t", "refs/tags/v1"]), "tag");
    fsck(&b_path);

    // With the target's history already there, only the tag object travels.
    let c_path = init_bare(root.path(), "c.git");
    let c = Replica::open(&c_path).unwrap();
    c.index_pack(&a.build_pack(&ids(&[&h.c2]), &[]).unwrap())
        .unwrap();
    let pack = a.build_pack(&ids(&[&h.v1]), &ids(&[&h.c2])).unwrap();
    assert_eq!(pack_object_count(&pack), 1);
    c.index_pack(&pack).unwrap();
    assert!(c.is_complete(&h.v1).unwrap());
}

#[test]
fn tree_and_blob_wants_are_packed_whole() {
    let (root, h) = setup();
    let a = Replica::open(&h.bare).unwrap();
    let tree = git(&h.bare, &["rev-parse", &format!("{}^{{tree}}", h.c1)]);
    let blob = git(&h.bare, &["rev-parse", &format!("{}:side.txt", h.c4)]);
    let b_path = init_bare(root.path(), "b.git");
    let b = Replica::open(&b_path).unwrap();

    let pack = a.build_pack(&[tree.clone(), blob.clone()], &[]).unwrap();
    // c1's tree: root, dir, dir/deep, three blobs; plus the side blob.
    assert_eq!(pack_object_count(&pack), 7);
    b.index_pack(&pack).unwrap();
    assert!(b.is_complete(&tree).unwrap());
    assert!(b.is_complete(&blob).unwrap());
    assert!(!b.has_object(&h.c1));
}

#[test]
fn build_pack_rejects_missing_and_malformed_wants() {
    let (_root, h) = setup();
    let a = Replica::open(&h.bare).unwrap();
    assert!(matches!(
        a.build_pack(&[ABSENT_ID.to_string()], &[]),
        Err(RepoError::MissingObject(id)) if id == ABSENT_ID
    ));
    assert!(matches!(
        a.build_pack(&["xyz".to_string()], &[]),
        Err(RepoError::InvalidId(_))
    ));
}

#[test]
fn empty_input_and_zero_object_packs_write_nothing() {
    let (root, h) = setup();
    let a = Replica::open(&h.bare).unwrap();
    let b_path = init_bare(root.path(), "b.git");
    let b = Replica::open(&b_path).unwrap();
    let before = pack_dir_listing(&b_path);

    b.index_pack(&[]).unwrap();
    let nothing = a.build_pack(&[], &[]).unwrap();
    assert_eq!(pack_object_count(&nothing), 0);
    b.index_pack(&nothing).unwrap();
    // Wants the receiver already has also give a zero-object pack.
    let up_to_date = a.build_pack(&ids(&[&h.c2]), &ids(&[&h.c3])).unwrap();
    assert_eq!(pack_object_count(&up_to_date), 0);
    b.index_pack(&up_to_date).unwrap();

    assert_eq!(pack_dir_listing(&b_path), before);
}

#[test]
fn garbage_and_damaged_packs_are_refused_and_leave_nothing_behind() {
    let (root, h) = setup();
    let a = Replica::open(&h.bare).unwrap();
    let b_path = init_bare(root.path(), "b.git");
    let b = Replica::open(&b_path).unwrap();
    let before = pack_dir_listing(&b_path);
    let good = a.build_pack(&ids(&[&h.c3]), &[]).unwrap();

    let garbage = b"this is not a pack, not even close to one".to_vec();
    let truncated = good[..good.len() / 2].to_vec();
    let mut bad_trailer = good.clone();
    *bad_trailer.last_mut().unwrap() ^= 0xff;
    let mut extra = good.clone();
    extra.extend_from_slice(b"trailing junk");

    for (what, bytes) in [
        ("garbage", garbage),
        ("truncated", truncated),
        ("bad trailer", bad_trailer),
        ("trailing junk", extra),
    ] {
        match b.index_pack(&bytes) {
            Err(RepoError::BadPack(reason)) => assert!(!reason.is_empty(), "{what}"),
            other => panic!("{what}: expected BadPack, got {other:?}"),
        }
        assert_eq!(pack_dir_listing(&b_path), before, "{what} left files");
        assert!(!b.has_object(&h.c3), "{what}");
    }
    let loose: Vec<_> = fs::read_dir(b_path.join("objects"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "pack" && n != "info")
        .collect();
    assert!(loose.is_empty(), "loose objects appeared: {loose:?}");

    // The replica is still usable afterwards.
    b.index_pack(&good).unwrap();
    assert!(b.is_complete(&h.c3).unwrap());
}

#[test]
fn indexing_the_same_pack_twice_is_harmless() {
    let (root, h) = setup();
    let a = Replica::open(&h.bare).unwrap();
    let b_path = init_bare(root.path(), "b.git");
    let b = Replica::open(&b_path).unwrap();
    let pack = a.build_pack(&ids(&[&h.c3, &h.c4]), &[]).unwrap();
    b.index_pack(&pack).unwrap();
    let once = pack_dir_listing(&b_path);
    b.index_pack(&pack).unwrap();
    assert_eq!(pack_dir_listing(&b_path), once);
    assert!(b.is_complete(&h.c3).unwrap());
    assert!(b.is_complete(&h.c4).unwrap());
}

#[test]
fn is_complete_notices_a_missing_blob_deep_in_a_tree() {
    let (_root, h) = setup();
    let r = Replica::open(&h.bare).unwrap();
    // A commit on top of main whose tree names a blob nobody has.
    let missing_blob = ABSENT_ID;
    let deep = git(&h.bare, &["rev-parse", &format!("{}:dir/deep", h.c3)]);
    let mktree = |input: String| {
        let mut child = std::process::Command::new("git")
            .arg("-C")
            .arg(&h.bare)
            .args(["mktree", "--missing"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let sub = mktree(format!(
        "040000 tree {deep}\tdeep\n100644 blob {missing_blob}\tghost.txt\n"
    ));
    let a_blob = git(&h.bare, &["rev-parse", &format!("{}:a.txt", h.c3)]);
    let root_tree = mktree(format!(
        "100644 blob {a_blob}\ta.txt\n040000 tree {sub}\tdir\n"
    ));
    let broken = git(
        &h.bare,
        &["commit-tree", &root_tree, "-p", &h.c3, "-m", "broken"],
    );

    assert!(r.has_object(&broken));
    assert!(!r.is_complete(&broken).unwrap());
    assert!(!r.is_complete(&root_tree).unwrap());
    assert!(r.is_complete(&deep).unwrap());
    // Refs already reachable stay complete.
    assert!(r.is_complete(&h.c3).unwrap());
    assert!(r.is_complete(&h.v1).unwrap());
    assert!(!r.is_complete(ABSENT_ID).unwrap());
    assert!(matches!(
        r.is_complete("nope"),
        Err(RepoError::InvalidId(_))
    ));
}

/// A pack goes into the repository's own objects/pack, never through a
/// symlink that someone who can write the repository put in its place.
#[test]
fn a_pack_is_never_written_through_a_symlinked_pack_directory() {
    let (root, h) = setup();
    let a = Replica::open(&h.bare).unwrap();
    let pack = a.build_pack(&ids(&[&h.c2]), &[]).unwrap();
    let elsewhere = root.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    for link in ["objects/pack", "objects"] {
        let b_path = init_bare(root.path(), &format!("b-{}.git", link.len()));
        let real = b_path.join(link);
        fs::rename(&real, root.path().join(format!("away-{}", link.len()))).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &real).unwrap();
        let b = Replica::open(&b_path).unwrap();
        match b.index_pack(&pack) {
            Err(RepoError::PacksElsewhere(p)) => assert_eq!(p, real),
            other => panic!("{link}: expected a refusal, got {other:?}"),
        }
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0, "{link}");
    }
}
