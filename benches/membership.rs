//! How long a new member takes to become a voter when the state machine
//! holds 100,000 refs (issue 9's closing figure).
//!
//! A three-node loopback cluster gets 100,000 refs through `piehole
//! consensus import`. Then, SAMPLES times: a new node is announced with
//! `piehole member add`, started with `--join` and an empty data dir, and
//! the clock runs from just before `member add` until the leader's `member
//! list` shows it as a voter; it also records when the new node's own
//! state holds all the refs (its `status` count), which the snapshot
//! brings. The node is removed again before the next sample, so every
//! sample joins a cluster of three voters.
//!
//! What would make the figure wrong: the clock starting after the node was
//! already added (it starts before the command is run); a promotion before
//! the node has the state (the test suite checks it cannot; here the refs
//! count is read too); polling granularity (each poll is one `piehole`
//! process, a few ms).
//!
//! Run: `cargo bench -p piehole --bench membership` (release profile).

#[path = "../tests/harness/mod.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::{poll_until, Cluster};

const SAMPLES: usize = 5;
const REFS: u64 = 100_000;
const PATIENCE: Duration = Duration::from_secs(300);

fn main() {
    let mut c = Cluster::start_with(3, &["--request-timeout-ms", "30000"]);
    import(&c);
    let leader = c.wait_leader();
    let (mut to_voter, mut to_refs) = (Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        let id = c.new_node(&[leader]);
        let start = Instant::now();
        let o = c.member_add(leader, id);
        assert!(o.status.success(), "member add: {}", harness::show(&o));
        c.start_node(id);
        let mut refs_at = None;
        poll_until(&format!("node {id} is a voter"), PATIENCE, || {
            if refs_at.is_none() && c.try_status(id).and_then(|s| s["refs"].as_u64()) == Some(REFS)
            {
                refs_at = Some(start.elapsed());
            }
            let voter = c.try_roles(leader)?.get(&id)? == "voter";
            voter.then_some(())
        });
        to_voter.push(start.elapsed());
        let refs_at = poll_until(&format!("node {id} holds {REFS} refs"), PATIENCE, || {
            refs_at
                .or_else(|| (c.try_status(id)?["refs"].as_u64()? == REFS).then(|| start.elapsed()))
        });
        to_refs.push(refs_at);
        let o = c.member_remove(leader, id);
        assert!(o.status.success(), "member remove: {}", harness::show(&o));
        c.kill(id);
    }
    report("member add -> voter, 100k refs", &mut to_voter);
    report(
        "member add -> new node's state holds 100k refs",
        &mut to_refs,
    );
}

fn import(c: &Cluster) {
    let refs: std::collections::BTreeMap<String, String> = (0..REFS)
        .map(|i| (format!("refs/tags/bulk/t{i}"), harness::oid(i)))
        .collect();
    let doc = serde_json::json!({
        "format": "piehole-consensus/1",
        "groups": { "bulk": { "replicas": {}, "refs": refs } },
    });
    let file = c.dir.path().join("bulk.json");
    std::fs::write(&file, serde_json::to_vec(&doc).unwrap()).expect("write the import");
    let sock = c.socket(1);
    let o = c.run(&[
        "consensus",
        "import",
        file.to_str().unwrap(),
        "--node",
        sock.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "import: {}", harness::show(&o));
}

fn report(what: &str, times: &mut [Duration]) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{what}: median {:.0} ms, min {:.0} ms, max {:.0} ms ({} samples)",
        ms(times[times.len() / 2]),
        ms(times[0]),
        ms(times[times.len() - 1]),
        times.len()
    );
}
