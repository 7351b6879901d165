//! What a volume is, parsed once from the CSI request and checked strictly: the volume
//! attributes (`url`, `format`, `digest`, `manifestUrl`, `chunkSize`, `prefetch`), the credentials from the
//! node-stage secrets, the access mode, and the ids and paths kubelet sends.

use crate::error::{NodeError, NodeResult};
use lazy_image_attach::FsType;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

/// Attribute keys Kubernetes and its sidecars add on their own; never an error.
const PASSTHROUGH_PREFIXES: [&str; 2] = ["csi.storage.k8s.io/", "storage.kubernetes.io/"];
pub const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";

/// The image a volume shows, from its volume attributes. Two requests describe the same volume
/// when their specs are equal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub url: String,
    pub format: Option<FsType>,
    pub digest: Option<String>,
    pub manifest_url: Option<String>,
    pub chunk_size: Option<u64>,
    /// Fetch the whole image in the background while the volume is staged.
    #[serde(default)]
    pub prefetch: bool,
}

impl VolumeSpec {
    pub fn from_attributes(attrs: &HashMap<String, String>) -> NodeResult<Self> {
        for k in attrs.keys() {
            let known = matches!(k.as_str(), "url" | "format" | "digest" | "manifestUrl" | "chunkSize" | "prefetch")
                || PASSTHROUGH_PREFIXES.iter().any(|p| k.starts_with(p));
            if !known {
                return Err(NodeError::invalid(format!(
                    "unknown volume attribute {k:?} (expected url, format, digest, manifestUrl, chunkSize, prefetch)"
                )));
            }
        }
        let url = attrs.get("url").map(|s| s.trim()).filter(|s| !s.is_empty()).ok_or_else(|| NodeError::invalid("volume attribute \"url\" is required"))?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(NodeError::invalid(format!("volume attribute url {url:?} must be an http:// or https:// URL")));
        }
        let format = match attrs.get("format").map(String::as_str) {
            None | Some("") | Some("auto") => None,
            Some(f) => Some(f.parse::<FsType>().map_err(|e| NodeError::invalid(format!("volume attribute format: {e}")))?),
        };
        let digest = match attrs.get("digest") {
            None => None,
            Some(d) => Some(
                lazy_image_engine::manifest::parse_digest(d).map_err(|e| NodeError::invalid(format!("volume attribute digest: {}", e.report())))?,
            ),
        };
        let manifest_url = attrs.get("manifestUrl").cloned();
        if let Some(m) = &manifest_url {
            if !(m.starts_with("http://") || m.starts_with("https://")) {
                return Err(NodeError::invalid(format!("volume attribute manifestUrl {m:?} must be an http:// or https:// URL")));
            }
        }
        let chunk_size = match attrs.get("chunkSize") {
            None => None,
            Some(c) => {
                let n = parse_size(c).ok_or_else(|| NodeError::invalid(format!("volume attribute chunkSize {c:?} is not a size (e.g. 16K, 1M)")))?;
                lazy_image_engine::manifest::check_chunk_size(n).map_err(|e| NodeError::invalid(format!("volume attribute chunkSize: {}", e.report())))?;
                Some(n)
            }
        };
        let prefetch = match attrs.get("prefetch").map(String::as_str) {
            None | Some("false") => false,
            Some("true") => true,
            Some(v) => return Err(NodeError::invalid(format!("volume attribute prefetch {v:?} must be \"true\" or \"false\""))),
        };
        Ok(VolumeSpec { url: url.to_string(), format, digest, manifest_url, chunk_size, prefetch })
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => {
            let m = match s[i..].to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                _ => return None,
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

/// The `Authorization` header value from the node-stage secrets: `bearerToken`, or `username`
/// with `password`. Kept out of logs and `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials(pub String);

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

impl Credentials {
    pub fn from_secrets(secrets: &HashMap<String, String>) -> NodeResult<Option<Self>> {
        use base64::Engine;
        match (secrets.get("bearerToken"), secrets.get("username"), secrets.get("password")) {
            (None, None, None) => Ok(None),
            (Some(t), None, None) if !t.is_empty() => Ok(Some(Credentials(format!("Bearer {t}")))),
            (None, Some(u), Some(p)) => {
                Ok(Some(Credentials(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))))))
            }
            _ => Err(NodeError::invalid("node-stage secrets must hold either bearerToken, or username and password")),
        }
    }
}

/// Volume ids become file names under the state directory: a conservative alphabet, no way out.
pub fn check_volume_id(id: &str) -> NodeResult<()> {
    if id.is_empty() {
        return Err(NodeError::invalid("volume_id is required"));
    }
    let ok = id.len() <= 256
        && id != "."
        && id != ".."
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if !ok {
        return Err(NodeError::invalid(format!(
            "volume_id {id:?} must be 1-256 characters of letters, digits, '-', '_', '.', ':' (and not \".\" or \"..\")"
        )));
    }
    Ok(())
}

/// A staging or target path: absolute, without `.`/`..`, under the kubelet root.
pub fn check_path(field: &str, p: &str, kubelet_root: &Path) -> NodeResult<PathBuf> {
    if p.is_empty() {
        return Err(NodeError::invalid(format!("{field} is required")));
    }
    let path = PathBuf::from(p);
    if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
        return Err(NodeError::invalid(format!("{field} {p:?} must be an absolute path without . or ..")));
    }
    if !path.starts_with(kubelet_root) || path == kubelet_root {
        return Err(NodeError::invalid(format!("{field} {p:?} is not under the kubelet root {}", kubelet_root.display())));
    }
    Ok(path)
}

/// Access kubelet may ask for. The device and every mount are read-only whatever the mode:
/// kubelet sends SINGLE_NODE_WRITER for every inline volume and for a PV whose first access mode
/// is ReadWriteOnce, with `readonly` set when the pod or the PV says `readOnly: true`. Only
/// mount (not block) access.
pub mod access {
    use super::*;
    use lazy_image_proto::csi::v1::volume_capability::access_mode::Mode;
    use lazy_image_proto::csi::v1::volume_capability::AccessType;
    use lazy_image_proto::csi::v1::VolumeCapability;

    /// Checks the capability; returns the mode when it is a writer's (for `check_publish`).
    pub fn check(cap: Option<&VolumeCapability>) -> NodeResult<Option<Mode>> {
        let cap = cap.ok_or_else(|| NodeError::invalid("volume_capability is required"))?;
        match &cap.access_type {
            Some(AccessType::Mount(m)) => {
                if !m.fs_type.is_empty() && m.fs_type.parse::<FsType>().is_err() {
                    return Err(NodeError::invalid(format!(
                        "fs_type {:?} is not supported (ext4, erofs, squashfs, or empty for the image's own)",
                        m.fs_type
                    )));
                }
            }
            Some(AccessType::Block(_)) => {
                return Err(NodeError::invalid("block access is not supported: lazy-image volumes are mounted filesystems"))
            }
            None => return Err(NodeError::invalid("volume_capability has neither mount nor block access")),
        }
        let mode = cap.access_mode.as_ref().map(|m| m.mode).unwrap_or_default();
        match Mode::try_from(mode) {
            Ok(Mode::SingleNodeReaderOnly) | Ok(Mode::MultiNodeReaderOnly) => Ok(None),
            Ok(Mode::Unknown) => Err(NodeError::invalid("volume_capability has no access mode")),
            Ok(m) => Ok(Some(m)),
            Err(_) => Err(NodeError::invalid(format!("access mode {mode} is unknown"))),
        }
    }

    /// NodePublishVolume: a writer's mode is served read-only when the request says `readonly`;
    /// without it the pod expects to write, which an image volume cannot give.
    pub fn check_publish(cap: Option<&VolumeCapability>, readonly: bool) -> NodeResult<()> {
        match check(cap)? {
            Some(m) if !readonly => Err(NodeError::invalid(format!(
                "access mode {} without readonly asks for a writable volume, and lazy-image volumes are read-only images: \
                 set readOnly: true on the pod's csi volume (or on the PV's csi source), or give the PV the access mode ReadOnlyMany",
                m.as_str_name()
            ))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn attributes_are_checked_strictly() {
        let s = VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x.img"), ("format", "erofs"), ("chunkSize", "64K"), ("csi.storage.k8s.io/pod.name", "p")])).unwrap();
        assert_eq!(s.format, Some(FsType::Erofs));
        assert_eq!(s.chunk_size, Some(65536));
        assert!(VolumeSpec::from_attributes(&attrs(&[])).is_err());
        assert!(VolumeSpec::from_attributes(&attrs(&[("url", "ftp://h/x")])).is_err());
        assert!(VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x"), ("fromat", "ext4")])).is_err());
        assert!(VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x"), ("format", "xfs")])).is_err());
        assert!(VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x"), ("digest", "md5:1")])).is_err());
        assert!(VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x"), ("chunkSize", "3000")])).is_err());
        assert!(VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x"), ("prefetch", "true")])).unwrap().prefetch);
        assert!(!VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x")])).unwrap().prefetch);
        assert!(VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x"), ("prefetch", "yes")])).is_err());
        let d = format!("sha256:{}", "a".repeat(64));
        let s = VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x"), ("digest", &d.to_uppercase().replace("SHA256", "sha256"))])).unwrap();
        assert_eq!(s.digest.as_deref(), Some(d.as_str()), "digests are normalised");
    }

    #[test]
    fn credentials_are_redacted() {
        let c = Credentials::from_secrets(&attrs(&[("bearerToken", "s3cret")])).unwrap().unwrap();
        assert_eq!(c.0, "Bearer s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));
        let b = Credentials::from_secrets(&attrs(&[("username", "u"), ("password", "p")])).unwrap().unwrap();
        assert_eq!(b.0, "Basic dTpw");
        assert!(Credentials::from_secrets(&attrs(&[("username", "u")])).is_err());
        assert_eq!(Credentials::from_secrets(&attrs(&[])).unwrap(), None);
    }

    #[test]
    fn ids_and_paths() {
        assert!(check_volume_id("pvc-1234_a.b:c").is_ok());
        for bad in ["", ".", "..", "a/b", "../x", "a b", "a\0b"] {
            assert!(check_volume_id(bad).is_err(), "{bad:?}");
        }
        let root = Path::new("/var/lib/kubelet");
        assert!(check_path("target_path", "/var/lib/kubelet/pods/x/vol", root).is_ok());
        for bad in ["", "relative", "/etc/passwd", "/var/lib/kubelet", "/var/lib/kubelet/../x", "/var/lib/kubeletx/y"] {
            assert!(check_path("target_path", bad, root).is_err(), "{bad:?}");
        }
    }
}
