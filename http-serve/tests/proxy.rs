//! The delaying proxy: every byte arrives, in order, no sooner than its delay each way, and a
//! closed direction is passed on.

use lazy_image_serve::proxy;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that echoes each connection back and closes once the client has stopped sending.
async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn start_proxy(delay: Duration, rate: Option<u64>) -> std::net::SocketAddr {
    let upstream = echo_server().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(proxy::serve(listener, upstream, delay, rate));
    addr
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8).collect()
}

/// Sends `data`, closes the sending side, and returns what came back (until the proxy passed on
/// the upstream's close) and when its first byte arrived.
async fn round_trip(addr: std::net::SocketAddr, data: Vec<u8>) -> (Vec<u8>, Duration) {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut r, mut w) = s.into_split();
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        w.write_all(&data).await.expect("send");
        w.shutdown().await.expect("shutdown");
    });
    let mut first = [0u8; 1];
    r.read_exact(&mut first).await.expect("first byte");
    let at = start.elapsed();
    let mut back = first.to_vec();
    // Ends only if the upstream's close was passed on.
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut back))
        .await
        .expect("the proxy did not pass on the end of the stream")
        .expect("read back");
    sender.await.expect("sender");
    (back, at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_byte_arrives_in_order_a_round_trip_later() {
    let delay = Duration::from_millis(40);
    let addr = start_proxy(delay, None).await;
    let data = pattern(24 << 20);
    // Several connections at once, as a reader's parallel requests go.
    let trips: Vec<_> = (0..4).map(|_| tokio::spawn(round_trip(addr, data.clone()))).collect();
    for t in trips {
        let (back, first_at) = t.await.expect("round trip");
        assert!(back.len() == data.len() && back == data, "{} bytes back of {}, or in the wrong order", back.len(), data.len());
        assert!(first_at >= 2 * delay, "first byte back after {first_at:?}, before one round trip");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_slows_the_way_back() {
    let addr = start_proxy(Duration::ZERO, Some(4 << 20)).await;
    let data = pattern(2 << 20);
    let start = Instant::now();
    let (back, _) = round_trip(addr, data.clone()).await;
    assert!(back == data, "wrong bytes back");
    assert!(start.elapsed() >= Duration::from_millis(400), "2 MiB at 4 MiB/s came back in {:?}", start.elapsed());
}
