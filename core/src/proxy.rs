//! A cuttable, slowable TCP proxy for partition and latency tests: it forwards a listen port
//! to a target address; [`Proxy::cut`] drops every connection and refuses new ones (accepted,
//! then closed at once), [`Proxy::heal`] lets connections through again, and
//! [`Proxy::set_delay`] holds every chunk of bytes for a one-way delay in each direction (a
//! delay line: throughput is kept, latency grows), like a slow WAN link. Put it between two
//! tiers (the fog's `connect` endpoint pointing at the proxy) to rehearse a partition or a slow
//! link without root privileges.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// Chunks in flight per direction on the delay line.
const DELAY_LINE_CHUNKS_MAX: usize = 1024;

/// Forwards `from` to `to`, each chunk held until `delay_us` after it was read.
async fn delayed_copy(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay_us: Arc<AtomicU64>) {
    let (tx, mut rx) = mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(DELAY_LINE_CHUNKS_MAX);
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let due = tokio::time::Instant::now() + Duration::from_micros(delay_us.load(Ordering::Relaxed));
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
}

pub struct Proxy {
    pub listen: SocketAddr,
    cut: Arc<AtomicBool>,
    delay_us: Arc<AtomicU64>,
    /// Bumped at each cut: connections of an older generation end.
    generation: watch::Sender<u64>,
    pub connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on `listen` (port 0: any free port) and forwards to `target`. Must be called
    /// inside a tokio runtime that outlives the proxy.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(listen).await?;
        let listen = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let connections = Arc::new(AtomicU64::new(0));
        let delay_us = Arc::new(AtomicU64::new(0));
        let task = {
            let (cut, generation, connections, delay_us) = (cut.clone(), generation.clone(), connections.clone(), delay_us.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        // Out of file descriptors, say: not a busy loop.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    // The generation first, then the cut: a cut between the two still ends
                    // this connection (it bumps the generation after setting the cut).
                    let mut gen = generation.subscribe();
                    let born = *gen.borrow_and_update();
                    if cut.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    connections.fetch_add(1, Ordering::Relaxed);
                    let delay_us = delay_us.clone();
                    tokio::spawn(async move {
                        let Ok(outbound) = TcpStream::connect(target).await else { return };
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let (ri, wi) = inbound.into_split();
                        let (ro, wo) = outbound.into_split();
                        let pump = async {
                            tokio::select! {
                                _ = delayed_copy(ri, wo, delay_us.clone()) => {}
                                _ = delayed_copy(ro, wi, delay_us) => {}
                            }
                        };
                        tokio::select! {
                            _ = pump => {}
                            _ = async { while gen.changed().await.is_ok() { if *gen.borrow() != born { break; } } } => {}
                        }
                        // Dropping both halves closes both connections.
                    });
                }
            })
        };
        Ok(Proxy { listen, cut, delay_us, generation, connections, task })
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Holds every byte for `one_way` in each direction from now on (zero: no delay).
    pub fn set_delay(&self, one_way: Duration) {
        self.delay_us.store(one_way.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}
