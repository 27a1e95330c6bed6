//! A user-space TCP proxy that can cut a link silently, for network faults.
//!
//! [`Proxy::start`] listens on a fresh loopback port and forwards every
//! connection it accepts to its target, both ways, chunk by chunk. All
//! proxies of a test process share one small tokio runtime: one task per
//! connection, so HTTP/2 connections that live for the whole test and many
//! connections at once cost little.
//!
//! [`Proxy::blackhole`]`(true)` is a router dropping packets: from then on
//! every byte that arrives, in either direction, is read and dropped, and
//! nothing is closed or reset — a FIN or a reset from one end is dropped
//! too. The ends see silence, not an error. New connections are still
//! accepted (a user-space proxy cannot drop the SYN of a port it listens
//! on), but nothing is forwarded on them either.
//!
//! [`Proxy::blackhole`]`(false)` heals the link: new connections are
//! forwarded again, and so are connections that carried nothing during the
//! black hole. A connection that lost bytes, or was accepted during the
//! black hole, is a broken byte stream: the proxy has consumed (and, to the
//! sender's TCP, acknowledged) bytes it never delivered, so nothing after
//! the gap can be delivered either. It stays silent after the heal, and is
//! closed (both ends) only once one of its ends closes it. On a real network
//! such a connection would resume at TCP's next retransmission, which after
//! a long outage comes seconds to minutes later; the proxy makes it never
//! resume, which is harsher: a node must notice a dead connection itself
//! (deadlines, keepalive) and dial a new one, whatever TCP would do.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::task::AbortHandle;

/// One proxied link: a listening port and the connections it carries.
pub struct Proxy {
    /// Where it listens (loopback).
    addr: SocketAddr,
    /// Where it forwards to.
    target: SocketAddr,
    shared: Arc<Shared>,
    /// The accept loop, aborted by [`Proxy::stop`].
    accept: AbortHandle,
}

/// What the accept loop, the connection tasks and the controls share.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Bytes dropped so far, for tests that need to know the drop happened.
    dropped: AtomicU64,
}

/// Everything a forwarding decision depends on, under one lock, so that a
/// heal and the chunk decisions of the connections it closes cannot
/// interleave: once a broken connection is gone from `conns`, no chunk of
/// it is forwarded.
#[derive(Default)]
struct State {
    blackholed: bool,
    /// Set by `stop`: no connection is accepted any more.
    stopped: bool,
    next_id: u64,
    conns: HashMap<u64, Conn>,
}

struct Conn {
    /// This connection lost bytes (or was accepted during a black hole):
    /// it never forwards again and is closed at the heal.
    broken: bool,
    /// Its task, to close it (dropping the task drops both sockets). None
    /// for the instant between registration and spawning.
    task: Option<AbortHandle>,
}

/// What to do with a chunk (or an end of stream) just read.
enum Verdict {
    Forward,
    Drop,
    /// The connection was closed by a heal or a stop: end its task.
    Gone,
}

/// The runtime all proxies run on; it lives as long as the test process.
fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-proxy")
            .enable_all()
            .build()
            .expect("the proxies' tokio runtime")
    })
}

impl Proxy {
    /// Listens on a fresh loopback port and forwards every connection to
    /// `target`. Returns once it listens.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = super::fresh_listener();
        let addr = listener.local_addr().expect("local_addr");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let rt = runtime();
        let _in_runtime = rt.enter();
        let listener = TcpListener::from_std(listener).expect("a tokio listener");
        let shared = Arc::new(Shared::default());
        let accept = rt
            .spawn(accept_loop(listener, target, shared.clone()))
            .abort_handle();
        Proxy {
            addr,
            target,
            shared,
            accept,
        }
    }

    /// The address to connect to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// On: drop every byte from now on, closing nothing. Off: forward again
    /// on connections that lost nothing and on new ones (see the module doc).
    pub fn blackhole(&self, on: bool) {
        self.shared.lock().blackholed = on;
    }

    /// Bytes dropped so far, both directions, all connections.
    pub fn dropped_bytes(&self) -> u64 {
        self.shared.dropped.load(Ordering::SeqCst)
    }

    /// Stops listening and closes every connection. Also done on drop.
    pub fn stop(&self) {
        self.accept.abort();
        let tasks: Vec<AbortHandle> = {
            let mut st = self.shared.lock();
            st.stopped = true;
            st.conns.drain().filter_map(|(_, c)| c.task).collect()
        };
        for task in tasks {
            task.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection's id; None once stopped.
    fn register(&self) -> Option<u64> {
        let mut st = self.lock();
        if st.stopped {
            return None;
        }
        let id = st.next_id;
        st.next_id += 1;
        let broken = st.blackholed;
        st.conns.insert(id, Conn { broken, task: None });
        Some(id)
    }

    /// Hands connection `id` its task, or ends the task at once if the
    /// connection was closed meanwhile.
    fn set_task(&self, id: u64, task: AbortHandle) {
        match self.lock().conns.get_mut(&id) {
            Some(c) => c.task = Some(task),
            None => task.abort(),
        }
    }

    fn forget(&self, id: u64) {
        self.lock().conns.remove(&id);
    }

    fn broken(&self, id: u64) -> bool {
        self.lock().conns.get(&id).is_none_or(|c| c.broken)
    }

    fn blackholed(&self) -> bool {
        self.lock().blackholed
    }

    /// Decides about `len` bytes (0: an end of stream) just read on `id`.
    fn verdict(&self, id: u64, len: usize) -> Verdict {
        let mut st = self.lock();
        let blackholed = st.blackholed;
        let Some(c) = st.conns.get_mut(&id) else {
            return Verdict::Gone;
        };
        if blackholed || c.broken {
            c.broken = true;
            self.dropped.fetch_add(len as u64, Ordering::SeqCst);
            Verdict::Drop
        } else {
            Verdict::Forward
        }
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            // Out of file descriptors or the like: try again shortly.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(id) = shared.register() else {
            return;
        };
        let task = tokio::spawn(serve(shared.clone(), id, client, target));
        shared.set_task(id, task.abort_handle());
    }
}

/// Carries one connection until both ends have closed it, or until a heal
/// or a stop closes it.
async fn serve(shared: Arc<Shared>, id: u64, client: TcpStream, target: SocketAddr) {
    // Raft messages are small and latency-bound, as on the node's own sockets.
    let _ = client.set_nodelay(true);
    let upstream = match shared.verdict(id, 0) {
        Verdict::Forward => TcpStream::connect(target).await.ok(),
        Verdict::Drop => None,
        Verdict::Gone => return,
    };
    let (client_in, client_out) = client.into_split();
    match upstream {
        Some(upstream) => {
            let _ = upstream.set_nodelay(true);
            let (upstream_in, upstream_out) = upstream.into_split();
            let to_target = pump(&shared, id, client_in, Some(upstream_out));
            let to_client = pump(&shared, id, upstream_in, Some(client_out));
            tokio::pin!(to_target, to_client);
            // A healthy connection ends when both directions have (git and
            // HTTP/2 may half-close); a broken one when either end closes.
            tokio::select! {
                _ = &mut to_target => if !shared.broken(id) { to_client.await },
                _ = &mut to_client => if !shared.broken(id) { to_target.await },
            }
        }
        // Nothing listens at the target (its node is down): close at once,
        // as a refused connection would be.
        None if matches!(shared.verdict(id, 0), Verdict::Forward) => {}
        // Black-holed from the start: swallow what the client sends.
        None => pump(&shared, id, client_in, None).await,
    }
    shared.forget(id);
}

/// Copies `from` to `to` chunk by chunk, asking for a verdict on each; `to`
/// is None on a connection that never reached its target.
async fn pump(shared: &Shared, id: u64, mut from: OwnedReadHalf, mut to: Option<OwnedWriteHalf>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // An error (a reset) ends the stream like an end of file does.
        let len = from.read(&mut buf).await.unwrap_or(0);
        match (shared.verdict(id, len), to.as_mut()) {
            (Verdict::Forward, Some(to)) if len > 0 => {
                if to.write_all(&buf[..len]).await.is_err() {
                    return;
                }
            }
            // The end of this direction: pass the half-close on.
            (Verdict::Forward, Some(to)) => {
                let _ = to.shutdown().await;
                return;
            }
            (Verdict::Drop, _) if len > 0 => {}
            // The end of the stream, dropped like any packet while the black
            // hole lasts (the other end hears nothing); after the heal it is
            // the FIN arriving at last, and the connection closes.
            (Verdict::Drop, _) => {
                while shared.blackholed() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                return;
            }
            (Verdict::Forward, None) | (Verdict::Gone, _) => return,
        }
    }
}
