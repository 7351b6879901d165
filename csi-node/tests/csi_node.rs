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
    let which =
        |c: &str| Command::new("sh").arg("-c").arg(format!("command -v {c}")).stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut checks = vec![("root", root), ("mkfs.erofs", which("mkfs.erofs"))];
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
    /// More flags for the plugin, from the next `start` on.
    extra_args: Vec<String>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(mut p) = self.plugin.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        self.server.shutdown();
        // The plugin's fd holder (its own session: a kill of the plugin does not reach it).
        let _ = Command::new("pkill").arg("-f").arg(self.p("state/fd-holder.sock")).status();
        // Leave no mount behind even when a test failed half-way.
        if let Ok(out) = Command::new("findmnt").args(["-rn", "-o", "TARGET"]).output() {
            let root = self.tmp.path().to_string_lossy().to_string();
            let mut mps: Vec<String> =
                String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with(&root)).map(String::from).collect();
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
        let mut h = Harness { plugin: None, tmp, server, faults, files, metrics_port, extra_args: Vec::new() };
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
            .args(&self.extra_args)
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
        self.channel_to(self.socket()).await
    }

    async fn channel_to(&self, path: PathBuf) -> Result<Channel, tonic::transport::Error> {
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
        let left: Vec<_> =
            std::fs::read_dir(self.p("state/volumes")).map(|rd| rd.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
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
    let types: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(Cap::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect();
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
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: "vol-1".into(),
                volume_path: path.clone(),
                ..Default::default()
            })
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
    let line =
        body.lines().find(|l| l.starts_with("lazy_image_origin_bytes_total{volume_id=\"vol-1\"")).unwrap_or_else(|| panic!("{body}"));
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

/// The requests kubelet's CSI volume plugin (`pkg/volume/csi`) sends, field for field, so the
/// suite plays kubelet rather than an idea of it.
mod kubelet {
    use super::*;
    use sha2::{Digest, Sha256};

    /// Which kubelet: how it names the staging directory, and the `:authority` it sends.
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub enum Era {
        /// Kubelet 1.24/1.25: `plugins/kubernetes.io/csi/pv/<pv name>/globalmount`, and the
        /// socket path as `:authority` (grpc-go dialled the bare path).
        Old,
        /// Current kubelets: `plugins/kubernetes.io/csi/<driver>/<sha256(volume handle)>/globalmount`
        /// (`makeDeviceMountPath` in csi_attacher.go), `:authority` `localhost` (kubernetes#112597).
        Current,
    }

    /// A PersistentVolume of ours, as the pod's volume spec gives it to kubelet.
    pub struct Pv<'a> {
        pub name: &'a str,
        pub handle: &'a str,
        /// `spec.accessModes[0]`: kubelet maps only the first (csi_client.go, asCSIAccessModeV1).
        pub first_access_mode: Mode,
        /// `spec.csi.readOnly` or the pod's `persistentVolumeClaim.readOnly`.
        pub read_only: bool,
        pub attributes: HashMap<String, String>,
    }

    /// `csi.storage.k8s.io/*` keys kubelet adds when the CSIDriver has `podInfoOnMount: true`
    /// (csi_mounter.go, podAttributes).
    pub fn pod_info(pod: &str, ephemeral: bool) -> HashMap<String, String> {
        HashMap::from([
            ("csi.storage.k8s.io/pod.name".to_string(), pod.to_string()),
            ("csi.storage.k8s.io/pod.namespace".to_string(), "default".to_string()),
            ("csi.storage.k8s.io/pod.uid".to_string(), format!("uid-{pod}")),
            ("csi.storage.k8s.io/serviceAccount.name".to_string(), "default".to_string()),
            ("csi.storage.k8s.io/ephemeral".to_string(), ephemeral.to_string()),
        ])
    }

    fn mount(mode: Mode) -> csi::VolumeCapability {
        // fsType from the PV (empty when it names none), mount flags from its mountOptions.
        csi::VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume { fs_type: String::new(), mount_flags: vec![], ..Default::default() })),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    impl Harness {
        pub fn kubelet_staging(&self, era: Era, pv: &Pv) -> String {
            let dir = match era {
                Era::Old => self.p(&format!("kubelet/plugins/kubernetes.io/csi/pv/{}", pv.name)),
                Era::Current => {
                    let sha = hex::encode(Sha256::digest(pv.handle.as_bytes()));
                    self.p(&format!("kubelet/plugins/kubernetes.io/csi/lazy-image.csi.dev/{sha}"))
                }
            };
            // csi_attacher.go MountDevice makes the parent and writes vol_data.json into it;
            // the globalmount directory itself is the driver's to make.
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("vol_data.json"),
                format!("{{\"driverName\":\"lazy-image.csi.dev\",\"volumeHandle\":\"{}\"}}", pv.handle),
            )
            .unwrap();
            dir.join("globalmount").display().to_string()
        }

        /// NodeStageVolume from csi_attacher.go MountDevice: the PV's attributes only (no pod
        /// info), its first access mode.
        pub fn kubelet_stage(&self, era: Era, pv: &Pv) -> csi::NodeStageVolumeRequest {
            csi::NodeStageVolumeRequest {
                volume_id: pv.handle.to_string(),
                publish_context: HashMap::new(),
                staging_target_path: self.kubelet_staging(era, pv),
                volume_capability: Some(mount(pv.first_access_mode)),
                secrets: HashMap::new(),
                volume_context: pv.attributes.clone(),
            }
        }

        /// NodePublishVolume from csi_mounter.go SetUpAt for a PV.
        pub fn kubelet_publish(&self, era: Era, pv: &Pv, pod: &str) -> csi::NodePublishVolumeRequest {
            let mut ctx = pv.attributes.clone();
            ctx.extend(pod_info(pod, false));
            let target = self.p(&format!("kubelet/pods/uid-{pod}/volumes/kubernetes.io~csi/{}/mount", pv.name));
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            csi::NodePublishVolumeRequest {
                volume_id: pv.handle.to_string(),
                staging_target_path: self.kubelet_staging(era, pv),
                target_path: target.display().to_string(),
                volume_capability: Some(mount(pv.first_access_mode)),
                readonly: pv.read_only,
                volume_context: ctx,
                ..Default::default()
            }
        }

        /// NodePublishVolume for a pod's inline `csi` volume: the handle is
        /// csi-<sha256(pod uid + volume name)> (makeVolumeHandle), no staging path, the access
        /// mode is always ReadWriteOnce, so SINGLE_NODE_WRITER (csi_mounter.go), and `readonly`
        /// is the volume's `readOnly`.
        pub fn kubelet_inline_publish(
            &self,
            pod: &str,
            volume: &str,
            read_only: bool,
            attributes: &[(&str, &str)],
        ) -> csi::NodePublishVolumeRequest {
            let handle = format!("csi-{}", hex::encode(Sha256::digest(format!("uid-{pod}{volume}").as_bytes())));
            let mut ctx: HashMap<String, String> = attributes.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            ctx.extend(pod_info(pod, true));
            let target = self.p(&format!("kubelet/pods/uid-{pod}/volumes/kubernetes.io~csi/{volume}/mount"));
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            csi::NodePublishVolumeRequest {
                volume_id: handle,
                target_path: target.display().to_string(),
                volume_capability: Some(mount(Mode::SingleNodeWriter)),
                readonly: read_only,
                volume_context: ctx,
                ..Default::default()
            }
        }

        /// A connection as kubelet `era` makes it: an old one sends the socket path as the
        /// HTTP/2 `:authority`. The header is rewritten on its way out by a proxy in this
        /// process (tonic, like h2, will not send such an authority itself).
        pub async fn kubelet_channel(&self, era: Era, socket: PathBuf) -> Channel {
            if era == Era::Current {
                return self.channel_to(socket).await.unwrap();
            }
            let authority = socket.display().to_string().into_bytes();
            Endpoint::try_from("http://[::1]:50051")
                .unwrap()
                .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                    let (socket, authority) = (socket.clone(), authority.clone());
                    async move {
                        let mut sock = tokio::net::UnixStream::connect(&socket).await?;
                        let (client, proxy) = tokio::io::duplex(1 << 16);
                        let mut proxy = HeaderRewrite::new(proxy, move |h: &mut Headers| {
                            for (name, value) in h.iter_mut() {
                                if name.as_slice() == b":authority" {
                                    value.clone_from(&authority);
                                }
                            }
                        });
                        tokio::spawn(async move { tokio::io::copy_bidirectional(&mut proxy, &mut sock).await });
                        Ok::<_, std::io::Error>(TokioIo::new(client))
                    }
                }))
                .await
                .unwrap()
        }
    }
}

use kubelet::{Era, Pv};
use lazy_image_csi_common::uds_authority::{HeaderRewrite, Headers};

/// A bare tonic server, without the plugin's `:authority` fix: proves the old kubelet's
/// connection really carries the socket path (this server resets its streams).
struct BareIdentity;

#[tonic::async_trait]
impl csi::identity_server::Identity for BareIdentity {
    async fn get_plugin_info(
        &self,
        _r: tonic::Request<csi::GetPluginInfoRequest>,
    ) -> Result<tonic::Response<csi::GetPluginInfoResponse>, tonic::Status> {
        Ok(tonic::Response::new(csi::GetPluginInfoResponse { name: "bare".into(), ..Default::default() }))
    }
    async fn get_plugin_capabilities(
        &self,
        _r: tonic::Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<tonic::Response<csi::GetPluginCapabilitiesResponse>, tonic::Status> {
        Ok(tonic::Response::new(csi::GetPluginCapabilitiesResponse::default()))
    }
    async fn probe(&self, _r: tonic::Request<csi::ProbeRequest>) -> Result<tonic::Response<csi::ProbeResponse>, tonic::Status> {
        Ok(tonic::Response::new(csi::ProbeResponse::default()))
    }
}

/// Kubelet 1.24-era and current, registration (the registrar's and kubelet's identity calls)
/// and the three ways a pod gets a volume: a ReadOnlyMany PV, a ReadWriteOnce PV with
/// `readOnly: true`, and an inline volume. Each as kubelet sends it; files read right, writes
/// fail, stats describe the image's filesystem, and teardown leaves nothing (no directory for
/// the inline volume either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_call_shapes_old_and_current() {
    if !prerequisites_met() {
        return;
    }
    let h = Harness::new().await;

    // The old kubelet's authority breaks a bare HTTP/2 server: the proxy does send it.
    let bare_sock = h.p("bare.sock");
    let listener = tokio::net::UnixListener::bind(&bare_sock).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(csi::identity_server::IdentityServer::new(BareIdentity))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let bare =
        IdentityClient::new(h.kubelet_channel(Era::Old, bare_sock.clone()).await).get_plugin_info(csi::GetPluginInfoRequest {}).await;
    assert!(bare.is_err(), "a bare server refuses the socket path as authority: {bare:?}");
    let bare_ok = IdentityClient::new(h.kubelet_channel(Era::Current, bare_sock).await).get_plugin_info(csi::GetPluginInfoRequest {}).await;
    assert!(bare_ok.is_ok(), "{bare_ok:?}");

    for era in [Era::Old, Era::Current] {
        let ch = h.kubelet_channel(era, h.socket()).await;
        // node-driver-registrar and kubelet's registration: GetPluginInfo, NodeGetInfo.
        let info =
            IdentityClient::new(ch.clone()).get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap_or_else(|e| panic!("{era:?}: {e}"));
        assert_eq!(info.into_inner().name, "lazy-image.csi.dev");
        let mut node = NodeClient::new(ch);
        let ni = node.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner();
        assert!(ni.max_volumes_per_node > 0, "kubelet refuses an attach limit of 0: {ni:?}");

        let url = h.url("vol.img");
        let attrs = HashMap::from([("url".to_string(), url.clone())]);
        let pvs = [
            Pv {
                name: "pv-rox",
                handle: "model-rox",
                first_access_mode: Mode::MultiNodeReaderOnly,
                read_only: true,
                attributes: attrs.clone(),
            },
            // A ROX PV whose pod does not say readOnly: kubelet sends readonly false.
            Pv {
                name: "pv-rox-rw",
                handle: "model-rox-rw",
                first_access_mode: Mode::MultiNodeReaderOnly,
                read_only: false,
                attributes: attrs.clone(),
            },
            Pv {
                name: "pv-rwo",
                handle: "model-rwo",
                first_access_mode: Mode::SingleNodeWriter,
                read_only: true,
                attributes: attrs.clone(),
            },
        ];
        for pv in &pvs {
            let what = format!("{era:?} {}", pv.name);
            node.node_stage_volume(h.kubelet_stage(era, pv)).await.unwrap_or_else(|e| panic!("{what}: stage: {e}\n{}", h.log()));
            let publish = h.kubelet_publish(era, pv, "pod-1");
            node.node_publish_volume(publish.clone()).await.unwrap_or_else(|e| panic!("{what}: publish: {e}\n{}", h.log()));
            h.check_files(&publish.target_path);
            let err = std::fs::write(Path::new(&publish.target_path).join("new"), b"x").unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{what}: {err}");
            check_stats(&mut node, &publish.volume_id, &publish.target_path).await;
            node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: publish.volume_id.clone(),
                target_path: publish.target_path.clone(),
            })
            .await
            .unwrap();
            node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: pv.handle.into(),
                staging_target_path: h.kubelet_staging(era, pv),
            })
            .await
            .unwrap();
        }
        // A RWO PV the pod would write to: refused at publish, saying what to change.
        let rw = Pv {
            name: "pv-rwo-rw",
            handle: "model-rwo-rw",
            first_access_mode: Mode::SingleNodeWriter,
            read_only: false,
            attributes: attrs.clone(),
        };
        node.node_stage_volume(h.kubelet_stage(era, &rw)).await.unwrap();
        let e = node.node_publish_volume(h.kubelet_publish(era, &rw, "pod-1")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(e.message().contains("SINGLE_NODE_WRITER") && e.message().contains("readOnly: true"), "{}", e.message());
        node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: rw.handle.into(),
            staging_target_path: h.kubelet_staging(era, &rw),
        })
        .await
        .unwrap();

        // An inline volume with readOnly: true, published and unpublished twice each.
        let inline = h.kubelet_inline_publish("pod-e", "model", true, &[("url", &url)]);
        for _ in 0..2 {
            node.node_publish_volume(inline.clone()).await.unwrap_or_else(|e| panic!("{era:?} inline: {e}\n{}", h.log()));
        }
        h.check_files(&inline.target_path);
        check_stats(&mut node, &inline.volume_id, &inline.target_path).await;
        for _ in 0..2 {
            node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: inline.volume_id.clone(),
                target_path: inline.target_path.clone(),
            })
            .await
            .unwrap();
        }
        // An inline volume without readOnly asks for writes: refused, nothing left behind.
        let writable = h.kubelet_inline_publish("pod-w", "model", false, &[("url", &url)]);
        let e = node.node_publish_volume(writable).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        h.assert_clean();
        let left: Vec<_> = std::fs::read_dir(h.p("state/ephemeral")).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "{era:?}: inline volume directories left behind: {left:?}");
    }
}

/// NodeGetVolumeStats of `path` describes the image's filesystem as a pod sees it there (this
/// test runs in the namespace kubelet would), not the plugin's view or the host's disk.
/// Node-local sources over the CSI socket: a file beneath an allowed root and a block device
/// (a loop device over the image) matching an allowed pattern stage and read right; a file
/// outside the root, a symlink out of it, a `..` out of it and a device matching no pattern are
/// refused with PERMISSION_DENIED.
#[tokio::test(flavor = "multi_thread")]
async fn local_sources_behind_the_allowlist() {
    if !prerequisites_met() {
        return;
    }
    let mut h = Harness::new().await;
    let root = h.p("local");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(h.p("srv/vol.img"), root.join("vol.img")).unwrap();
    std::os::unix::fs::symlink("../srv/vol.img", root.join("out.img")).unwrap();
    let out = Command::new("losetup").args(["--find", "--show", "--read-only"]).arg(h.p("srv/vol2.img")).output().unwrap();
    assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _detach = Detach(dev.clone());
    h.kill();
    h.extra_args = vec!["--local-source-root".into(), root.display().to_string(), "--local-source-device".into(), dev.clone()];
    h.start().await;
    let mut node = h.node().await;

    let file_url = format!("file://{}/vol.img", root.display());
    let mut device_req = h.stage_req("vol-dev", "unused");
    device_req.volume_context = HashMap::from([("device".to_string(), dev.clone())]);
    for (vol, req) in [("vol-file", h.stage_req("vol-file", &file_url)), ("vol-dev", device_req)] {
        node.node_stage_volume(req).await.unwrap_or_else(|e| panic!("{vol}: {e}\n{}", h.log()));
        node.node_publish_volume(h.publish_req(vol, "pod-l")).await.unwrap_or_else(|e| panic!("{vol}: {e}\n{}", h.log()));
        h.check_files(&h.target("pod-l", vol));
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: vol.into(), target_path: h.target("pod-l", vol) })
            .await
            .unwrap();
        node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: vol.into(), staging_target_path: h.staging(vol) })
            .await
            .unwrap();
    }

    let refused = [
        ("outside the root", ("url", format!("file://{}", h.p("srv/vol.img").display()))),
        ("a symlink out of the root", ("url", format!("file://{}/out.img", root.display()))),
        ("a .. out of the root", ("url", format!("file://{}/../srv/vol.img", root.display()))),
        ("a device matching no pattern", ("device", "/dev/null".to_string())),
    ];
    for (what, (k, v)) in refused {
        let mut req = h.stage_req("vol-x", "unused");
        req.volume_context = HashMap::from([(k.to_string(), v)]);
        let got = node.node_stage_volume(req).await;
        let msg = got.as_ref().err().map(|s| s.message().to_string()).unwrap_or_default();
        assert_eq!(code(got), Code::PermissionDenied, "{what}: {msg}");
        assert!(msg.contains("--local-source"), "{what}: the message names the flag: {msg}");
    }
    h.assert_clean();
}

/// Layered images at a URL: a qcow2 overlay whose backing file (named relative to it) is the raw
/// image beside it, and a lone OverlayBD layer; both stage and read right, the backing file
/// through the plugin's pool like the image itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layered_images_by_url() {
    if !prerequisites_met() {
        return;
    }
    let h = Harness::new().await;
    let out =
        Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-b", "vol.img", "-F", "raw"]).arg(h.p("srv/top.qcow2")).output();
    assert!(out.is_ok_and(|o| o.status.success()), "qemu-img (qemu-utils) makes the qcow2 overlay");
    let mut layer = std::fs::File::create(h.p("srv/vol.lsmt")).unwrap();
    lazy_image_formats::overlaybd::lsmt::write_layer(&mut std::fs::File::open(h.p("srv/vol.img")).unwrap(), None, &mut layer).unwrap();
    drop(layer);
    let mut node = h.node().await;
    for (vol, name) in [("vol-q", "top.qcow2"), ("vol-o", "vol.lsmt")] {
        node.node_stage_volume(h.stage_req(vol, &h.url(name))).await.unwrap_or_else(|e| panic!("{vol}: {e}\n{}", h.log()));
        node.node_publish_volume(h.publish_req(vol, "pod-q")).await.unwrap_or_else(|e| panic!("{vol}: {e}\n{}", h.log()));
        h.check_files(&h.target("pod-q", vol));
    }
    for vol in ["vol-q", "vol-o"] {
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: vol.into(), target_path: h.target("pod-q", vol) })
            .await
            .unwrap();
        node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: vol.into(), staging_target_path: h.staging(vol) })
            .await
            .unwrap();
    }
    h.assert_clean();
}

/// Registry images (`oci+http://`), here from the test server laid out as a registry: the same
/// OverlayBD layer in two repositories serves two volumes at once from one pooled blob and one
/// cache (a second open of the blob's cache would fail: the first holds its lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_images_share_their_layers() {
    use sha2::{Digest, Sha256};
    if !prerequisites_met() {
        return;
    }
    let mut h = Harness::new().await;
    let mut layer = std::io::Cursor::new(Vec::new());
    lazy_image_formats::overlaybd::lsmt::write_layer(&mut std::fs::File::open(h.p("srv/vol.img")).unwrap(), None, &mut layer).unwrap();
    let layer = layer.into_inner();
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&layer)));
    let manifest_of = |digest: &str, size: usize| {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": format!("sha256:{}", hex::encode(Sha256::digest(b"{}"))), "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": size,
                        "annotations": {"containerd.io/snapshot/overlaybd/blob-digest": digest}}],
        }))
        .unwrap()
    };
    let manifest = manifest_of(&digest, layer.len());
    let manifest_digest = format!("sha256:{}", hex::encode(Sha256::digest(&manifest)));
    for repo in ["team/img", "other/img"] {
        let dir = h.p(&format!("srv/v2/{repo}"));
        std::fs::create_dir_all(dir.join("blobs")).unwrap();
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        std::fs::write(dir.join("blobs").join(&digest), &layer).unwrap();
        // By tag and by digest, as a registry serves a manifest.
        std::fs::write(dir.join("manifests/v1"), &manifest).unwrap();
        std::fs::write(dir.join("manifests").join(&manifest_digest), &manifest).unwrap();
    }
    let mut node = h.node().await;
    let addr = h.server.addr;
    let reference = |repo: &str| format!("oci+http://{addr}/{repo}:v1");
    for (vol, repo) in [("vol-r1", "team/img"), ("vol-r2", "other/img")] {
        node.node_stage_volume(h.stage_req(vol, &reference(repo))).await.unwrap_or_else(|e| panic!("{vol}: {e}\n{}", h.log()));
        node.node_publish_volume(h.publish_req(vol, "pod-r")).await.unwrap_or_else(|e| panic!("{vol}: {e}\n{}", h.log()));
        h.check_files(&h.target("pod-r", vol));
    }
    let caches: Vec<_> =
        std::fs::read_dir(h.p("cache")).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("u-")).collect();
    assert_eq!(caches.len(), 1, "one cache for the one blob: {caches:?}");

    // The tag moves to another image (a layer of zeros) while the volumes are staged; a plugin
    // killed and restarted serves them the image they were staged with.
    let size = std::fs::metadata(h.p("srv/vol.img")).unwrap().len() as usize;
    let mut zeros = std::io::Cursor::new(Vec::new());
    lazy_image_formats::overlaybd::lsmt::write_layer(&mut std::io::Cursor::new(vec![0u8; size]), None, &mut zeros).unwrap();
    let zeros = zeros.into_inner();
    let zd = format!("sha256:{}", hex::encode(Sha256::digest(&zeros)));
    std::fs::write(h.p(&format!("srv/v2/team/img/blobs/{zd}")), &zeros).unwrap();
    std::fs::write(h.p("srv/v2/team/img/manifests/v1"), manifest_of(&zd, zeros.len())).unwrap();
    h.kill();
    h.start().await;
    let mut node = h.node().await;
    // From the devices, not the page cache.
    std::fs::write("/proc/sys/vm/drop_caches", "1").unwrap();
    for vol in ["vol-r1", "vol-r2"] {
        h.check_files(&h.target("pod-r", vol));
    }
    for vol in ["vol-r1", "vol-r2"] {
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: vol.into(), target_path: h.target("pod-r", vol) })
            .await
            .unwrap();
        node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: vol.into(), staging_target_path: h.staging(vol) })
            .await
            .unwrap();
    }
    let got = node.node_stage_volume(h.stage_req("vol-r3", &reference("missing/img"))).await;
    assert_eq!(code(got), Code::NotFound);
    h.assert_clean();
}

async fn check_stats(node: &mut NodeClient<Channel>, volume_id: &str, path: &str) {
    let st = node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: volume_id.into(),
            volume_path: path.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let c = std::ffi::CString::new(path).unwrap();
    let mut vfs = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: a valid path and an output buffer of the right size.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), vfs.as_mut_ptr()) }, 0);
    // SAFETY: statvfs succeeded.
    let vfs = unsafe { vfs.assume_init() };
    let bytes = st.usage.iter().find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32).unwrap();
    let inodes = st.usage.iter().find(|u| u.unit == csi::volume_usage::Unit::Inodes as i32).unwrap();
    assert_eq!(bytes.total as u64, vfs.f_blocks * vfs.f_frsize, "{volume_id}: {st:?}");
    assert_eq!(bytes.used as u64, (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize, "{volume_id}: {st:?}");
    assert_eq!(inodes.total as u64, vfs.f_files, "{volume_id}: {st:?}");
    assert!(bytes.total > 24 << 20 && bytes.total < 64 << 20, "{volume_id}: the image's few dozen MiB, not a disk: {st:?}");
    assert!(!st.volume_condition.unwrap().abnormal);
}

/// Malformed and unsupported requests: each gets its precise gRPC code and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_matrix() {
    if !prerequisites_met() {
        return;
    }
    let h = Harness::new().await;
    let no_range = Harness::new_ignoring_range(&h).await;
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-b", "file:///etc/passwd", "-F", "raw"])
        .arg(h.p("srv/badback.qcow2"))
        .arg("1M")
        .output();
    assert!(out.is_ok_and(|o| o.status.success()), "qemu-img (qemu-utils) makes the qcow2 case");
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
        (
            "a qcow2 image over http naming a local backing file",
            with(&|r| r.volume_context = ctx(&[("url", &h.url("badback.qcow2"))])),
            Code::InvalidArgument,
        ),
        (
            "local file while local sources are off",
            with(&|r| r.volume_context = ctx(&[("url", "file:///etc/hostname")])),
            Code::PermissionDenied,
        ),
        ("device while local devices are off", with(&|r| r.volume_context = ctx(&[("device", "/dev/null")])), Code::PermissionDenied),
        ("no access mode", with(&|r| r.volume_capability = Some(mount_cap(Mode::Unknown))), Code::InvalidArgument),
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
        (
            "unknown format",
            with(&|r| {
                r.volume_context.insert("format".into(), "xfs".into());
            }),
            Code::InvalidArgument,
        ),
        (
            "unknown attribute",
            with(&|r| {
                r.volume_context.insert("chunksize".into(), "64K".into());
            }),
            Code::InvalidArgument,
        ),
        (
            "bad digest",
            with(&|r| {
                r.volume_context.insert("digest".into(), "sha256:beef".into());
            }),
            Code::InvalidArgument,
        ),
        ("staging path outside the kubelet root", with(&|r| r.staging_target_path = "/tmp/elsewhere".into()), Code::InvalidArgument),
        (
            "staging path escaping the kubelet root",
            with(&|r| r.staging_target_path = format!("{}/../../etc", h.staging("x"))),
            Code::InvalidArgument,
        ),
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
    let r = node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "nope".into(),
            volume_path: h.target("p", "v"),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::NotFound);
    let r = node.node_get_volume_stats(csi::NodeGetVolumeStatsRequest { volume_id: "nope".into(), ..Default::default() }).await;
    assert_eq!(code(r), Code::InvalidArgument);
    let r = node.node_expand_volume(csi::NodeExpandVolumeRequest { volume_id: "v".into(), ..Default::default() }).await;
    assert_eq!(code(r), Code::Unimplemented);

    // A conflicting second stage of a staged volume.
    node.node_stage_volume(good.clone()).await.unwrap();
    // A writer's mode without readonly asks for writes: refused, saying what to change.
    let mut p = h.publish_req("vol-b", "p");
    p.volume_capability = Some(mount_cap(Mode::MultiNodeMultiWriter));
    p.readonly = false;
    let multi = node.node_publish_volume(p).await.unwrap_err();
    assert_eq!(multi.code(), Code::InvalidArgument);
    assert!(multi.message().contains("MULTI_NODE_MULTI_WRITER") && multi.message().contains("readOnly: true"), "{}", multi.message());
    assert!(!Path::new(&h.target("p", "vol-b")).join("hello.txt").exists(), "nothing was published");
    assert!(h.log().contains("request refused") && h.log().contains("vol-b"), "refusals are logged:\n{}", h.log());
    let other = with(&|r| r.volume_context = ctx(&[("url", &h.url("vol2.img"))]));
    assert_eq!(code(node.node_stage_volume(other).await), Code::AlreadyExists);
    let mut elsewhere = good.clone();
    elsewhere.staging_target_path = h.staging("vol-b-2");
    assert_eq!(code(node.node_stage_volume(elsewhere).await), Code::AlreadyExists);
    // Publishing from a staging path that is not the volume's.
    let mut p = h.publish_req("vol-b", "p");
    p.staging_target_path = h.staging("other");
    assert_eq!(code(node.node_publish_volume(p).await), Code::FailedPrecondition);
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: "vol-b".into(), staging_target_path: h.staging("vol-b") })
        .await
        .unwrap();
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
    // The origin holds its answers: the first stage waits on it, inside its operation.
    h.faults.hold.set(true);
    let req = h.stage_req("vol-c", &h.url("vol.img"));
    let mut n1 = h.node().await;
    let r1 = req.clone();
    let first = tokio::spawn(async move { n1.node_stage_volume(r1).await });
    let t = Instant::now();
    while h.faults.hold.waiting() == 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "the first stage did not reach the origin");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut n2 = h.node().await;
    let second = n2.node_stage_volume(req.clone()).await;
    assert_eq!(code(second), Code::Aborted);
    h.faults.hold.set(false);
    first.await.unwrap().unwrap();
    n2.node_stage_volume(req).await.expect("the same call succeeds once the first is done");
    n2.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: "vol-c".into(), staging_target_path: h.staging("vol-c") })
        .await
        .unwrap();
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
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "vol-d".into(),
            volume_path: target.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let cond = st.volume_condition.unwrap();
    assert!(cond.abnormal && cond.message.contains("changed"), "{cond:?}");
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: "vol-d".into(), target_path: target }).await.unwrap();
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: "vol-d".into(), staging_target_path: h.staging("vol-d") })
        .await
        .unwrap();
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
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "vol-f".into(),
            volume_path: target.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let cond = st.volume_condition.unwrap();
    assert!(cond.abnormal && cond.message.contains("No space left"), "{cond:?}\n{}", h.log());
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: "vol-f".into(), target_path: target }).await.unwrap();
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: "vol-f".into(), staging_target_path: h.staging("vol-f") })
        .await
        .unwrap();
    assert!(Command::new("umount").arg(h.p("cache")).status().unwrap().success(), "unmounting the test's tmpfs");
    h.assert_clean();
}

/// A container's reader (run in a mount namespace of its own, through a bind mount of the pod's
/// path): reads `file` in 64 KiB reads and prints its progress with the monotonic clock, then
/// the SHA-256, the bytes, the errors and its longest wait for one read; then, at a line on
/// stdin, reads `file` again, uncached (reads after the restart).
const READER: &str = r#"
import hashlib, sys, time
def read(path):
    h, n, errors, stall = hashlib.sha256(), 0, 0, 0.0
    with open(path, 'rb', buffering=0) as f:
        while True:
            t = time.monotonic()
            try:
                b = f.read(65536)
            except OSError as e:
                print('error', e, flush=True)
                errors += 1
                break
            stall = max(stall, time.monotonic() - t)
            if not b:
                break
            h.update(b)
            n += len(b)
            print('read', n, time.monotonic(), flush=True)
    print('done', h.hexdigest(), n, errors, int(stall * 1000), flush=True)
read(sys.argv[1])
sys.stdin.readline()
with open('/proc/sys/vm/drop_caches', 'w') as f:
    f.write('3')
read(sys.argv[1])
"#;

/// kill -9 the plugin while a container reads its volume, with a read waiting on the origin, and
/// start it again: the reader, in its own mount namespace like a container, sees no error and
/// the image's bytes, on either backend (ublk: the kernel holds the device's I/O; FUSE+loop: the
/// fd holder keeps the FUSE session and the next plugin takes it over). Its longest wait is
/// reported. The old mount keeps working after the restart, calls stay idempotent, and teardown
/// leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_under_a_reading_container_loses_no_read() {
    if !prerequisites_met() {
        return;
    }
    use sha2::{Digest, Sha256};
    use std::io::{BufRead, Write};
    let mut h = Harness::new().await;
    let mut node = h.node().await;
    node.node_stage_volume(h.stage_req("vol-r", &h.url("vol.img"))).await.unwrap();
    node.node_publish_volume(h.publish_req("vol-r", "pod")).await.unwrap();
    let target = h.target("pod", "vol-r");
    let want = hex::encode(Sha256::digest(&h.files["data/big.bin"]));

    // The origin stalls on the middle of the file: the reader's read there waits on a fetch
    // the plugin has in flight for a kernel request it holds.
    let image = std::fs::read(h.p("srv/vol.img")).unwrap();
    let big = &h.files["data/big.bin"];
    let base = image.windows(4096).position(|w| w == &big[..4096]).expect("the file's bytes in the image") as u64;
    let middle = 12u64 << 20;
    assert_eq!(&image[(base + middle) as usize..][..4096], &big[middle as usize..][..4096], "the file lies in one piece");
    h.faults.hold.only_at(Some(base + middle));
    h.faults.hold.set(true);
    // As a container runtime does: a mount namespace of its own, the pod's path bind-mounted
    // into the container's root.
    let rootfs = h.p("container/rootfs/model");
    std::fs::create_dir_all(&rootfs).unwrap();
    let mut reader = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            r#"mount --bind -o ro "$1" "$2" && exec python3 -c "$3" "$2/data/big.bin""#,
            "sh",
        ])
        .arg(&target)
        .arg(&rootfs)
        .arg(READER)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("unshare and python3");
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let out = reader.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let t = Instant::now();
    while h.faults.hold.waiting() == 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "no origin request waited");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The reader blocks in the kernel once it reaches the held bytes; with FUSE, the request
    // it waits on is in the plugin's hands: the next plugin must have the kernel send it again.
    let blocked = || {
        std::fs::read_to_string(format!("/proc/{}/stat", reader.id()))
            .is_ok_and(|st| st.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('D')))
    };
    let waiting = (backend() == "fuse").then(|| fuse_requests_waiting(&h.staging("vol-r")));
    let t = Instant::now();
    while !blocked() || waiting.as_ref().is_some_and(|w| w() == 0) {
        assert!(t.elapsed() < Duration::from_secs(30), "the reader did not block on the held bytes");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while let Ok(l) = lines.try_recv() {
        assert!(l.starts_with("read "), "{l}");
    }
    let down = Instant::now();
    let kill_at = monotonic_s();
    h.kill();
    h.faults.hold.set(false);
    h.start().await;
    let ready_ms = down.elapsed().as_millis();
    let mut l = next(&mut lines).await;
    let resumed_at: f64 = l.rsplit(' ').next().and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("{l}"));
    let resumed_ms = ((resumed_at - kill_at) * 1000.0) as u64;
    while l.starts_with("read ") {
        l = next(&mut lines).await;
    }
    let f: Vec<&str> = l.split(' ').collect();
    assert_eq!(f[0], "done", "the read across the restart failed: {l}\n{}", h.log());
    assert_eq!((f[1], f[2], f[3]), (want.as_str(), &*(24usize << 20).to_string(), "0"), "{l}");
    report(&format!("CSI plugin kill -9 under a reading container ({}): ready again after {ready_ms} ms, the blocked read answered {resumed_ms} ms after the kill, 0 read errors", backend()));

    // Reads after the restart, through the container's old mount, uncached.
    writeln!(reader.stdin.as_mut().unwrap()).unwrap();
    let l = next(&mut lines).await;
    let mut l = l;
    while l.starts_with("read ") {
        l = next(&mut lines).await;
    }
    assert!(l.starts_with(&format!("done {want} ")) && l.contains(" 0 "), "{l}\n{}", h.log());
    assert!(reader.wait().unwrap().success());

    let mut node = h.node().await;
    h.check_files(&target);
    let st = node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "vol-r".into(),
            volume_path: target.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!st.volume_condition.unwrap().abnormal);
    // Repeated calls after the restart are still idempotent.
    node.node_stage_volume(h.stage_req("vol-r", &h.url("vol.img"))).await.unwrap();
    node.node_publish_volume(h.publish_req("vol-r", "pod")).await.unwrap();
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: "vol-r".into(), target_path: target }).await.unwrap();
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: "vol-r".into(), staging_target_path: h.staging("vol-r") })
        .await
        .unwrap();
    h.assert_clean();
}

/// A reader of the number of requests of the FUSE connection under the loop device mounted at
/// `staging` that the kernel has queued for the plugin or handed to it (fusectl's `waiting`).
fn fuse_requests_waiting(staging: &str) -> impl Fn() -> u64 {
    let conns = Path::new("/sys/fs/fuse/connections");
    if std::fs::read_dir(conns).map_or(true, |mut d| d.next().is_none()) {
        let st = Command::new("mount").args(["-t", "fusectl", "fusectl"]).arg(conns).status().unwrap();
        assert!(st.success(), "mounting fusectl");
    }
    let dev = lazy_image_attach::mount_source(Path::new(staging)).unwrap().expect("staging mount");
    let fuse_dev = lazy_image_attach::LoopDevice::existing(dev).backing_dev().expect("a bound loop device");
    let file = conns.join(libc::minor(fuse_dev).to_string()).join("waiting");
    move || std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display())).trim().parse().unwrap()
}

/// CLOCK_MONOTONIC in seconds, the clock of Python's `time.monotonic()`.
fn monotonic_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// A measured figure: printed, and appended to $LAZY_IMAGE_RESULTS (the VM harness shows it).
fn report(line: &str) {
    eprintln!("RESULT {line}");
    if let Some(path) = std::env::var_os("LAZY_IMAGE_RESULTS") {
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()));
    }
}

/// The reader's next line, within a deadline.
async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(120), rx.recv()).await.expect("the reader answers within 120 s").expect("reader output")
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
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: "vol-w".into(), staging_target_path: h.staging("vol-w") })
        .await
        .unwrap();

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
    std::fs::write("/proc/sys/vm/drop_caches", "1").unwrap();
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
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: "vol-d".into(), staging_target_path: h.staging("vol-d") })
        .await
        .unwrap();
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

/// Drops a file's clean pages from the page cache, so the next read comes from the device. (Not
/// `drop_caches`: dropping every cache at once makes unmounts running beside it fail with
/// EBUSY now and then.)
fn evict(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // SAFETY: fadvise on a descriptor we own; no memory is passed.
    assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
}

fn syncfs(dir: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir)?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writable volumes (attribute `writable: "true"`) as kubelet and csi-sanity send them: a PV
/// staged with SINGLE_NODE_WRITER and published without readonly (every call twice), and an
/// inline volume. Files written read back from the device; a read-only volume of the same image
/// on the node and a readonly publish of the writable one behave as read-only; a plugin killed
/// and restarted keeps the volume's writes and goes on writing; teardown drops the layer; a
/// writer's mode on many nodes is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writable_volumes() {
    if !prerequisites_met() {
        return;
    }
    let mut h = Harness::new().await;
    let out = Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(h.p("tree")).arg(h.p("srv/rw.img")).arg("64M").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let url = h.url("rw.img");
    let attrs: HashMap<String, String> = [("url", url.as_str()), ("writable", "true"), ("writableSize", "32Mi")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut node = h.node().await;

    let stage = csi::NodeStageVolumeRequest {
        volume_id: "vol-w".into(),
        staging_target_path: h.staging("vol-w"),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        volume_context: attrs.clone(),
        ..Default::default()
    };
    let publish = csi::NodePublishVolumeRequest {
        volume_id: "vol-w".into(),
        staging_target_path: h.staging("vol-w"),
        target_path: h.target("pod", "vol-w"),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        readonly: false,
        volume_context: attrs.clone(),
        ..Default::default()
    };
    for _ in 0..2 {
        node.node_stage_volume(stage.clone()).await.unwrap_or_else(|e| panic!("stage: {e}\n{}", h.log()));
    }
    for _ in 0..2 {
        node.node_publish_volume(publish.clone()).await.unwrap_or_else(|e| panic!("publish: {e}\n{}", h.log()));
    }
    let target = publish.target_path.clone();
    h.check_files(&target);
    let mut written = vec![0u8; 3 << 20];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut written);
    std::fs::write(Path::new(&target).join("written.bin"), &written).unwrap();
    std::fs::remove_file(Path::new(&target).join("hello.txt")).unwrap();
    syncfs(&target).expect("the writable layer takes the writes");
    check_stats(&mut node, "vol-w", &target).await;

    // The same image read-only beside it: the original files, and no writing.
    node.node_stage_volume(h.stage_req("vol-r", &url)).await.unwrap();
    node.node_publish_volume(h.publish_req("vol-r", "pod")).await.unwrap();
    let ro_target = h.target("pod", "vol-r");
    h.check_files(&ro_target);
    assert!(!Path::new(&ro_target).join("written.bin").exists());
    // The writable volume published readonly to a second pod: read-only there.
    let ro_publish = csi::NodePublishVolumeRequest { target_path: h.target("pod-2", "vol-w"), readonly: true, ..publish.clone() };
    node.node_publish_volume(ro_publish.clone()).await.unwrap();
    let err = std::fs::write(Path::new(&ro_publish.target_path).join("x"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert!(std::fs::read(Path::new(&ro_publish.target_path).join("written.bin")).unwrap() == written);

    // kill -9 and restart: the volume is taken over with its layer.
    h.kill();
    h.start().await;
    let mut node = h.node().await;
    evict(&Path::new(&target).join("written.bin"));
    assert!(std::fs::read(Path::new(&target).join("written.bin")).unwrap() == written, "written bytes after the restart");
    assert!(!Path::new(&target).join("hello.txt").exists());
    std::fs::write(Path::new(&target).join("after.bin"), &written[..100_000]).unwrap();
    syncfs(&target).expect("writes go on after the restart");
    evict(&Path::new(&target).join("after.bin"));
    assert!(std::fs::read(Path::new(&target).join("after.bin")).unwrap() == written[..100_000]);
    assert!(h.p("state/layers/vol-w").exists());

    for p in [&publish, &ro_publish] {
        for _ in 0..2 {
            node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: "vol-w".into(), target_path: p.target_path.clone() })
                .await
                .unwrap();
        }
    }
    for _ in 0..2 {
        node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: "vol-w".into(), staging_target_path: h.staging("vol-w") })
            .await
            .unwrap();
    }
    assert!(!h.p("state/layers/vol-w").exists(), "the layer is dropped at unstage");
    h.check_files(&ro_target);
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: "vol-r".into(), target_path: ro_target.clone() })
        .await
        .unwrap();
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: "vol-r".into(), staging_target_path: h.staging("vol-r") })
        .await
        .unwrap();

    // An inline volume, as kubelet sends it (SINGLE_NODE_WRITER, readOnly unset).
    let inline = h.kubelet_inline_publish("pod-i", "scratch", false, &[("url", &url), ("writable", "true")]);
    node.node_publish_volume(inline.clone()).await.unwrap_or_else(|e| panic!("inline: {e}\n{}", h.log()));
    std::fs::write(Path::new(&inline.target_path).join("scratch.bin"), &written).unwrap();
    syncfs(&inline.target_path).unwrap();
    h.check_files(&inline.target_path);
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: inline.volume_id.clone(),
        target_path: inline.target_path.clone(),
    })
    .await
    .unwrap();
    let layers: Vec<_> = std::fs::read_dir(h.p("state/layers")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(layers.is_empty(), "layers left behind: {layers:?}");

    // Writers on many nodes cannot share one node's layer.
    let many = csi::NodeStageVolumeRequest { volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter)), ..stage.clone() };
    let e = node.node_stage_volume(many).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("ReadWriteOnce"), "{}", e.message());
    h.assert_clean();
}
