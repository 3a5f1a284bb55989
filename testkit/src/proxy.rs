//! A TCP proxy a test can cut: one part loses a server (PostgreSQL, say) while everything else
//! keeps it.
//!
//! Stopping the shared PostgreSQL would take every test's database away, and would test a
//! restart rather than a network partition. Instead a part is pointed at a [`TcpProxy`] that
//! forwards to the real server; [`TcpProxy::cut`] closes every open connection through it and
//! makes it close new ones at once (as a dead link or a stopped server looks to a client: the
//! connection ends or never gets an answer), until [`TcpProxy::restore`].
//!
//! A cut connection is closed rather than held open silently: a client then notices at once
//! instead of after its own timeouts, which keeps the tests' timing about the product's lease
//! logic and not about TCP keep-alive.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A loopback TCP proxy to one upstream address. Dropping it closes everything.
pub struct TcpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    /// `true` while cut. Connection tasks watch it and close when it turns `true`.
    cut: watch::Sender<bool>,
    accepted: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    accept_task: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on `127.0.0.1:0` and forwards each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<TcpProxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.context("cannot bind the proxy")?;
        let addr = listener.local_addr().context("cannot read the proxy's address")?;
        let (cut, _) = watch::channel(false);
        let accepted = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let accept_task =
            tokio::spawn(accept_loop(listener, upstream, cut.clone(), accepted.clone(), refused.clone()));
        Ok(TcpProxy { addr, upstream, cut, accepted, refused, accept_task })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Closes every open connection and closes new ones as soon as they are accepted, until
    /// [`restore`](Self::restore).
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Forwards new connections again (connections cut earlier stay closed).
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }

    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }

    /// Connections forwarded so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections closed at once because the proxy was cut.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut.send_replace(true);
        self.accept_task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    cut: watch::Sender<bool>,
    accepted: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(_) => {
                // Out of descriptors or similar: pause rather than spin.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        if *cut.borrow() {
            refused.fetch_add(1, Ordering::Relaxed);
            drop(client);
            continue;
        }
        accepted.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(forward(client, upstream, cut.subscribe()));
    }
}

/// Copies both ways until either side closes or the proxy is cut; dropping both streams then
/// closes both connections.
async fn forward(mut client: TcpStream, upstream: SocketAddr, mut cut: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = cut.wait_for(|cut| *cut) => {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An upstream that echoes what it reads.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn echo(stream: &mut TcpStream, text: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(text).await?;
        let mut buf = vec![0; text.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf)).await??;
        Ok(buf)
    }

    /// Closed, not hung: a read on a cut connection returns at once.
    async fn is_closed(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn forwards_cuts_and_restores() -> anyhow::Result<()> {
        let proxy = TcpProxy::start(echo_server().await).await?;
        let mut first = TcpStream::connect(proxy.addr()).await?;
        assert_eq!(echo(&mut first, b"hello").await?, b"hello");

        proxy.cut();
        assert!(proxy.is_cut());
        assert!(is_closed(&mut first).await, "an open connection is closed by cut()");
        let mut during = TcpStream::connect(proxy.addr()).await?;
        assert!(is_closed(&mut during).await, "a new connection is closed while cut");
        assert!(proxy.refused() >= 1);

        proxy.restore();
        let mut after = TcpStream::connect(proxy.addr()).await?;
        assert_eq!(echo(&mut after, b"again").await?, b"again");
        assert_eq!(proxy.accepted(), 2);
        Ok(())
    }
}
