//! A TCP proxy that delays every piece of data by a fixed time in each direction, so benchmarks on
//! loopback see a round trip like a real network's (this kernel has no netem). Data keeps flowing
//! while earlier pieces wait out their delay; an optional per-connection rate limit slows the
//! server-to-client direction (crash tests need a fill that takes seconds).

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// `rate`: bytes per second per connection from upstream to client; `None` is unlimited.
pub async fn run(listen: SocketAddr, upstream: SocketAddr, delay: Duration, rate: Option<u64>) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (client, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else { return };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(pipe(cr, sw, delay, None), pipe(sr, cw, delay, rate));
        });
    }
}

/// Largest piece read at once. Pieces are reused, never zeroed: on loopback this proxy shares the
/// CPU with both ends, and a benchmark's delay should cost them as little of it as netem would.
const PIECE: usize = 256 << 10;
/// Pieces waiting out their delay per direction (with `PIECE`, at most 256 MiB).
const PIECES_IN_FLIGHT: usize = 1024;

async fn pipe(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay: Duration, rate: Option<u64>) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(PIECES_IN_FLIGHT);
    // Written pieces go back to the reader for reuse.
    let (spare_tx, mut spare_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let reader = async move {
        loop {
            let mut buf = spare_rx.try_recv().unwrap_or_else(|_| Vec::with_capacity(PIECE));
            buf.clear();
            match from.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Some(r) = rate.filter(|r| *r > 0) {
                        tokio::time::sleep(Duration::from_secs_f64(n as f64 / r as f64)).await;
                    }
                    if tx.send((Instant::now() + delay, buf)).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((at, buf)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&buf).await.is_err() {
                break;
            }
            let _ = spare_tx.send(buf);
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
