//! A real OCI registry for the tests: Debian's `docker-registry` (the CNCF distribution
//! registry) on 127.0.0.1, anonymous or behind htpasswd credentials; images are written as OCI
//! layouts and pushed to it with `skopeo`.

use super::{free_port, sh, wait_for, KillOnDrop};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const USER: &str = "tester";
pub const PASSWORD: &str = "s3cret-pass";

pub struct Registry {
    _server: KillOnDrop,
    pub port: u16,
    pub auth: bool,
}

impl Registry {
    pub fn start(dir: &Path, auth: bool) -> Registry {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: lazy-image-test\n",
            dir.join("data").display()
        );
        if auth {
            let out = Command::new("htpasswd").args(["-Bbn", USER, PASSWORD]).output().unwrap();
            assert!(out.status.success());
            std::fs::write(dir.join("htpasswd"), out.stdout).unwrap();
            config += &format!("auth:\n  htpasswd:\n    realm: lazy-image-test\n    path: {}\n", dir.join("htpasswd").display());
        }
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child =
            Command::new("docker-registry").arg("serve").arg(dir.join("config.yml")).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        let server = KillOnDrop::new(child);
        wait_for(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "the registry to listen");
        Registry { _server: server, port, auth }
    }

    /// `oci+http://127.0.0.1:PORT/<name>`.
    pub fn reference(&self, name: &str) -> String {
        format!("oci+http://127.0.0.1:{}/{name}", self.port)
    }

    /// Pushes an OCI layout's image as `repo:tag` with skopeo, digests preserved.
    pub fn push(&self, layout: &Path, repo_tag: &str) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "-q", "--preserve-digests", "--dest-tls-verify=false"]);
        if self.auth {
            cmd.arg(format!("--dest-creds={USER}:{PASSWORD}"));
        }
        cmd.arg(format!("oci:{}:latest", layout.display())).arg(format!("docker://127.0.0.1:{}/{repo_tag}", self.port));
        sh(&mut cmd);
    }
}

/// The Python with `oras` (PyPI) that scripts/test.sh installs under target/.
pub fn oras_python() -> Option<PathBuf> {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/registry-venv/bin/python"));
    let ok = Command::new(&p).args(["-c", "import oras.client"]).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    ok.then_some(p)
}

impl Registry {
    /// Pushes `file` as a single-blob artifact `repo:tag` with ORAS's Python client, as users
    /// publish a model or data set.
    pub fn oras_push(&self, python: &Path, file: &Path, repo_tag: &str) {
        let script = format!(
            "import oras.client\nc = oras.client.OrasClient(hostname='127.0.0.1:{port}', insecure=True)\nr = c.push(files=['{name}'], target='127.0.0.1:{port}/{repo_tag}', disable_path_validation=True)\nassert r.status_code == 201, r\n",
            port = self.port,
            name = file.file_name().unwrap().to_string_lossy(),
        );
        sh(Command::new(python).arg("-c").arg(script).current_dir(file.parent().unwrap()));
    }
}

pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn put_blob(layout: &Path, bytes: &[u8]) -> (String, u64) {
    let hex = sha256_hex(bytes);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&hex), bytes).unwrap();
    (format!("sha256:{hex}"), bytes.len() as u64)
}

/// Writes an OCI layout holding one image whose layers are `layers` (files, bottom first),
/// each with `media_type`, OverlayBD's annotations when `overlaybd`; returns the manifest's
/// digest.
pub fn write_layout(layout: &Path, layers: &[PathBuf], media_type: &str, overlaybd: bool) -> String {
    std::fs::create_dir_all(layout).unwrap();
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let (cfg_digest, cfg_size) = put_blob(layout, b"{}");
    let descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|p| {
            let (digest, size) = put_blob(layout, &std::fs::read(p).unwrap());
            let mut d = serde_json::json!({"mediaType": media_type, "digest": digest, "size": size});
            if overlaybd {
                d["annotations"] = serde_json::json!({
                    "containerd.io/snapshot/overlaybd/blob-digest": digest,
                    "containerd.io/snapshot/overlaybd/blob-size": size.to_string(),
                });
            }
            d
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg_size},
        "layers": descs,
    });
    let body = serde_json::to_vec(&manifest).unwrap();
    let (digest, size) = put_blob(layout, &body);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size,
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    digest
}

/// The cache directory a layer blob gets under a cache root (`u-` and the first 32 hex digits
/// of the SHA-256 of "oci blob <digest>"): the same for every repository that holds it.
pub fn blob_cache(root: &Path, digest: &str) -> PathBuf {
    root.join(format!("u-{}", &sha256_hex(format!("oci blob {digest}").as_bytes())[..32]))
}
