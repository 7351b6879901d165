//! What the lazy-image CSI node plugin and controller share: the volume attributes (one parser
//! for the context the controller returns and the node plugin stages from), volume ids, and the
//! `:authority` fix every gRPC server on a Unix socket needs.

pub mod attributes;
pub mod fake_api;
pub mod node_cache;
pub mod reports;
pub mod uds_authority;

/// The CSI driver name.
pub const DRIVER_NAME: &str = "lazy-image.csi.dev";

/// A bound on each request to the Kubernetes API server: a stuck one fails, and its caller
/// tries again later.
pub const API_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// `f`, a request to the API server, within `API_TIMEOUT`; a failure is a sentence naming
/// `what` was being done.
pub async fn api_call<T>(what: &str, f: impl std::future::Future<Output = Result<T, kube::Error>>) -> Result<T, String> {
    match tokio::time::timeout(API_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {} s", API_TIMEOUT.as_secs())),
    }
}

/// A CRD generated from the Rust types `K`, as YAML, as the chart installs it.
pub fn crd_yaml<K: kube::CustomResourceExt>() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&K::crd())
}

/// The chart's checked-in copy of a CRD (`rel`: its path from the repository root; empty if
/// missing), for the tests that keep it equal to the types.
pub fn checked_in_crd(rel: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(rel)).unwrap_or_default()
}

/// The Unix socket path of an endpoint `unix:///a/b.sock` (or a plain absolute path).
pub fn socket_path(endpoint: &str) -> Result<std::path::PathBuf, String> {
    let p = endpoint.strip_prefix("unix://").or_else(|| endpoint.strip_prefix("unix:")).unwrap_or(endpoint);
    if !p.starts_with('/') {
        return Err(format!("endpoint {endpoint:?} must be unix:///absolute/path"));
    }
    Ok(std::path::PathBuf::from(p))
}

/// A client's connection as the gRPC server sees it: its header blocks through the
/// `:authority` fix.
pub type Connection = uds_authority::HeaderRewrite<tokio::net::UnixStream, fn(&mut uds_authority::Headers)>;

/// Listens on the Unix socket `path` (its directory made, a stale socket replaced) and returns
/// the connections as tonic serves them.
pub fn listen(path: &std::path::Path) -> Result<impl tokio_stream::Stream<Item = std::io::Result<Connection>>, String> {
    use tokio_stream::StreamExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(socket = %path.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("removing stale socket {}: {e}", path.display())),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| format!("binding {}: {e}", path.display()))?;
    let fix: fn(&mut uds_authority::Headers) = uds_authority::authority_to_localhost;
    Ok(tokio_stream::wrappers::UnixListenerStream::new(listener).map(move |s| s.map(|s| uds_authority::HeaderRewrite::new(s, fix))))
}

/// Logging for the binaries: `LAZY_IMAGE_LOG` (or `level`) filters, JSON lines with `json`,
/// colours only on a terminal (in a pod, stderr is the container log).
pub fn init_logging(level: &str, json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("LAZY_IMAGE_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json {
        fmt.json().init();
    } else {
        fmt.init();
    }
}

/// Resolves at SIGTERM or SIGINT. Where signals cannot be caught, it logs why and never
/// resolves: the server then runs until it is killed.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot wait for signals");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// What `/metrics` answers: the Prometheus text format, rendered at each scrape.
pub type RenderMetrics = std::sync::Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `GET /metrics` on `addr` until the process ends.
pub async fn serve_metrics(addr: std::net::SocketAddr, render: RenderMetrics) -> std::io::Result<()> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving metrics at /metrics");
    loop {
        let (stream, _) = listener.accept().await?;
        let render = render.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        hyper::Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(render())))
                    } else {
                        hyper::Response::builder().status(hyper::StatusCode::NOT_FOUND).body(Full::new(Bytes::from_static(b"not found\n")))
                    };
                    resp.map_err(std::io::Error::other)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn endpoints() {
        assert_eq!(super::socket_path("unix:///csi/csi.sock").unwrap().to_str(), Some("/csi/csi.sock"));
        assert_eq!(super::socket_path("/tmp/x.sock").unwrap().to_str(), Some("/tmp/x.sock"));
        assert!(super::socket_path("tcp://1.2.3.4:5").is_err());
    }
}
