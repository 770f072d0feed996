//! A TCP relay the harness controls: one portal reaches one member through
//! it. `stall` stops forwarding bytes (both ways) for a while; `cut` closes
//! every relayed connection and, for a while, accepts new ones only to close
//! them at once; `StallNew` keeps relaying the connections already open but
//! holds every new one without a byte either way (a member whose accept
//! path is wedged, or a middlebox that blackholes new flows).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::common::free_port;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Forward,
    Stall,
    Cut,
    StallNew,
}

/// A relay from `127.0.0.1:port` to `127.0.0.1:target`. Stops when dropped.
pub struct Relay {
    pub port: u16,
    mode: Arc<watch::Sender<Mode>>,
    /// Bumped at each cut: every connection of an older generation closes.
    cuts: Arc<watch::Sender<u64>>,
    stop: CancellationToken,
}

impl Relay {
    pub async fn start(target: u16) -> Relay {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind relay");
        let (mode, _) = watch::channel(Mode::Forward);
        let (cuts, _) = watch::channel(0u64);
        let relay = Relay {
            port,
            mode: Arc::new(mode),
            cuts: Arc::new(cuts),
            stop: CancellationToken::new(),
        };
        let (mode, cuts, stop) = (relay.mode.clone(), relay.cuts.clone(), relay.stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stop.cancelled() => return,
                };
                let Ok((client, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                match *mode.borrow() {
                    Mode::Cut => {
                        drop(client);
                        continue;
                    }
                    Mode::StallNew => {
                        // Held open, silent, until the fault heals.
                        let mut held = mode.subscribe();
                        tokio::spawn(async move {
                            let _ = held.wait_for(|m| *m != Mode::StallNew).await;
                            drop(client);
                        });
                        continue;
                    }
                    Mode::Forward | Mode::Stall => {}
                }
                let (mode, cuts, stop) = (mode.subscribe(), cuts.subscribe(), stop.clone());
                tokio::spawn(async move {
                    let _ = relay_one(client, target, mode, cuts, stop).await;
                });
            }
        });
        relay
    }

    /// Stops forwarding (stall) or cuts, until `resume`.
    pub fn set(&self, mode: Mode) {
        if mode == Mode::Cut {
            self.cuts.send_modify(|g| *g += 1);
        }
        self.mode.send_replace(mode);
    }

    pub fn resume(&self) {
        self.mode.send_replace(Mode::Forward);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn relay_one(
    client: TcpStream,
    target: u16,
    mode: watch::Receiver<Mode>,
    mut cuts: watch::Receiver<u64>,
    stop: CancellationToken,
) -> io::Result<()> {
    client.set_nodelay(true)?;
    cuts.borrow_and_update();
    let server = tokio::time::timeout(
        Duration::from_secs(2),
        TcpStream::connect(("127.0.0.1", target)),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "relay connect"))??;
    server.set_nodelay(true)?;
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::select! {
        _ = pump(cr, sw, mode.clone()) => {}
        _ = pump(sr, cw, mode) => {}
        _ = cuts.changed() => {}
        _ = stop.cancelled() => {}
    }
    Ok(())
}

/// Copies bytes from `from` to `to`; while the mode is `Stall`, holds what
/// it read (and reads no more) until the mode changes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        loop {
            let now = *mode.borrow_and_update();
            match now {
                Mode::Forward | Mode::StallNew => break,
                Mode::Cut => return Ok(()),
                Mode::Stall => {
                    if mode.changed().await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
        to.write_all(&buf[..n]).await?;
    }
}
