//! A loopback TCP proxy in front of the API server that can be stalled: while stalled it accepts
//! connections and reads what clients send but forwards nothing either way, as a network that
//! holds packets; resumed, it drops what it held and every connection it had (a partition loses
//! what was in flight), and forwards again. Tests point one operator's kubeconfig at it to show
//! what that operator does when its requests hang.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// The proxy's state: forwarding, or stalled since the `u64`-th stall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Forwarding { epoch: u64 },
    Stalled { epoch: u64 },
}

/// A running stall proxy; stops when dropped.
#[derive(Debug)]
pub struct StallProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    held: Arc<AtomicU64>,
    _runtime: std::thread::JoinHandle<()>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl StallProxy {
    /// A proxy on a free loopback port forwarding to `upstream`. Blocking (it runs its own thread).
    pub fn start(upstream: SocketAddr) -> Result<Self> {
        let (mode, mode_rx) = watch::channel(Mode::Forwarding { epoch: 0 });
        let held = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let counted = held.clone();
        let runtime = std::thread::Builder::new().name("stall-proxy".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match TcpListener::bind(("127.0.0.1", 0)).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                let _ = ready_tx.send(listener.local_addr().map_err(Into::into));
                let accept = async {
                    while let Ok((client, _)) = listener.accept().await {
                        tokio::spawn(connection(client, upstream, mode_rx.clone(), counted.clone()));
                    }
                };
                tokio::select! {
                    () = accept => {}
                    _ = stopped => {}
                }
            });
        })?;
        let addr = ready_rx.recv().context("the stall proxy thread ended")??;
        Ok(Self { addr, mode, held, _runtime: runtime, _stop: stop })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Holds everything from now on.
    pub fn stall(&self) {
        self.mode.send_modify(|m| {
            if let Mode::Forwarding { epoch } = *m {
                *m = Mode::Stalled { epoch: epoch + 1 };
            }
        });
    }

    /// Drops what was held, and the connections that held it, and forwards again.
    pub fn resume(&self) {
        self.mode.send_modify(|m| {
            if let Mode::Stalled { epoch } = *m {
                *m = Mode::Forwarding { epoch };
            }
        });
    }

    /// Bytes clients sent while stalled (dropped, never delivered).
    pub fn held_bytes(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }
}

/// One client connection: forwarded both ways until a stall; from the stall on, what the client
/// sends is read and counted but dropped, and the connection ends when the proxy resumes.
async fn connection(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    held: Arc<AtomicU64>,
) {
    let started = *mode.borrow_and_update();
    let epoch = match started {
        Mode::Forwarding { epoch } => epoch,
        Mode::Stalled { epoch } => {
            swallow(&mut client, &mut mode, epoch, &held).await;
            return;
        }
    };
    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
    let stalled = {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        let (mut up, mut down) = ([0u8; 16 * 1024], [0u8; 16 * 1024]);
        // A stall that began while bytes were being read holds those bytes too: the mode is
        // checked first, and again between a read and its forwarding.
        let stalled_since = |mode: &watch::Receiver<Mode>| match *mode.borrow() {
            Mode::Stalled { epoch: stalled } if stalled > epoch => Some(stalled),
            _ => None,
        };
        loop {
            tokio::select! {
                biased;
                changed = mode.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if let Some(stalled) = stalled_since(&mode) {
                        break stalled;
                    }
                }
                read = client_read.read(&mut up) => match read {
                    Ok(n) if n > 0 => {
                        if let Some(stalled) = stalled_since(&mode) {
                            held.fetch_add(n as u64, Ordering::SeqCst);
                            break stalled;
                        }
                        if server_write.write_all(&up[..n]).await.is_err() {
                            return;
                        }
                    }
                    _ => return,
                },
                read = server_read.read(&mut down) => match read {
                    Ok(n) if n > 0 => {
                        if let Some(stalled) = stalled_since(&mode) {
                            break stalled;
                        }
                        if client_write.write_all(&down[..n]).await.is_err() {
                            return;
                        }
                    }
                    _ => return,
                },
            }
        }
    };
    drop(server);
    swallow(&mut client, &mut mode, stalled, &held).await;
}

/// Reads and drops what the client sends until the stall numbered `epoch` ends.
async fn swallow(client: &mut TcpStream, mode: &mut watch::Receiver<Mode>, epoch: u64, held: &AtomicU64) {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        if *mode.borrow_and_update() != (Mode::Stalled { epoch }) {
            return;
        }
        tokio::select! {
            read = client.read(&mut buffer) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    held.fetch_add(n as u64, Ordering::SeqCst);
                }
            },
            changed = mode.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An echo server, the proxy in front of it, and a round trip through both.
    async fn echo_once(stream: &mut TcpStream, text: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(text).await?;
        let mut got = vec![0u8; text.len()];
        stream.read_exact(&mut got).await?;
        Ok(got)
    }

    #[tokio::test]
    async fn a_stall_holds_both_ways_and_a_resume_drops_what_was_held() {
        let echo = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let upstream = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let proxy = tokio::task::spawn_blocking(move || StallProxy::start(upstream)).await.unwrap().unwrap();
        let mut held = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(echo_once(&mut held, b"ping").await.unwrap(), b"ping");

        proxy.stall();
        held.write_all(b"lost").await.unwrap();
        let mut buffer = [0u8; 4];
        let answer = tokio::time::timeout(Duration::from_millis(300), held.read(&mut buffer)).await;
        assert!(answer.is_err(), "nothing comes back while stalled");
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), echo_once(&mut fresh, b"new!")).await.is_err()
        );
        assert!(proxy.held_bytes() >= 8, "what clients sent was read and held: {}", proxy.held_bytes());

        proxy.resume();
        // The connections that held requests end: what they held is never delivered.
        let ended = tokio::time::timeout(Duration::from_secs(5), held.read(&mut buffer)).await.unwrap();
        assert!(matches!(ended, Ok(0) | Err(_)), "{ended:?}");
        let mut after = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(echo_once(&mut after, b"pong").await.unwrap(), b"pong");
    }
}
