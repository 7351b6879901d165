//! The engine against real HTTP servers: our own static server, the same server with injected
//! faults, and nginx (the origin most users have). nginx is required when CI=true.

mod common;

use common::{config, pattern};
use lazy_image_engine::source::HttpSourceOptions;
use lazy_image_engine::{ErrorKind, HttpSource, LazyImage, RangeSource};
use lazy_image_serve::{Faults, ServerHandle};
use std::path::Path;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

const SIZE: usize = 3 << 20;

async fn serve(dir: &Path, faults: Option<Arc<Faults>>) -> ServerHandle {
    lazy_image_serve::spawn(dir, "127.0.0.1:0".parse().unwrap(), faults).await.unwrap()
}

fn write_image(dir: &Path, seed: u64) -> Vec<u8> {
    let data = pattern(SIZE, seed);
    std::fs::write(dir.join("image.img"), &data).unwrap();
    data
}

fn source(url: &str) -> Arc<dyn RangeSource> {
    Arc::new(HttpSource::new(url, Default::default()).unwrap())
}

#[tokio::test]
async fn suite_own_server() {
    let d = tempfile::tempdir().unwrap();
    let data = write_image(d.path(), 1);
    let srv = serve(d.path(), None).await;
    common::source_suite(source(&srv.url("image.img")), &data).await;
}

/// The same suite with every range read through reqwest, as for https or behind a proxy.
#[tokio::test]
async fn suite_own_server_through_reqwest() {
    let d = tempfile::tempdir().unwrap();
    let data = write_image(d.path(), 1);
    let srv = serve(d.path(), None).await;
    let opts = HttpSourceOptions { own_http1: false, ..Default::default() };
    common::source_suite(Arc::new(HttpSource::new(&srv.url("image.img"), opts).unwrap()), &data).await;
}

/// Bodies in chunked encoding are read through reqwest.
#[tokio::test]
async fn chunked_bodies_are_read_too() {
    let d = tempfile::tempdir().unwrap();
    let data = write_image(d.path(), 4);
    let faults = Arc::new(Faults::new());
    faults.chunked.store(true, SeqCst);
    let srv = serve(d.path(), Some(faults.clone())).await;
    let cache = tempfile::tempdir().unwrap();
    let img = LazyImage::open(source(&srv.url("image.img")), config(cache.path())).await.unwrap();
    let got = img.read(0, SIZE as u64).await.expect("read chunked bodies");
    assert!(got[..] == data[..], "bytes differ");
    assert_eq!(img.stats().retries, 0, "not read as a failure");
}

/// Runs a cold whole-image read through a server that suffers `arm` and checks every byte.
async fn survives(arm: impl Fn(&Faults)) -> u64 {
    let d = tempfile::tempdir().unwrap();
    let data = write_image(d.path(), 2);
    let faults = Arc::new(Faults::new());
    let srv = serve(d.path(), Some(faults.clone())).await;
    let cache = tempfile::tempdir().unwrap();
    let img = LazyImage::open(source(&srv.url("image.img")), config(cache.path())).await.unwrap();
    arm(&faults);
    let got = img.read(0, SIZE as u64).await.expect("read through faults");
    assert!(got[..] == data[..], "bytes differ");
    img.stats().retries
}

#[tokio::test]
async fn dropped_connections_are_retried() {
    assert!(survives(|f| f.drop_connection.store(3, SeqCst)).await >= 3);
}

#[tokio::test]
async fn bursts_of_5xx_are_retried() {
    assert!(survives(|f| f.status_5xx.store(4, SeqCst)).await >= 4);
}

#[tokio::test]
async fn truncated_bodies_are_retried() {
    assert!(survives(|f| f.truncate.store(2, SeqCst)).await >= 2);
}

/// A body cut short is asked for again from where it stopped, not from its start: the bytes
/// that came are kept (readers may already have them).
#[tokio::test]
async fn truncated_bodies_resume_where_they_stopped() {
    let d = tempfile::tempdir().unwrap();
    let data = write_image(d.path(), 3);
    let faults = Arc::new(Faults::new());
    let srv = serve(d.path(), Some(faults.clone())).await;
    let cache = tempfile::tempdir().unwrap();
    // One request for the whole image, so the server has sent several pieces before the cut.
    let mut cfg = config(cache.path());
    cfg.max_request = SIZE as u64;
    let img = LazyImage::open(source(&srv.url("image.img")), cfg).await.unwrap();
    let before = faults.ranges().len();
    faults.truncate.store(1, SeqCst);
    let got = img.read(0, SIZE as u64).await.expect("read through a truncated body");
    assert!(got[..] == data[..], "bytes differ");
    let asked = faults.ranges()[before..].to_vec();
    let end = SIZE - 1;
    assert_eq!(asked.first(), Some(&format!("bytes=0-{end}")), "{asked:?}");
    assert_eq!(asked.len(), 2, "one cut request and one resumption: {asked:?}");
    // The server stops at half the body; the retry asks for what did not arrive.
    let from: usize = asked[1].strip_prefix("bytes=").and_then(|r| r.strip_suffix(&format!("-{end}"))).unwrap().parse().unwrap();
    assert!(from > 0 && from <= SIZE / 2, "resumed at {from}: {asked:?}");
}

#[tokio::test]
async fn wrong_content_range_is_retried_not_served() {
    assert!(survives(|f| f.wrong_content_range.store(2, SeqCst)).await >= 2);
}

#[tokio::test]
async fn slow_responses_still_complete() {
    assert_eq!(survives(|f| f.delay_ms.store(30, SeqCst)).await, 0);
}

#[tokio::test]
async fn server_ignoring_range_is_refused_at_probe() {
    let d = tempfile::tempdir().unwrap();
    write_image(d.path(), 3);
    let faults = Arc::new(Faults::new());
    faults.ignore_range.store(true, SeqCst);
    let srv = serve(d.path(), Some(faults.clone())).await;
    let cache = tempfile::tempdir().unwrap();
    let e = LazyImage::open(source(&srv.url("image.img")), config(cache.path())).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::RangeUnsupported);
    assert!(e.to_string().contains("Range"), "{e}");
}

#[tokio::test]
async fn server_that_stops_honouring_range_fails_reads() {
    let d = tempfile::tempdir().unwrap();
    write_image(d.path(), 4);
    let faults = Arc::new(Faults::new());
    let srv = serve(d.path(), Some(faults.clone())).await;
    let cache = tempfile::tempdir().unwrap();
    let img = LazyImage::open(source(&srv.url("image.img")), config(cache.path())).await.unwrap();
    faults.ignore_range.store(true, SeqCst);
    assert_eq!(img.read(0, 10).await.unwrap_err().kind(), ErrorKind::RangeUnsupported);
}

#[tokio::test]
async fn etag_change_midway_stops_serving_new_bytes() {
    let d = tempfile::tempdir().unwrap();
    let data = write_image(d.path(), 5);
    let faults = Arc::new(Faults::new());
    let srv = serve(d.path(), Some(faults.clone())).await;
    let cache = tempfile::tempdir().unwrap();
    let img = LazyImage::open(source(&srv.url("image.img")), config(cache.path())).await.unwrap();
    assert_eq!(&img.read(0, 100).await.unwrap()[..], &data[..100]);
    faults.set_etag("\"republished\"");
    let e = img.read(2 << 20, 100).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OriginChanged);
    assert!(img.condition().abnormal);
}

#[tokio::test]
async fn missing_image_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let srv = serve(d.path(), None).await;
    let cache = tempfile::tempdir().unwrap();
    let e = LazyImage::open(source(&srv.url("nope.img")), config(cache.path())).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::OriginStatus(404));
}

/// Starts nginx on a free loopback port serving `root`; None when nginx is not installed and we
/// are not in CI (in CI a missing nginx is a failure, not a skip).
fn nginx(root: &Path) -> Option<(std::process::Child, String)> {
    let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().find(|p| Path::new(p).exists());
    let Some(bin) = bin else {
        assert!(std::env::var_os("CI").is_none(), "nginx is required in CI (apt-get install nginx)");
        eprintln!("nginx not installed: skipping");
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let conf = root.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off; master_process off; worker_processes 1; pid {r}/nginx.pid; error_log {r}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{ access_log off; client_body_temp_path {r}; proxy_temp_path {r}; fastcgi_temp_path {r}; uwsgi_temp_path {r}; scgi_temp_path {r};\n\
             server {{ listen 127.0.0.1:{port}; root {r}; }} }}\n",
            r = root.display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(bin).arg("-c").arg(&conf).arg("-p").arg(root).spawn().unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((child, format!("http://127.0.0.1:{port}")));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("nginx did not start; see {}/error.log", root.display());
}

#[tokio::test]
async fn suite_nginx() {
    let d = tempfile::tempdir().unwrap();
    let data = write_image(d.path(), 6);
    let Some((mut child, base)) = nginx(d.path()) else { return };
    common::source_suite(source(&format!("{base}/image.img")), &data).await;
    // nginx's strong ETag pins the version: rewriting the file is detected.
    let cache = tempfile::tempdir().unwrap();
    let img = LazyImage::open(source(&format!("{base}/image.img")), config(cache.path())).await.unwrap();
    img.read(0, 10).await.unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    std::fs::write(d.path().join("image.img"), pattern(SIZE, 7)).unwrap();
    assert_eq!(img.read(SIZE as u64 - 10, 10).await.unwrap_err().kind(), ErrorKind::OriginChanged);
    let _ = child.kill();
    let _ = child.wait();
}

/// A pinned image's manifest comes from the same private origin as the image: it is fetched with
/// the image's credentials (refused without them, and not retried then), and an origin that
/// fails for a moment is tried again.
#[tokio::test]
async fn manifest_fetch_sends_credentials_and_retries() {
    use http::header::{HeaderMap, HeaderValue, AUTHORIZATION};
    use lazy_image_engine::{resolve_manifest, Manifest};
    let dir = tempfile::tempdir().unwrap();
    let data = write_image(dir.path(), 9);
    let m = Manifest::build(&data[..], 64 << 10, |_| {}).unwrap();
    std::fs::write(dir.path().join("image.img.manifest"), m.to_bytes()).unwrap();
    let faults = Arc::new(Faults::new());
    *faults.require_auth.lock().unwrap() = Some("Bearer s3cret".into());
    let server = serve(dir.path(), Some(faults.clone())).await;
    let url = server.url("image.img");
    let digest = m.digest();

    let e = resolve_manifest(&url, None, Some(&digest), &Default::default()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OriginStatus(401), "{}", e.report());
    assert_eq!(faults.requests.load(SeqCst), 1, "a refusal is not retried");

    faults.status_5xx.store(2, SeqCst);
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
    let opts = HttpSourceOptions { headers, ..Default::default() };
    let got = resolve_manifest(&url, None, Some(&digest), &opts).await.unwrap().expect("a manifest");
    assert_eq!(got.digest(), digest);
    assert_eq!(faults.requests.load(SeqCst), 5, "two 503s, then the probe and the manifest");
}

/// A manifest is bounded in size before anything is read into memory, wherever it lives.
#[tokio::test]
async fn oversized_manifest_is_refused_before_it_is_read() {
    use lazy_image_engine::{load_manifest, MAX_MANIFEST_BYTES};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.manifest");
    std::fs::File::create(&path).unwrap().set_len(MAX_MANIFEST_BYTES + 1).unwrap();
    let e = load_manifest(path.to_str().unwrap(), None, &Default::default()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{}", e.report());
    assert!(e.report().contains("more than the"), "{}", e.report());
    let missing = dir.path().join("none.manifest");
    let e = load_manifest(&format!("file://{}", missing.display()), None, &Default::default()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{}", e.report());
}
