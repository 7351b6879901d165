//! Plays kubelet against the real `lazy-image-csi-node` binary over its Unix socket, with the
//! CSI wire protocol: identity, the full volume lifecycle (each call twice), two pods on one
//! staged volume, inline ephemeral volumes, a bad-input matrix with the exact gRPC code of each
//! case, ABORTED for concurrent calls on one volume, volume condition, metrics, and kill -9 /
//! restart. Backend: FUSE + loop on the host; the VM harness runs the same file with
//! LAZY_IMAGE_TEST_BACKEND=ublk. Needs root, /dev/fuse (host) and mkfs.erofs; CI=true turns a
//! missing one into a failure.

use hyper_util::rt::TokioIo;
use lazy_image_proto::csi::v1 as csi;
use lazy_image_proto::csi::v1::identity_client::IdentityClient;
use lazy_image_proto::csi::v1::node_client::NodeClient;
use lazy_image_proto::csi::v1::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume};
use lazy_image_serve::Faults;
use rand::{RngCore, SeedableRng};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_lazy-image-csi-node");

fn backend() -> &'static str {
    match std::env::var("LAZY_IMAGE_TEST_BACKEND").as_deref() {
        Ok("ublk") => "ublk",
        _ => "fuse",
    }
}

fn prerequisites_met() -> bool {
    let which = |c: &str| Command::new("sh").arg("-c").arg(format!("command -v {c}")).stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    let mut checks = vec![("root", unsafe { libc::geteuid() } == 0), ("mkfs.erofs", which("mkfs.erofs"))];
    match backend() {
        "ublk" => checks.push(("/dev/ublk-control", Path::new("/dev/ublk-control").exists())),
        _ => checks.push(("/dev/fuse", Path::new("/dev/fuse").exists())),
    }
    let missing: Vec<&str> = checks.iter().filter(|(_, ok)| !ok).map(|(n, _)| *n).collect();
    if missing.is_empty() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI must provide: {missing:?}");
    eprintln!("skipping: missing {missing:?}");
    false
}

/// The origin (our Range server, with a fault plan), a kubelet root, and the plugin process.
struct Harness {
    plugin: Option<Child>,
    tmp: tempfile::TempDir,
    server: lazy_image_serve::ServerHandle,
    faults: Arc<Faults>,
    files: HashMap<String, Vec<u8>>,
    metrics_port: u16,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(mut p) = self.plugin.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        self.server.shutdown();
        // Leave no mount behind even when a test failed half-way.
        if let Ok(out) = Command::new("findmnt").args(["-rn", "-o", "TARGET"]).output() {
            let root = self.tmp.path().to_string_lossy().to_string();
            let mut mps: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with(&root)).map(String::from).collect();
            mps.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in mps {
                let _ = Command::new("umount").arg("-l").arg(&m).status();
            }
        }
    }
}

impl Harness {
    async fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let srv = tmp.path().join("srv");
        std::fs::create_dir_all(&srv).unwrap();
        // An erofs image with a small and a large file of random bytes.
        let tree = tmp.path().join("tree");
        std::fs::create_dir_all(tree.join("data")).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let mut files = HashMap::new();
        for (name, size) in [("hello.txt", 0usize), ("data/big.bin", 24 << 20), ("data/small.bin", 70_000)] {
            let mut v = vec![0u8; size];
            rng.fill_bytes(&mut v);
            if name == "hello.txt" {
                v = b"hello from a lazy-image volume\n".to_vec();
            }
            std::fs::write(tree.join(name), &v).unwrap();
            files.insert(name.to_string(), v);
        }
        let out = Command::new("mkfs.erofs").arg("--quiet").arg(srv.join("vol.img")).arg(&tree).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::copy(srv.join("vol.img"), srv.join("vol2.img")).unwrap();
        let faults = Arc::new(Faults::new());
        let server = lazy_image_serve::spawn(&srv, "127.0.0.1:0".parse().unwrap(), Some(faults.clone())).await.unwrap();
        std::fs::create_dir_all(tmp.path().join("kubelet/plugins")).unwrap();
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut h = Harness { plugin: None, tmp, server, faults, files, metrics_port };
        h.start().await;
        h
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn socket(&self) -> PathBuf {
        self.p("csi/csi.sock")
    }

    fn url(&self, name: &str) -> String {
        self.server.url(name)
    }

    async fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.p("plugin.log")).unwrap();
        let child = Command::new(BIN)
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket().display()))
            .args(["--node-id", "node-a", "--backend", backend()])
            .arg("--state-dir")
            .arg(self.p("state"))
            .arg("--cache-dir")
            .arg(self.p("cache"))
            .arg("--kubelet-root")
            .arg(self.p("kubelet"))
            .args(["--metrics-addr", &format!("127.0.0.1:{}", self.metrics_port)])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.plugin = Some(child);
        // Ready when Probe says so (after re-adopting volumes from a previous run).
        let t = Instant::now();
        loop {
            assert!(t.elapsed() < Duration::from_secs(60), "plugin did not become ready:\n{}", self.log());
            if let Ok(ch) = self.try_channel().await {
                if let Ok(r) = IdentityClient::new(ch).probe(csi::ProbeRequest {}).await {
                    if r.into_inner().ready == Some(true) {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&mut self) {
        let mut p = self.plugin.take().expect("running plugin");
        p.kill().unwrap(); // SIGKILL
        p.wait().unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.p("plugin.log")).unwrap_or_default()
    }

    async fn try_channel(&self) -> Result<Channel, tonic::transport::Error> {
        let path = self.socket();
        Endpoint::try_from("http://[::1]:50051")?
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            }))
            .await
    }

    async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.try_channel().await.expect("connect to the plugin socket"))
    }

    fn staging(&self, vol: &str) -> String {
        self.p(&format!("kubelet/plugins/kubernetes.io/csi/lazy-image.csi.dev/{vol}/globalmount")).display().to_string()
    }

    fn target(&self, pod: &str, vol: &str) -> String {
        self.p(&format!("kubelet/pods/{pod}/volumes/kubernetes.io~csi/{vol}/mount")).display().to_string()
    }

    fn stage_req(&self, vol: &str, url: &str) -> csi::NodeStageVolumeRequest {
        csi::NodeStageVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: self.staging(vol),
            volume_capability: Some(mount_cap(Mode::MultiNodeReaderOnly)),
            volume_context: HashMap::from([("url".to_string(), url.to_string())]),
            ..Default::default()
        }
    }

    fn publish_req(&self, vol: &str, pod: &str) -> csi::NodePublishVolumeRequest {
        csi::NodePublishVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: self.staging(vol),
            target_path: self.target(pod, vol),
            volume_capability: Some(mount_cap(Mode::MultiNodeReaderOnly)),
            readonly: true,
            ..Default::default()
        }
    }

    fn check_files(&self, root: &str) {
        for (name, want) in &self.files {
            let got = std::fs::read(Path::new(root).join(name)).unwrap_or_else(|e| panic!("{root}/{name}: {e}"));
            assert!(&got == want, "{root}/{name}: wrong bytes");
        }
    }

    /// Mount points under this test's directory (kubelet root, state dir).
    fn our_mounts(&self) -> Vec<String> {
        let root = self.tmp.path().to_string_lossy().to_string();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        info.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&root)).map(String::from).collect()
    }

    fn assert_clean(&self) {
        assert_eq!(self.our_mounts(), Vec::<String>::new(), "mounts left behind");
        let left: Vec<_> = std::fs::read_dir(self.p("state/volumes")).map(|rd| rd.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "volume state left behind: {left:?}");
        if backend() == "ublk" {
            let t = Instant::now();
            while ublk_devices() > 0 && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            assert_eq!(ublk_devices(), 0, "ublk devices left behind");
        } else {
            // A loop device busy at detach time goes away (autoclear) once its last user closes.
            let state = self.p("state").to_string_lossy().to_string();
            let ours = || String::from_utf8_lossy(&Command::new("losetup").arg("-a").output().unwrap().stdout).contains(&state);
            let t = Instant::now();
            while ours() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(!ours(), "loop devices left behind");
        }
    }
}

fn ublk_devices() -> usize {
    std::fs::read_dir("/dev").unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("ublkb")).count()
}

fn mount_cap(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_capabilities_and_info() {
    if !prerequisites_met() {
        return;
    }
    let h = Harness::new().await;
    let mut id = IdentityClient::new(h.try_channel().await.unwrap());
    let info = id.get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "lazy-image.csi.dev");
    assert!(!info.vendor_version.is_empty());
    let caps = id.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    assert_eq!(caps.capabilities.len(), 1);
    assert_eq!(id.probe(csi::ProbeRequest {}).await.unwrap().into_inner().ready, Some(true));

    let mut node = h.node().await;
    let caps = node.node_get_capabilities(csi::NodeGetCapabilitiesRequest {}).await.unwrap().into_inner();
    use csi::node_service_capability::{rpc::Type, Type as Cap};
    let types: Vec<i32> = caps.capabilities.iter().filter_map(|c| match &c.r#type { Some(Cap::Rpc(r)) => Some(r.r#type), _ => None }).collect();
    for t in [Type::StageUnstageVolume, Type::GetVolumeStats, Type::VolumeCondition] {
        assert!(types.contains(&(t as i32)), "missing {t:?}");
    }
    let ni = node.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(ni.node_id, "node-a");
    assert_eq!(ni.accessible_topology.unwrap().segments.get("lazy-image.csi.dev/node").map(String::as_str), Some("node-a"));
}

/// Stage, publish into two pods, read, stats, unpublish, unstage: every call twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_each_call_twice_two_pods() {
    if !prerequisites_met() {
        return;
    }
    let h = Harness::new().await;
    let mut node = h.node().await;
    let stage = h.stage_req("vol-1", &h.url("vol.img"));
    for _ in 0..2 {
        node.node_stage_volume(stage.clone()).await.unwrap_or_else(|e| panic!("{e}\n{}", h.log()));
    }
    for pod in ["pod-a", "pod-b"] {
        for _ in 0..2 {
            node.node_publish_volume(h.publish_req("vol-1", pod)).await.unwrap_or_else(|e| panic!("{e}\n{}", h.log()));
        }
    }
    h.check_files(&h.target("pod-a", "vol-1"));
    h.check_files(&h.target("pod-b", "vol-1"));
    let write = std::fs::write(Path::new(&h.target("pod-a", "vol-1")).join("new"), b"x").unwrap_err();
    assert_eq!(write.raw_os_error(), Some(libc::EROFS), "{write}");

    for path in [h.target("pod-a", "vol-1"), h.staging("vol-1")] {
        let st = node
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest { volume_id: "vol-1".into(), volume_path: path.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        let bytes = st.usage.iter().find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32).unwrap();
        assert!(bytes.total > 24 << 20 && bytes.used > 0, "{st:?}");
        let cond = st.volume_condition.unwrap();
        assert!(!cond.abnormal, "{cond:?}");
    }

    // The metrics endpoint reports the volume's origin traffic.
    let body = http_get(h.metrics_port, "/metrics").await;
    let line = body.lines().find(|l| l.starts_with("lazy_image_origin_bytes_total{volume_id=\"vol-1\"")).unwrap_or_else(|| panic!("{body}"));
    let bytes: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(bytes > 24 << 20, "{line}");
    assert!(body.contains("lazy_image_fetch_duration_seconds_bucket{volume_id=\"vol-1\""), "{body}");

    for pod in ["pod-a", "pod-b"] {
        for _ in 0..2 {
            node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: "vol-1".into(), target_path: h.target(pod, "vol-1") })
                .await
                .unwrap();
        }
        assert!(!Path::new(&h.target(pod, "vol-1")).exists(), "target removed");
    }
    for _ in 0..2 {
        node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: "vol-1".into(), staging_target_path: h.staging("vol-1") })
            .await
            .unwrap();
    }
    h.assert_clean();
}

/// A pod's inline `csi` volume: staged by its publish, gone with its unpublish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_ephemeral_volume() {
    if !prerequisites_met() {
        return;
    }
    let h = Harness::new().await;
    let mut node = h.node().await;
    let req = csi::NodePublishVolumeRequest {
        volume_id: "csi-0123456789abcdef".into(),
        target_path: h.target("pod-e", "inline"),
        volume_capability: Some(mount_cap(Mode::SingleNodeReaderOnly)),
        readonly: true,
        volume_context: HashMap::from([
            ("url".to_string(), h.url("vol.img")),
            ("csi.storage.k8s.io/ephemeral".to_string(), "true".to_string()),
            ("csi.storage.k8s.io/pod.name".to_string(), "pod-e".to_string()),
        ]),
        ..Default::default()
    };
    for _ in 0..2 {
        node.node_publish_volume(req.clone()).await.unwrap_or_else(|e| panic!("{e}\n{}", h.log()));
    }
    h.check_files(&h.target("pod-e", "inline"));
    for _ in 0..2 {
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: req.volume_id.clone(), target_path: req.target_path.clone() })
            .await
            .unwrap();
    }
    h.assert_clean();
}

/// Malformed and unsupported requests: each gets its precise gRPC code and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_matrix() {
    if !prerequisites_met() {
        return;
    }
    let h = Harness::new().await;
    let no_range = Harness::new_ignoring_range(&h).await;
    let mut node = h.node().await;
    let good = h.stage_req("vol-b", &h.url("vol.img"));
    let with = |f: &dyn Fn(&mut csi::NodeStageVolumeRequest)| {
        let mut r = good.clone();
        f(&mut r);
        r
    };
    let ctx = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>();
    let stage_cases: Vec<(&str, csi::NodeStageVolumeRequest, Code)> = vec![
        ("missing volume id", with(&|r| r.volume_id.clear()), Code::InvalidArgument),
        ("missing staging path", with(&|r| r.staging_target_path.clear()), Code::InvalidArgument),
        ("missing capability", with(&|r| r.volume_capability = None), Code::InvalidArgument),
        ("missing url", with(&|r| r.volume_context.clear()), Code::InvalidArgument),
        ("not an http url", with(&|r| r.volume_context = ctx(&[("url", "ftp://127.0.0.1/x.img")])), Code::InvalidArgument),
        ("unparseable url", with(&|r| r.volume_context = ctx(&[("url", "http://")])), Code::InvalidArgument),
        ("server without Range", with(&|r| r.volume_context = ctx(&[("url", &no_range)])), Code::InvalidArgument),
        ("image not found", with(&|r| r.volume_context = ctx(&[("url", &h.url("missing.img"))])), Code::NotFound),
        ("multi-writer mode", with(&|r| r.volume_capability = Some(mount_cap(Mode::MultiNodeMultiWriter))), Code::InvalidArgument),
        ("single-writer mode", with(&|r| r.volume_capability = Some(mount_cap(Mode::SingleNodeWriter))), Code::InvalidArgument),
        (
            "block access",
            with(&|r| {
                r.volume_capability = Some(csi::VolumeCapability {
                    access_type: Some(AccessType::Block(BlockVolume {})),
                    access_mode: Some(AccessMode { mode: Mode::MultiNodeReaderOnly as i32 }),
                })
            }),
            Code::InvalidArgument,
        ),
        ("unknown format", with(&|r| { r.volume_context.insert("format".into(), "xfs".into()); }), Code::InvalidArgument),
        ("unknown attribute", with(&|r| { r.volume_context.insert("chunksize".into(), "64K".into()); }), Code::InvalidArgument),
        ("bad digest", with(&|r| { r.volume_context.insert("digest".into(), "sha256:beef".into()); }), Code::InvalidArgument),
        ("staging path outside the kubelet root", with(&|r| r.staging_target_path = "/tmp/elsewhere".into()), Code::InvalidArgument),
        ("staging path escaping the kubelet root", with(&|r| r.staging_target_path = format!("{}/../../etc", h.staging("x"))), Code::InvalidArgument),
        ("relative staging path", with(&|r| r.staging_target_path = "kubelet/x".into()), Code::InvalidArgument),
        ("volume id with ..", with(&|r| r.volume_id = "..".into()), Code::InvalidArgument),
        ("volume id with /", with(&|r| r.volume_id = "a/../../b".into()), Code::InvalidArgument),
    ];
    for (what, req, want) in stage_cases {
        let got = node.node_stage_volume(req).await;
        let msg = got.as_ref().err().map(|s| s.message().to_string()).unwrap_or_default();
        assert_eq!(code(got), want, "{what}: {msg}");
        assert!(!msg.is_empty(), "{what}: an error says why");
    }
    let multi = node.node_stage_volume(with(&|r| r.volume_capability = Some(mount_cap(Mode::MultiNodeMultiWriter)))).await.unwrap_err();
    assert!(multi.message().contains("MULTI_NODE_MULTI_WRITER"), "{}", multi.message());

    // Publish and the rest.
    assert_eq!(code(node.node_publish_volume(h.publish_req("vol-b", "p")).await), Code::FailedPrecondition, "publish before stage");
    let mut p = h.publish_req("vol-b", "p");
    p.target_path.clear();
    assert_eq!(code(node.node_publish_volume(p).await), Code::InvalidArgument);
    let mut p = h.publish_req("vol-b", "p");
    p.target_path = "/var/tmp/pod".into();
    assert_eq!(code(node.node_publish_volume(p).await), Code::InvalidArgument);
    let mut p = h.publish_req("vol-b", "p");
    p.volume_capability = None;
    assert_eq!(code(node.node_publish_volume(p).await), Code::InvalidArgument);
    let r = node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: String::new(), target_path: h.target("p", "v") }).await;
    assert_eq!(code(r), Code::InvalidArgument);
    let r = node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: "v".into(), target_path: String::new() }).await;
    assert_eq!(code(r), Code::InvalidArgument);
    let r = node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: "v".into(), staging_target_path: String::new() }).await;
    assert_eq!(code(r), Code::InvalidArgument);
    let r = node.node_get_volume_stats(csi::NodeGetVolumeStatsRequest { volume_id: "nope".into(), volume_path: h.target("p", "v"), ..Default::default() }).await;
    assert_eq!(code(r), Code::NotFound);
    let r = node.node_get_volume_stats(csi::NodeGetVolumeStatsRequest { volume_id: "nope".into(), ..Default::default() }).await;
    assert_eq!(code(r), Code::InvalidArgument);
    let r = node.node_expand_volume(csi::NodeExpandVolumeRequest { volume_id: "v".into(), ..Default::default() }).await;
    assert_eq!(code(r), Code::Unimplemented);

    // A conflicting second stage of a staged volume.
    node.node_stage_volume(good.clone()).await.unwrap();
    let other = with(&|r| r.volume_context = ctx(&[("url", &h.url("vol2.img"))]));
    assert_eq!(code(node.node_stage_volume(other).await), Code::AlreadyExists);
    let mut elsewhere = good.clone();
    elsewhere.staging_target_path = h.staging("vol-b-2");
    assert_eq!(code(node.node_stage_volume(elsewhere).await), Code::AlreadyExists);
    // Publishing from a staging path that is not the volume's.
    let mut p = h.publish_req("vol-b", "p");
    p.staging_target_path = h.staging("other");
    assert_eq!(code(node.node_publish_volume(p).await), Code::FailedPrecondition);
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: "vol-b".into(), staging_target_path: h.staging("vol-b") }).await.unwrap();
    h.assert_clean();
}

impl Harness {
    /// A second server on the same files that answers 200 with the whole body to Range.
    async fn new_ignoring_range(h: &Harness) -> String {
        let f = Arc::new(Faults::new());
        f.ignore_range.store(true, Ordering::SeqCst);
        let s = lazy_image_serve::spawn(h.p("srv"), "127.0.0.1:0".parse().unwrap(), Some(f)).await.unwrap();
        let url = s.url("vol.img");
        std::mem::forget(s); // lives as long as the test's runtime
        url
    }
}

/// A second call on a volume while the first is still running gets ABORTED at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_call_on_one_volume_is_aborted() {
    if !prerequisites_met() {
        return;
    }
    let h = Harness::new().await;
    h.faults.delay_ms.store(700, Ordering::SeqCst); // every origin request takes 0.7 s
    let req = h.stage_req("vol-c", &h.url("vol.img"));
    let mut n1 = h.node().await;
    let r1 = req.clone();
    let first = tokio::spawn(async move { n1.node_stage_volume(r1).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut n2 = h.node().await;
    let second = n2.node_stage_volume(req.clone()).await;
    assert_eq!(code(second), Code::Aborted);
    first.await.unwrap().unwrap();
    h.faults.delay_ms.store(0, Ordering::SeqCst);
    n2.node_stage_volume(req).await.expect("the same call succeeds once the first is done");
    n2.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: "vol-c".into(), staging_target_path: h.staging("vol-c") }).await.unwrap();
    h.assert_clean();
}

/// The image changes at the origin: reads of uncached data fail (never mixed bytes) and the
/// volume condition turns abnormal with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn condition_turns_abnormal_when_the_origin_changes() {
    if !prerequisites_met() {
        return;
    }
    let h = Harness::new().await;
    let mut node = h.node().await;
    node.node_stage_volume(h.stage_req("vol-d", &h.url("vol.img"))).await.unwrap();
    node.node_publish_volume(h.publish_req("vol-d", "pod")).await.unwrap();
    let target = h.target("pod", "vol-d");
    assert_eq!(std::fs::read(Path::new(&target).join("hello.txt")).unwrap(), h.files["hello.txt"]);
    h.faults.set_etag("\"a-new-version\"");
    let err = std::fs::read(Path::new(&target).join("data/big.bin")).expect_err("bytes of another image version must not be served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let st = node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest { volume_id: "vol-d".into(), volume_path: target.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let cond = st.volume_condition.unwrap();
    assert!(cond.abnormal && cond.message.contains("changed"), "{cond:?}");
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: "vol-d".into(), target_path: target }).await.unwrap();
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: "vol-d".into(), staging_target_path: h.staging("vol-d") }).await.unwrap();
    h.assert_clean();
}

/// A cache disk with no room: the volume still reads right, and its condition says why it is
/// not caching.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn condition_reports_a_full_cache_disk() {
    if !prerequisites_met() {
        return;
    }
    let mut h = Harness::new().await;
    // On the cache root before the plugin starts: it works in a mount namespace of its own.
    h.kill();
    std::fs::create_dir_all(h.p("cache")).unwrap();
    let st = Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "lazy-image-test"]).arg(h.p("cache")).status().unwrap();
    assert!(st.success());
    h.start().await;
    let mut node = h.node().await;
    node.node_stage_volume(h.stage_req("vol-f", &h.url("vol.img"))).await.unwrap();
    node.node_publish_volume(h.publish_req("vol-f", "pod")).await.unwrap();
    let target = h.target("pod", "vol-f");
    assert!(std::fs::read(Path::new(&target).join("data/big.bin")).unwrap() == h.files["data/big.bin"], "wrong bytes");
    let st = node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest { volume_id: "vol-f".into(), volume_path: target.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let cond = st.volume_condition.unwrap();
    assert!(cond.abnormal && cond.message.contains("No space left"), "{cond:?}\n{}", h.log());
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: "vol-f".into(), target_path: target }).await.unwrap();
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: "vol-f".into(), staging_target_path: h.staging("vol-f") }).await.unwrap();
    assert!(Command::new("umount").arg(h.p("cache")).status().unwrap().success(), "unmounting the test's tmpfs");
    h.assert_clean();
}

/// kill -9 the plugin while a pod reads its volume, start it again: the plugin re-adopts the
/// volume from its state directory and every call keeps answering; with ublk the reader in
/// flight continues without an error, with FUSE + loop new reads work again. Then unpublish and
/// unstage leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_readopts_volumes() {
    if !prerequisites_met() {
        return;
    }
    let mut h = Harness::new().await;
    h.faults.delay_ms.store(20, Ordering::SeqCst); // a slow origin so the read spans the kill
    let mut node = h.node().await;
    node.node_stage_volume(h.stage_req("vol-r", &h.url("vol.img"))).await.unwrap();
    node.node_publish_volume(h.publish_req("vol-r", "pod")).await.unwrap();
    let target = h.target("pod", "vol-r");
    let big = Path::new(&target).join("data/big.bin");
    let want = h.files["data/big.bin"].clone();
    let reader = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::File::open(big)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    h.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.start().await;
    let res = tokio::task::spawn_blocking(move || reader.join().unwrap()).await.unwrap();
    if backend() == "ublk" {
        let got = res.expect("a read across the restart succeeds on ublk");
        assert!(got == want, "the read across the restart returned the image's bytes");
    }
    h.faults.delay_ms.store(0, Ordering::SeqCst);
    let mut node = h.node().await;
    h.check_files(&target);
    let st = node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest { volume_id: "vol-r".into(), volume_path: target.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(!st.volume_condition.unwrap().abnormal);
    // Repeated calls after the restart are still idempotent.
    node.node_stage_volume(h.stage_req("vol-r", &h.url("vol.img"))).await.unwrap();
    node.node_publish_volume(h.publish_req("vol-r", "pod")).await.unwrap();
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: "vol-r".into(), target_path: target }).await.unwrap();
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: "vol-r".into(), staging_target_path: h.staging("vol-r") }).await.unwrap();
    h.assert_clean();
}

/// FUSE + loop with the image complete in the cache (here by a `prefetch` volume staged
/// before): staging puts the loop device on the cache file itself, so a kill -9 of the plugin does not touch the pod's mount at all (same mount,
/// an open file reads on), and the restarted plugin keeps it as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_image_is_staged_on_its_cache_file_and_survives_a_restart() {
    if backend() != "fuse" || !prerequisites_met() {
        return;
    }
    let mut h = Harness::new().await;
    let mut node = h.node().await;
    // A volume with `prefetch` fills the cache in the background while it is staged.
    let mut req = h.stage_req("vol-w", &h.url("vol.img"));
    req.volume_context.insert("prefetch".into(), "true".into());
    node.node_stage_volume(req).await.unwrap();
    let t = Instant::now();
    while !h.log().contains("image complete in the cache") {
        assert!(t.elapsed() < Duration::from_secs(60), "prefetch did not finish:\n{}", h.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: "vol-w".into(), staging_target_path: h.staging("vol-w") }).await.unwrap();

    node.node_stage_volume(h.stage_req("vol-d", &h.url("vol.img"))).await.unwrap();
    node.node_publish_volume(h.publish_req("vol-d", "pod")).await.unwrap();
    let dev = lazy_image_attach::mount_source(Path::new(&h.staging("vol-d"))).unwrap().unwrap();
    let backing = std::fs::read_to_string(format!("/sys/block/{}/loop/backing_file", dev.file_name().unwrap().to_str().unwrap())).unwrap();
    assert!(backing.starts_with(h.p("cache").to_str().unwrap()) && backing.trim_end().ends_with("/data"), "{backing}");
    let target = h.target("pod", "vol-d");
    let mount_id = |path: &str| {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        info.lines().find(|l| l.split(' ').nth(4) == Some(path)).map(|l| l.split(' ').next().unwrap().to_string())
    };
    let before = mount_id(&target).expect("pod mount");
    let mut open = std::fs::File::open(Path::new(&target).join("data/big.bin")).unwrap();

    h.kill();
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let mut got = Vec::new();
    open.read_to_end(&mut got).unwrap();
    assert!(got == h.files["data/big.bin"], "a file opened before the kill reads on with no plugin");
    h.check_files(&target);
    h.start().await;
    assert_eq!(mount_id(&target).as_ref(), Some(&before), "the pod's mount was kept, not re-made");
    assert_eq!(lazy_image_attach::mount_source(Path::new(&h.staging("vol-d"))).unwrap(), Some(dev));
    let mut node = h.node().await;
    h.check_files(&target);
    node.node_stage_volume(h.stage_req("vol-d", &h.url("vol.img"))).await.unwrap();
    drop(open);
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: "vol-d".into(), target_path: target }).await.unwrap();
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: "vol-d".into(), staging_target_path: h.staging("vol-d") }).await.unwrap();
    h.assert_clean();
}

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
