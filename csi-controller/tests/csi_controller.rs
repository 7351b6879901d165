//! Plays the external-provisioner against the real `lazy-image-csi-controller` binary over its
//! Unix socket: CreateVolume as the provisioner sends it (with `--extra-create-metadata`: the
//! claim's name and namespace in the parameters), from a StorageClass `url`, a StorageClass
//! `image`, and claim annotations read from a Kubernetes API (an in-process fake API server on
//! 127.0.0.1 that serves the claims and LazyImages of each case); every call twice; concurrent
//! calls on one name; and the bad-input matrix with the exact gRPC code of each case.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use lazy_image_proto::csi::v1 as csi;
use lazy_image_proto::csi::v1::controller_client::ControllerClient;
use lazy_image_proto::csi::v1::identity_client::IdentityClient;
use lazy_image_proto::csi::v1::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume};
use lazy_image_serve::Faults;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_lazy-image-csi-controller");
const IMAGE_SIZE: usize = 3 << 20;

/// Events posted to the fake API: (namespace path, body).
type Posted = Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>;

/// Serves GET of the objects in `objects` (path -> JSON) and takes POSTed events (kept in the
/// returned list); 404 with a Kubernetes Status for the rest.
async fn fake_api(objects: HashMap<String, serde_json::Value>) -> (u16, Posted) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let objects = Arc::new(objects);
    let posted: Posted = Arc::default();
    let p = posted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else { return };
            let (objects, p) = (objects.clone(), p.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (objects, p) = (objects.clone(), p.clone());
                    async move {
                        let (method, path) = (req.method().clone(), req.uri().path().to_string());
                        let body = http_body_util::BodyExt::collect(req.into_body()).await.map(|b| b.to_bytes()).unwrap_or_default();
                        let found = match method {
                            hyper::Method::GET => objects.get(&path).cloned().map(|v| (200, v)),
                            hyper::Method::POST if path.ends_with("/events") => {
                                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                                p.lock().unwrap().push((path, v.clone()));
                                Some((201, v))
                            }
                            _ => None,
                        };
                        let (status, body) = found.unwrap_or_else(|| {
                            (404, serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}))
                        });
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body.to_string())))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    (port, posted)
}

struct Harness {
    tmp: tempfile::TempDir,
    controller: Option<Child>,
    server: lazy_image_serve::ServerHandle,
    faults: Arc<Faults>,
    events: Posted,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.server.shutdown();
    }
}

impl Harness {
    async fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let srv = tmp.path().join("srv");
        std::fs::create_dir_all(&srv).unwrap();
        std::fs::write(srv.join("model.img"), vec![7u8; IMAGE_SIZE]).unwrap();
        let faults = Arc::new(Faults::new());
        let server = lazy_image_serve::spawn(&srv, "127.0.0.1:0".parse().unwrap(), Some(faults.clone())).await.unwrap();
        let url = server.url("model.img");
        let pvc = |name: &str, ann: serde_json::Value| {
            (
                format!("/api/v1/namespaces/team/persistentvolumeclaims/{name}"),
                serde_json::json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": "team", "annotations": ann}, "spec": {}}),
            )
        };
        let objects = HashMap::from([
            pvc("by-url", serde_json::json!({"lazy-image.csi.dev/url": url})),
            pvc("by-image", serde_json::json!({"lazy-image.csi.dev/image": "model"})),
            pvc("by-missing-image", serde_json::json!({"lazy-image.csi.dev/image": "nope"})),
            pvc("bare", serde_json::json!({})),
            (
                "/apis/lazy-image.csi.dev/v1alpha1/lazyimages/model".to_string(),
                serde_json::json!({"apiVersion": "lazy-image.csi.dev/v1alpha1", "kind": "LazyImage", "metadata": {"name": "model"}, "spec": {"url": url, "format": "erofs"}}),
            ),
        ]);
        let (port, events) = fake_api(objects).await;
        let kubeconfig = tmp.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(tmp.path().join("controller.log")).unwrap();
        let socket = tmp.path().join("csi/csi.sock");
        let child = Command::new(BIN)
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .env("KUBECONFIG", &kubeconfig)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let h = Harness { tmp, controller: Some(child), server, faults, events };
        let t = Instant::now();
        loop {
            assert!(t.elapsed() < Duration::from_secs(30), "controller did not answer:\n{}", h.log());
            if let Ok(ch) = h.try_channel().await {
                if IdentityClient::new(ch).probe(csi::ProbeRequest {}).await.is_ok() {
                    return h;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("controller.log")).unwrap_or_default()
    }

    fn socket(&self) -> PathBuf {
        self.tmp.path().join("csi/csi.sock")
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

    async fn client(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.try_channel().await.unwrap())
    }
}

fn cap(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

/// CreateVolume as the external-provisioner sends it for a ReadOnlyMany claim of `size` bytes
/// of StorageClass `params`, with `--extra-create-metadata`.
fn create(name: &str, claim: &str, size: i64, params: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    let mut parameters: HashMap<String, String> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    parameters.insert("csi.storage.k8s.io/pvc/name".into(), claim.into());
    parameters.insert("csi.storage.k8s.io/pvc/namespace".into(), "team".into());
    parameters.insert("csi.storage.k8s.io/pv/name".into(), name.into());
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: size, limit_bytes: 0 }),
        volume_capabilities: vec![cap(Mode::MultiNodeReaderOnly)],
        parameters,
        ..Default::default()
    }
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_capabilities() {
    let h = Harness::new().await;
    let mut id = IdentityClient::new(h.try_channel().await.unwrap());
    assert_eq!(id.get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap().into_inner().name, "lazy-image.csi.dev");
    let caps = id.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    use csi::plugin_capability::{service::Type as S, Type as P};
    assert!(caps.capabilities.iter().any(|c| matches!(&c.r#type, Some(P::Service(s)) if s.r#type == S::ControllerService as i32)));
    let caps = h.client().await.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {}).await.unwrap().into_inner();
    use csi::controller_service_capability::{rpc::Type, Type as C};
    let types: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(C::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect();
    assert_eq!(types, vec![Type::CreateDeleteVolume as i32, Type::ListVolumes as i32], "no ControllerPublish: attachRequired is false");
}

/// A StorageClass `url`, a StorageClass `image`, a claim annotated with a URL and one naming a
/// LazyImage: each gives the image's size as capacity and a context the node plugin stages from;
/// every call twice; ListVolumes sees them; DeleteVolume twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisions_from_class_and_claim() {
    let h = Harness::new().await;
    let mut c = h.client().await;
    let url = h.server.url("model.img");
    let cases = [
        ("pvc-class-url", create("pvc-class-url", "bare", 1 << 20, &[("url", &url), ("chunkSize", "64K")])),
        ("pvc-class-image", create("pvc-class-image", "bare", 0, &[("image", "model")])),
        ("pvc-claim-url", create("pvc-claim-url", "by-url", IMAGE_SIZE as i64, &[("prefetch", "true")])),
        ("pvc-claim-image", create("pvc-claim-image", "by-image", 0, &[])),
    ];
    for (name, req) in &cases {
        let mut first = None;
        for _ in 0..2 {
            let v = c.create_volume(req.clone()).await.unwrap_or_else(|e| panic!("{name}: {e}\n{}", h.log())).into_inner().volume.unwrap();
            assert_eq!(v.volume_id, *name);
            assert_eq!(v.capacity_bytes, IMAGE_SIZE as i64, "{name}: capacity is the image's size");
            assert_eq!(v.volume_context.get("url"), Some(&url), "{name}");
            lazy_image_csi_common::attributes::VolumeSpec::from_attributes(&v.volume_context)
                .unwrap_or_else(|e| panic!("{name}: the node plugin refuses {:?}: {e}", v.volume_context));
            assert!(first.as_ref().is_none_or(|f| *f == v), "{name}: the same volume both times");
            first = Some(v);
        }
    }
    let ctx = |name: &str| {
        let mut c = c.clone();
        let req = cases.iter().find(|(n, _)| *n == name).unwrap().1.clone();
        async move { c.create_volume(req).await.unwrap().into_inner().volume.unwrap().volume_context }
    };
    assert_eq!(ctx("pvc-claim-image").await.get("format").map(String::as_str), Some("erofs"), "the LazyImage's attributes");
    assert_eq!(ctx("pvc-claim-url").await.get("prefetch").map(String::as_str), Some("true"), "the class's defaults");

    // The claim is told which image its volume serves.
    let t = Instant::now();
    loop {
        let ev = h.events.lock().unwrap().clone();
        let on = |claim: &str| {
            ev.iter()
                .any(|(path, e)| path.contains("/namespaces/team/") && e["regarding"]["name"] == claim && e["reason"] == "ImageResolved")
        };
        if on("by-url") && on("by-image") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no ImageResolved events on the claims: {ev:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let list = c.list_volumes(csi::ListVolumesRequest { max_entries: 3, starting_token: String::new() }).await.unwrap().into_inner();
    assert_eq!(list.entries.len(), 3);
    let rest = c.list_volumes(csi::ListVolumesRequest { max_entries: 3, starting_token: list.next_token }).await.unwrap().into_inner();
    assert_eq!((rest.entries.len(), rest.next_token.as_str()), (1, ""));

    let ok = c
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "pvc-class-url".into(),
            volume_capabilities: vec![cap(Mode::MultiNodeReaderOnly)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some(), "{ok:?}");
    let no = c
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "pvc-class-url".into(),
            volume_capabilities: vec![cap(Mode::SingleNodeWriter)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none() && no.message.contains("ReadOnlyMany"), "{no:?}");

    for (name, _) in &cases {
        for _ in 0..2 {
            c.delete_volume(csi::DeleteVolumeRequest { volume_id: name.to_string(), ..Default::default() }).await.unwrap();
        }
    }
    let list = c.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    assert!(list.entries.is_empty());
}

/// Each malformed or unservable request gets its precise code and a sentence for
/// `kubectl describe pvc`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_matrix() {
    let h = Harness::new().await;
    let mut c = h.client().await;
    let url = h.server.url("model.img");
    let with = |f: &dyn Fn(&mut csi::CreateVolumeRequest)| {
        let mut r = create("pvc-bad", "bare", 0, &[("url", &url)]);
        f(&mut r);
        r
    };
    let cases: Vec<(&str, csi::CreateVolumeRequest, Code, &str)> = vec![
        ("no name", with(&|r| r.name.clear()), Code::InvalidArgument, "name"),
        ("no capabilities", with(&|r| r.volume_capabilities.clear()), Code::InvalidArgument, "volume_capabilities"),
        (
            "ReadWriteOnce claim",
            with(&|r| r.volume_capabilities = vec![cap(Mode::SingleNodeWriter)]),
            Code::InvalidArgument,
            "ReadOnlyMany",
        ),
        (
            "ReadWriteMany claim",
            with(&|r| r.volume_capabilities = vec![cap(Mode::MultiNodeMultiWriter)]),
            Code::InvalidArgument,
            "ReadOnlyMany",
        ),
        (
            "ReadWriteMany claim of a writable class",
            with(&|r| {
                r.volume_capabilities = vec![cap(Mode::MultiNodeMultiWriter)];
                r.parameters.insert("writable".into(), "true".into());
            }),
            Code::InvalidArgument,
            "ReadWriteOnce",
        ),
        (
            "ReadWriteOncePod claim",
            with(&|r| r.volume_capabilities = vec![cap(Mode::SingleNodeSingleWriter)]),
            Code::InvalidArgument,
            "ReadOnlyMany",
        ),
        (
            "block volume",
            with(&|r| {
                r.volume_capabilities = vec![csi::VolumeCapability {
                    access_type: Some(AccessType::Block(BlockVolume {})),
                    access_mode: Some(AccessMode { mode: Mode::MultiNodeReaderOnly as i32 }),
                }]
            }),
            Code::InvalidArgument,
            "Filesystem",
        ),
        (
            "claim larger than the image",
            with(&|r| r.capacity_range = Some(csi::CapacityRange { required_bytes: IMAGE_SIZE as i64 + 1, limit_bytes: 0 })),
            Code::OutOfRange,
            "3145728",
        ),
        (
            "limit below the image",
            with(&|r| r.capacity_range = Some(csi::CapacityRange { required_bytes: 0, limit_bytes: 1 << 20 })),
            Code::OutOfRange,
            "limit",
        ),
        (
            "negative size",
            with(&|r| r.capacity_range = Some(csi::CapacityRange { required_bytes: -1, limit_bytes: 0 })),
            Code::InvalidArgument,
            "negative",
        ),
        ("no image anywhere", create("pvc-bad", "bare", 0, &[]), Code::InvalidArgument, "lazy-image.csi.dev/url"),
        (
            "class url and image",
            with(&|r| {
                r.parameters.insert("image".into(), "model".into());
            }),
            Code::InvalidArgument,
            "keep one",
        ),
        (
            "unknown attribute",
            with(&|r| {
                r.parameters.insert("fromat".into(), "ext4".into());
            }),
            Code::InvalidArgument,
            "fromat",
        ),
        ("not an http url", create("pvc-bad", "bare", 0, &[("url", "ftp://127.0.0.1/x.img")]), Code::InvalidArgument, "http"),
        ("missing LazyImage", create("pvc-bad", "by-missing-image", 0, &[]), Code::NotFound, "nope"),
        (
            "missing image at the origin",
            create("pvc-bad", "bare", 0, &[("url", &h.server.url("missing.img"))]),
            Code::NotFound,
            "missing.img",
        ),
        ("unreachable origin", create("pvc-bad", "bare", 0, &[("url", "http://127.0.0.1:9/x.img")]), Code::Unavailable, "127.0.0.1:9"),
        ("missing claim", create("pvc-bad", "ghost", 0, &[]), Code::NotFound, "ghost"),
        (
            "content source",
            with(&|r| r.volume_content_source = Some(csi::VolumeContentSource::default())),
            Code::InvalidArgument,
            "snapshot",
        ),
    ];
    for (what, req, want, says) in cases {
        let (got, msg) = code(c.create_volume(req).await);
        assert_eq!(got, want, "{what}: {msg}");
        assert!(msg.contains(says), "{what}: {msg:?} should mention {says:?}");
    }
    assert!(
        c.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner().entries.is_empty(),
        "refused calls made nothing"
    );
    assert!(h.log().contains("request refused"), "refusals are logged");

    // A name taken with other parameters.
    c.create_volume(create("pvc-taken", "bare", 0, &[("url", &url)])).await.unwrap();
    let (got, _) = code(c.create_volume(create("pvc-taken", "bare", 0, &[("url", &url), ("format", "ext4")])).await);
    assert_eq!(got, Code::AlreadyExists);
    let (got, _) = code(c.delete_volume(csi::DeleteVolumeRequest::default()).await);
    assert_eq!(got, Code::InvalidArgument);
    let (got, _) = code(
        c.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest { volume_id: "ghost".into(), ..Default::default() }).await,
    );
    assert_eq!(got, Code::NotFound);
    let (got, _) = code(c.list_volumes(csi::ListVolumesRequest { max_entries: 0, starting_token: "no-such-token".into() }).await);
    assert_eq!(got, Code::Aborted);
}

/// Two CreateVolume calls of one name at once: the second is refused with ABORTED while the
/// first probes the origin, and succeeds once it is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_create_of_one_name() {
    let h = Harness::new().await;
    let url = h.server.url("model.img");
    h.faults.hold.set(true);
    let req = create("pvc-c", "bare", 0, &[("url", &url)]);
    let mut c1 = h.client().await;
    let r1 = req.clone();
    let first = tokio::spawn(async move { c1.create_volume(r1).await });
    let t = Instant::now();
    while h.faults.hold.waiting() == 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the first call did not reach the origin");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut c2 = h.client().await;
    assert_eq!(code(c2.create_volume(req.clone()).await).0, Code::Aborted);
    h.faults.hold.set(false);
    let v1 = first.await.unwrap().unwrap().into_inner().volume.unwrap();
    let v2 = c2.create_volume(req).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(v1, v2);
}

/// A registry image (our server laid out as a registry) is provisioned pinned to the manifest
/// its tag resolved to: the volume's url carries the digest, so every node serves that image
/// however the tag moves, and a later claim gets what the tag names then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisions_registry_images_pinned_by_digest() {
    use sha2::{Digest, Sha256};
    let h = Harness::new().await;
    let mut c = h.client().await;
    let digest = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
    let repo = h.tmp.path().join("srv/v2/models/m");
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("manifests")).unwrap();
    let publish = |blob: &[u8]| -> String {
        std::fs::write(repo.join("blobs").join(digest(blob)), blob).unwrap();
        let m = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest(b"{}"), "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(blob), "size": blob.len()}],
        }))
        .unwrap();
        std::fs::write(repo.join("manifests/v1"), &m).unwrap();
        digest(&m)
    };
    let first = publish(&vec![1u8; 1 << 20]);
    let url = format!("oci+http://{}/models/m:v1", h.server.addr);
    let v = c.create_volume(create("pvc-oci-1", "bare", 0, &[("url", &url)])).await.unwrap_or_else(|e| panic!("{e}\n{}", h.log()));
    let v = v.into_inner().volume.unwrap();
    assert_eq!(v.capacity_bytes, 1 << 20, "capacity is the image's blob bytes");
    assert_eq!(v.volume_context.get("url"), Some(&format!("{url}@{first}")), "pinned to the manifest the tag named");
    lazy_image_csi_common::attributes::VolumeSpec::from_attributes(&v.volume_context).unwrap();

    let second = publish(&vec![2u8; 2 << 20]);
    let again = c.create_volume(create("pvc-oci-1", "bare", 0, &[("url", &url)])).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(again, v, "the same volume for the same call, whatever the tag names now");
    let v2 = c.create_volume(create("pvc-oci-2", "bare", 0, &[("url", &url)])).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(v2.volume_context.get("url"), Some(&format!("{url}@{second}")));
    let (code, msg) =
        code(c.create_volume(create("pvc-oci-3", "bare", 0, &[("url", &format!("oci+http://{}/models/none:v1", h.server.addr))])).await);
    assert_eq!(code, Code::NotFound, "{msg}");
}

/// A StorageClass with `writable: "true"`: ReadWriteOnce and ReadWriteOncePod claims are
/// provisioned, with the attribute in the volume's context for the node, and validated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisions_writable_volumes_for_one_node_writers() {
    let h = Harness::new().await;
    let mut c = h.client().await;
    let url = h.server.url("model.img");
    for (name, mode) in [("pvc-rwo", Mode::SingleNodeWriter), ("pvc-rwop", Mode::SingleNodeSingleWriter)] {
        let mut r = create(name, name, 0, &[("url", &url), ("writable", "true"), ("writableSize", "1Gi")]);
        r.volume_capabilities = vec![cap(mode)];
        let v = c.create_volume(r).await.unwrap_or_else(|e| panic!("{name}: {e}")).into_inner().volume.unwrap();
        assert_eq!(v.volume_context.get("writable").map(String::as_str), Some("true"), "{v:?}");
        assert_eq!(v.volume_context.get("writableSize").map(String::as_str), Some("1Gi"), "{v:?}");
        let ok = c
            .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: name.into(),
                volume_capabilities: vec![cap(mode)],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(ok.confirmed.is_some(), "{ok:?}");
        c.delete_volume(csi::DeleteVolumeRequest { volume_id: name.into(), ..Default::default() }).await.unwrap();
    }
}
