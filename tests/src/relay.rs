//! A TCP relay for fault injection: forwards connections to an upstream address and can cut
//! every open connection at once, or refuse new ones, on demand.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Relay {
    pub addr: SocketAddr,
    upstream: Arc<Mutex<Option<SocketAddr>>>,
    cut_tx: watch::Sender<u64>,
    stall_tx: watch::Sender<u64>,
    refuse: Arc<AtomicBool>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Binds on 127.0.0.1 with no upstream yet (connections are dropped until one is set).
    pub async fn bind() -> std::io::Result<Relay> {
        Self::bind_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Binds on `addr` (port 0: one chosen by the kernel) with no upstream yet.
    pub async fn bind_on(addr: SocketAddr) -> std::io::Result<Relay> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let upstream: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (cut_tx, cut_rx) = watch::channel(0u64);
        let (stall_tx, stall_rx) = watch::channel(0u64);
        let refuse = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let task = {
            let upstream = upstream.clone();
            let refuse = refuse.clone();
            let accepted = accepted.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((down, _)) = listener.accept().await else {
                        continue;
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let target = *upstream.lock().expect("relay lock");
                    if refuse.load(Ordering::Relaxed) {
                        drop(down);
                        continue;
                    }
                    let Some(target) = target else {
                        drop(down);
                        continue;
                    };
                    let mut cut = cut_rx.clone();
                    let mut stall = stall_rx.clone();
                    tokio::spawn(async move {
                        let Ok(up) = TcpStream::connect(target).await else {
                            return;
                        };
                        let _ = down.set_nodelay(true);
                        let _ = up.set_nodelay(true);
                        let (mut dr, mut dw) = down.into_split();
                        let (mut ur, mut uw) = up.into_split();
                        cut.borrow_and_update();
                        stall.borrow_and_update();
                        tokio::select! {
                            _ = tokio::io::copy(&mut dr, &mut uw) => {},
                            _ = tokio::io::copy(&mut ur, &mut dw) => {},
                            _ = cut.changed() => {},
                            _ = stall.changed() => {
                                // A silent drop: nothing is forwarded any more, nothing closed.
                                let _ = cut.changed().await;
                            },
                        }
                        // Dropping both halves closes both sockets.
                    });
                }
            })
        };
        Ok(Relay {
            addr,
            upstream,
            cut_tx,
            stall_tx,
            refuse,
            accepted,
            task,
        })
    }

    pub fn set_upstream(&self, a: SocketAddr) {
        *self.upstream.lock().expect("relay lock") = Some(a);
    }

    /// Cuts every connection open now.
    pub fn cut_all(&self) {
        self.cut_tx.send_modify(|v| *v += 1);
    }

    /// Stops forwarding on every connection open now without closing any (a silent drop, as a
    /// NAT or firewall that forgot the flow).
    pub fn stall_all(&self) {
        self.stall_tx.send_modify(|v| *v += 1);
    }

    /// Refuses (accepts and closes) new connections while `on`.
    pub fn refuse(&self, on: bool) {
        self.refuse.store(on, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
