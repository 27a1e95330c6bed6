//! Network partitions: a node cut off from its peers while its process
//! keeps running, as behind a switch that silently drops its packets — not
//! killed. Every peer link of the cluster runs through a user-space proxy
//! (`harness/proxy.rs`) that can black-hole it; the proxy itself is checked
//! first, against a plain TCP echo server.

#[path = "harness/mod.rs"]
mod harness;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::git::{self, Work};
use harness::proxy::Proxy;
use harness::{poll, poll_until, Cluster, POLL_EVERY};

const GROUP: &str = "proj";
const MAIN: &str = "refs/heads/main";

/// How long the leader stays cut off (the scenario).
const ISOLATION: Duration = Duration::from_secs(30);
/// Pushes the majority takes during the isolation, spread over it.
const MAJORITY_PUSHES: u32 = 5;
/// The bound: the cut-off replica has caught up this soon after the heal.
const CATCH_UP_BOUND: Duration = Duration::from_secs(2);

/// The fault-hardening issue's partition: three nodes (request timeout 3 s)
/// with a replica each and one push replicated; the leader is cut off for
/// 30 s. Meanwhile a push to its replica fails with "no quorum" within the
/// bound, and the other two replicas take pushes spread over the 30 s, none
/// of them missing any. After the heal the cut-off replica has the
/// majority's last commit within 2 s, and every replica passes fsck.
#[test]
fn cut_off_leader_says_no_quorum_majority_goes_on_and_it_catches_up_within_2s_of_heal() {
    let timeout = harness::SHORT_REQUEST_TIMEOUT_MS.to_string();
    let mut c = Cluster::start_partitionable(3, &["--request-timeout-ms", &timeout]);
    let reps = git::replicas(&c, GROUP);
    let rep = |id: u64| reps[(id - 1) as usize].clone();
    let user = Work::new(&c, "majority");
    let c1 = user.commit("c1");
    user.push_ok(&reps[0], &["main"]);
    git::wait_converged(&c, &reps, MAIN, Some(&c1));

    let leader = c.wait_leader();
    let majority: Vec<u64> = c.ids().into_iter().filter(|&id| id != leader).collect();
    let majority_reps: Vec<PathBuf> = majority.iter().map(|&id| rep(id)).collect();
    c.isolate(leader);
    let isolated_at = Instant::now();

    // The majority's first push may meet the election the silence starts;
    // it is retried until the new leader takes it.
    let mut pushed = vec![user.commit("majority 0")];
    poll_until(
        "the majority to take a push once the leader is cut off",
        Duration::from_secs(30),
        || {
            user.push(&majority_reps[0], &["main"])
                .status
                .success()
                .then_some(())
        },
    );
    git::wait_converged(&c, &majority_reps, MAIN, pushed.last().map(|s| s.as_str()));
    let new_leader = c.status(majority[0])["leader_id"].as_u64();
    assert!(
        new_leader.is_some_and(|l| majority.contains(&l)),
        "the majority {majority:?} took a push, so one of them leads: {new_leader:?}"
    );

    // The cut-off side refuses. Once the node has seen its peers fall
    // silent (its status says so a few seconds in) it must not even
    // propose: the answer is "no quorum", within the request timeout.
    poll_until(
        "the cut-off node to see both peers unreachable",
        Duration::from_secs(15),
        || {
            let s = c.try_status(leader)?;
            s["members"]
                .as_array()?
                .iter()
                .all(|m| m["id"].as_u64() == Some(leader) || m["reachable"] == false)
                .then_some(())
        },
    );
    let stranded = Work::clone_from(&c, "cut-off", &rep(leader));
    stranded.commit("work on the cut-off side");
    stranded.push_main_says_no_quorum(&rep(leader), harness::REFUSAL_BOUND);
    assert_eq!(git::rev_parse_ref(&rep(leader), MAIN), Some(c1.clone()));

    // The majority goes on, alternating between its two replicas; each push
    // reaches both before the next. The sleep paces the pushes over the
    // isolation: it is the workload's schedule, not a wait for any state.
    for k in 1..MAJORITY_PUSHES {
        sleep_until(isolated_at + ISOLATION * k / MAJORITY_PUSHES);
        pushed.push(user.commit(&format!("majority {k}")));
        user.push_ok(&majority_reps[k as usize % 2], &["main"]);
        git::wait_converged(&c, &majority_reps, MAIN, pushed.last().map(|s| s.as_str()));
    }
    let last = pushed.last().cloned().expect("pushes were made");
    assert_eq!(
        git::rev_parse_ref(&rep(leader), MAIN),
        Some(c1.clone()),
        "the cut-off replica heard of the majority's pushes during the partition"
    );
    sleep_until(isolated_at + ISOLATION);

    let healed_at = Instant::now();
    c.heal(leader);
    let has_last =
        || (git::rev_parse_ref(&rep(leader), MAIN).as_deref() == Some(&last)).then_some(());
    let in_time = poll(POLL_EVERY, CATCH_UP_BOUND, has_last);
    let caught_up = healed_at.elapsed();
    if in_time.is_none() {
        // Watch on, only to report how late it is.
        let late = poll(POLL_EVERY, git::CONVERGE, has_last).map(|()| healed_at.elapsed());
        harness::dump_logs();
        panic!(
            "the cut-off replica had not caught up {CATCH_UP_BOUND:?} after the heal; \
             it did after {late:?} (None: not within {:?})",
            git::CONVERGE
        );
    }
    eprintln!("the cut-off replica caught up {caught_up:?} after the heal");

    git::wait_converged(&c, &reps, MAIN, Some(&last));
    for r in &reps {
        for commit in &pushed {
            let out = git::git(r, &["merge-base", "--is-ancestor", commit, MAIN]);
            git::assert_ok(
                &out,
                &format!("{} has the majority's {commit}", r.display()),
            );
        }
        git::fsck(r);
    }
}

/// Sleeps until `when` (not at all if it has passed): the workload's
/// schedule, never a wait for a state.
fn sleep_until(when: Instant) {
    std::thread::sleep(when.saturating_duration_since(Instant::now()));
}

/// The proxy on its own: it forwards both ways; black-holed, it drops what
/// arrives without closing anything, on old and new connections; healed, the
/// connections that lost bytes stay silent until an end closes them, the one
/// that was idle carries on, and new ones are forwarded.
#[test]
fn proxy_drops_silently_while_black_holed_and_broken_connections_never_resume() {
    let (echo, received) = echo_server();
    let proxy = Proxy::start(echo);
    let mut busy = connect(proxy.addr());
    let mut idle = connect(proxy.addr());
    assert_echoes(&mut busy, b"ping");
    assert_echoes(&mut idle, b"idle");

    proxy.blackhole(true);
    busy.write_all(b"lost").unwrap();
    let mut late = connect(proxy.addr());
    late.write_all(b"late").unwrap();
    poll_until(
        "the proxy to drop the 8 bytes sent into the black hole",
        Duration::from_secs(10),
        || (proxy.dropped_bytes() == 8).then_some(()),
    );
    assert_eq!(received.load(Ordering::SeqCst), 8, "only ping and idle");
    for (name, s) in [("busy", &mut busy), ("late", &mut late)] {
        assert_silent_and_open(s, name);
    }

    proxy.blackhole(false);
    // Bytes lost mid-stream cannot be made up: the broken connections stay
    // silent after the heal...
    busy.write_all(b"after").unwrap();
    assert_silent_and_open(&mut busy, "busy");
    // ...until one end closes, and then the proxy closes the other end too.
    late.shutdown(std::net::Shutdown::Write).unwrap();
    assert_closed(&mut late, "late");
    assert_echoes(&mut idle, b"still here");
    let mut fresh = connect(proxy.addr());
    assert_echoes(&mut fresh, b"pong");
    assert_eq!(received.load(Ordering::SeqCst), 8 + 10 + 4);
    assert_eq!(proxy.dropped_bytes(), 8 + 5);
}

/// A TCP server that echoes every connection and counts the bytes it got.
fn echo_server() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let count = received.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let count = count.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    count.fetch_add(n as u64, Ordering::SeqCst);
                    if conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, received)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to the proxy");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[track_caller]
fn assert_echoes(s: &mut TcpStream, bytes: &[u8]) {
    s.write_all(bytes).unwrap();
    let mut back = vec![0u8; bytes.len()];
    s.read_exact(&mut back).expect("the echo comes back");
    assert_eq!(back, bytes);
}

/// Nothing to read, and no end of stream or reset either.
#[track_caller]
fn assert_silent_and_open(s: &mut TcpStream, name: &str) {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("{name}: a black-holed connection must stay silent and open: {other:?}"),
    }
    s.set_nonblocking(false).unwrap();
}

/// An end of stream or a reset, within the read timeout.
#[track_caller]
fn assert_closed(s: &mut TcpStream, name: &str) {
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("{name}: a broken connection one end closed is closed: {other:?}"),
    }
}
