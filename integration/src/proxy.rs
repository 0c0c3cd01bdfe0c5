//! A cuttable TCP proxy for partition tests: it forwards a listen port to a target address;
//! [`Proxy::cut`] drops every connection and refuses new ones (accepted, then closed at
//! once), [`Proxy::heal`] lets connections through again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub listen: SocketAddr,
    cut: Arc<AtomicBool>,
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
        let task = {
            let (cut, generation, connections) = (cut.clone(), generation.clone(), connections.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else { continue };
                    if cut.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    connections.fetch_add(1, Ordering::Relaxed);
                    let mut gen = generation.subscribe();
                    let born = *gen.borrow_and_update();
                    tokio::spawn(async move {
                        let Ok(outbound) = TcpStream::connect(target).await else { return };
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let (mut ri, mut wi) = inbound.into_split();
                        let (mut ro, mut wo) = outbound.into_split();
                        let pump = async {
                            tokio::select! {
                                _ = tokio::io::copy(&mut ri, &mut wo) => {}
                                _ = tokio::io::copy(&mut ro, &mut wi) => {}
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
        Ok(Proxy { listen, cut, generation, connections, task })
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
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
