//! The peer port's accept loop, bounded: at most `cap` connections are
//! open at once, and a connection that has not made a member's call (the
//! secret, the cluster id, a member's id and certificate) within
//! [`VOUCHED_WITHIN`] is closed. When the cap is
//! reached, the oldest connection not vouched for yet makes room for the
//! newcomer; a real peer calls at once, so a flood of connections that are
//! idle, or say a few bytes, or make calls without the secret, can neither
//! exhaust the node's file descriptors nor keep its peers out.

use std::collections::{BTreeMap, HashMap};
use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::access::REFUSALS;

/// How long a new connection has to make a member's call.
pub const VOUCHED_WITHIN: Duration = Duration::from_secs(5);

/// One accepted connection, as the accept loop sees it.
#[derive(Default)]
struct Slot {
    /// A call on it passed the peer gate.
    vouched: AtomicBool,
    evicted: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Slot {
    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        if let Some(w) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            w.wake();
        }
    }
}

#[derive(Default)]
struct Slots {
    next: u64,
    /// In order of arrival.
    open: BTreeMap<u64, Arc<Slot>>,
    /// Which slot a connection (local, remote address) holds, for the
    /// peer API to vouch.
    by_addr: HashMap<(SocketAddr, SocketAddr), u64>,
}

/// The peer API's handle on the accept loop: marks a connection as a
/// member's.
#[derive(Clone, Default)]
pub struct Vouch(Arc<Mutex<Slots>>);

impl Vouch {
    /// The connection (`local`, `remote`) made a call that passed the
    /// secret, the cluster id and the member check.
    pub fn vouch(&self, local: SocketAddr, remote: SocketAddr) {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = s
            .by_addr
            .get(&(local, remote))
            .and_then(|id| s.open.get(id))
        {
            slot.vouched.store(true, Ordering::Release);
        }
    }
}

/// A connection counted against the cap until it is dropped.
pub struct Bounded {
    stream: TcpStream,
    slot: Arc<Slot>,
    id: u64,
    addrs: Option<(SocketAddr, SocketAddr)>,
    slots: Arc<Mutex<Slots>>,
    silence: Pin<Box<tokio::time::Sleep>>,
}

impl Drop for Bounded {
    fn drop(&mut self) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.open.remove(&self.id);
        if let Some(addrs) = self.addrs {
            if slots.by_addr.get(&addrs) == Some(&self.id) {
                slots.by_addr.remove(&addrs);
            }
        }
    }
}

impl Connected for Bounded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl Bounded {
    /// Err once the connection was evicted or its time to be vouched for
    /// ran out. Checked on writes too: a peer that stops reading (a zero
    /// window) keeps hyper in a write, never in a read.
    fn still_admitted(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.slot.evicted.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room",
            ));
        }
        if !self.slot.vouched.load(Ordering::Acquire) {
            *self.slot.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
            if self.silence.as_mut().poll(cx).is_ready() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no member's call in time",
                ));
            }
        }
        Ok(())
    }
}

impl AsyncRead for Bounded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.still_admitted(cx)?;
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Bounded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.still_admitted(cx)?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.still_admitted(cx)?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.still_admitted(cx)?;
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts on `listener` for as long as the returned stream is polled,
/// holding at most `cap` connections open.
pub fn bounded(
    listener: TcpListener,
    cap: usize,
    vouch: Vouch,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Bounded>> {
    let (tx, rx) = mpsc::channel(16);
    let slots = vouch.0;
    tokio::spawn(async move {
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors (other files count too) or a
                    // connection reset before it was accepted: wait a
                    // little, never spin, never stop listening.
                    if REFUSALS.allow("accept") {
                        tracing::warn!(error = %e, "peer port cannot accept");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Raft and pack traffic is many small messages: Nagle's
            // algorithm against delayed ACKs would add ~40 ms a round trip.
            let _ = stream.set_nodelay(true);
            let addrs = stream.local_addr().ok().map(|local| (local, remote));
            let admitted = {
                let mut s = slots.lock().unwrap_or_else(|e| e.into_inner());
                if s.open.len() >= cap {
                    let silent = s
                        .open
                        .iter()
                        .find(|(_, slot)| {
                            !slot.vouched.load(Ordering::Acquire)
                                && !slot.evicted.load(Ordering::Acquire)
                        })
                        .map(|(&id, slot)| (id, slot.clone()));
                    if let Some((id, slot)) = silent {
                        slot.evict();
                        s.open.remove(&id);
                    }
                }
                (s.open.len() < cap).then(|| {
                    let id = s.next;
                    s.next += 1;
                    let slot = Arc::new(Slot::default());
                    s.open.insert(id, slot.clone());
                    if let Some(addrs) = addrs {
                        s.by_addr.insert(addrs, id);
                    }
                    (id, slot)
                })
            };
            let Some((id, slot)) = admitted else {
                if REFUSALS.allow("peer connections full") {
                    tracing::warn!(cap, "peer port full: connection refused");
                }
                continue; // dropped: closed at once
            };
            let conn = Bounded {
                stream,
                slot,
                id,
                addrs,
                slots: slots.clone(),
                silence: Box::pin(tokio::time::sleep(VOUCHED_WITHIN)),
            };
            if tx.send(Ok(conn)).await.is_err() {
                return; // the server stopped
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
