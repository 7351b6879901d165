//! The volume attributes both CSI halves speak, checked strictly, and the ids that become file
//! names: the controller returns these attributes as a volume context, the node plugin stages
//! from them, so one parser serves both.

use lazy_image_engine::manifest;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A request or attribute that cannot be served; the message says which and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Invalid {}

fn invalid(msg: impl Into<String>) -> Invalid {
    Invalid(msg.into())
}

/// The filesystem an image holds, when the attributes name one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Ext4,
    Erofs,
    Squashfs,
}

impl ImageFormat {
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Ext4 => "ext4",
            ImageFormat::Erofs => "erofs",
            ImageFormat::Squashfs => "squashfs",
        }
    }

    pub fn parse(s: &str) -> Result<Self, Invalid> {
        match s {
            "ext4" | "ext3" | "ext2" => Ok(ImageFormat::Ext4),
            "erofs" => Ok(ImageFormat::Erofs),
            "squashfs" => Ok(ImageFormat::Squashfs),
            other => Err(invalid(format!("unknown filesystem format {other:?}: expected auto, ext4, erofs or squashfs"))),
        }
    }
}

/// Attribute keys Kubernetes and its sidecars add on their own; never an error.
const PASSTHROUGH_PREFIXES: [&str; 2] = ["csi.storage.k8s.io/", "storage.kubernetes.io/"];
pub const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";
/// How a `device` attribute is written in a spec's `url` (and in cache reports).
pub const DEVICE_SCHEME: &str = "device://";

/// The image a volume shows, from its volume attributes. Two requests describe the same volume
/// when their specs are equal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    /// `http(s)://...`, `file:///path`, a registry image `oci://...` (`oci+http://...`) or, for
    /// attribute `device`, `device:///dev/...`.
    pub url: String,
    pub format: Option<ImageFormat>,
    pub digest: Option<String>,
    pub manifest_url: Option<String>,
    pub chunk_size: Option<u64>,
    /// Fetch the whole image in the background while the volume is staged.
    #[serde(default)]
    pub prefetch: bool,
    /// A writable volume: writes land in a per-volume copy-on-write layer on the node, dropped
    /// with the volume. Only with an access mode that writes on one node.
    #[serde(default)]
    pub writable: bool,
    /// Most bytes of changed blocks the writable layer may hold (default: the image's size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writable_size: Option<u64>,
}

impl VolumeSpec {
    pub fn from_attributes(attrs: &HashMap<String, String>) -> Result<Self, Invalid> {
        for k in attrs.keys() {
            let known = matches!(
                k.as_str(),
                "url" | "device" | "format" | "digest" | "manifestUrl" | "chunkSize" | "prefetch" | "writable" | "writableSize"
            ) || PASSTHROUGH_PREFIXES.iter().any(|p| k.starts_with(p));
            if !known {
                return Err(invalid(format!(
                    "unknown volume attribute {k:?} (expected url, device, format, digest, manifestUrl, chunkSize, prefetch, writable, writableSize)"
                )));
            }
        }
        let given = |k: &str| attrs.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());
        let url = match (given("url"), given("device")) {
            (Some(_), Some(_)) => return Err(invalid("volume attributes url and device name two sources: give one")),
            (None, None) => return Err(invalid("volume attribute \"url\" (or \"device\") is required")),
            (Some(u), None) if lazy_image_engine::oci::is_reference(u) => {
                lazy_image_engine::oci::Reference::parse(u).map_err(|e| invalid(format!("volume attribute url: {}", e.report())))?;
                if attrs.contains_key("digest") || attrs.contains_key("manifestUrl") {
                    return Err(invalid("a registry image is pinned with @sha256:... in its url: volume attributes digest and manifestUrl are for http(s) and file URLs"));
                }
                u.to_string()
            }
            (Some(u), None) => {
                let remote = u.starts_with("http://") || u.starts_with("https://");
                if !remote && !u.strip_prefix("file://").is_some_and(|p| p.starts_with('/')) {
                    return Err(invalid(format!(
                        "volume attribute url {u:?} must be an http://, https:// or file:///absolute/path URL, or a registry image oci://REGISTRY/REPOSITORY:TAG"
                    )));
                }
                u.to_string()
            }
            (None, Some(d)) => {
                if !d.starts_with("/dev/") {
                    return Err(invalid(format!("volume attribute device {d:?} must be a path under /dev/")));
                }
                format!("{DEVICE_SCHEME}{d}")
            }
        };
        let format = match attrs.get("format").map(String::as_str) {
            None | Some("") | Some("auto") => None,
            Some(f) => Some(ImageFormat::parse(f).map_err(|e| invalid(format!("volume attribute format: {e}")))?),
        };
        let digest = match attrs.get("digest") {
            None => None,
            Some(d) => Some(manifest::parse_digest(d).map_err(|e| invalid(format!("volume attribute digest: {}", e.report())))?),
        };
        let manifest_url = attrs.get("manifestUrl").cloned();
        if let Some(m) = &manifest_url {
            if !(m.starts_with("http://") || m.starts_with("https://") || m.starts_with("file:///")) {
                return Err(invalid(format!("volume attribute manifestUrl {m:?} must be an http://, https:// or file:/// URL")));
            }
        }
        let chunk_size = match attrs.get("chunkSize") {
            None => None,
            Some(c) => {
                let n = parse_size(c).ok_or_else(|| invalid(format!("volume attribute chunkSize {c:?} is not a size (e.g. 16K, 1M)")))?;
                manifest::check_chunk_size(n).map_err(|e| invalid(format!("volume attribute chunkSize: {}", e.report())))?;
                Some(n)
            }
        };
        let flag = |key: &str| match attrs.get(key).map(String::as_str) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(v) => Err(invalid(format!("volume attribute {key} {v:?} must be \"true\" or \"false\""))),
        };
        let (prefetch, writable) = (flag("prefetch")?, flag("writable")?);
        let writable_size = match attrs.get("writableSize") {
            None => None,
            Some(_) if !writable => {
                return Err(invalid("volume attribute writableSize is for writable volumes: set writable: \"true\" too"))
            }
            Some(v) => match parse_size(v) {
                Some(n) if n >= 1 << 20 => Some(n),
                _ => return Err(invalid(format!("volume attribute writableSize {v:?} is not a size of at least 1Mi (e.g. 512Mi, 10Gi)"))),
            },
        };
        if url.starts_with(DEVICE_SCHEME) && digest.is_some() && manifest_url.is_none() {
            return Err(invalid("a device's digest needs volume attribute manifestUrl (there is no <url>.manifest beside a device)"));
        }
        Ok(VolumeSpec { url, format, digest, manifest_url, chunk_size, prefetch, writable, writable_size })
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => {
            // K, Ki, KiB and KB alike: binary units.
            let unit = s[i..].to_ascii_uppercase();
            let unit = unit.strip_suffix('B').unwrap_or(&unit);
            let m: u64 = match unit.strip_suffix('I').unwrap_or(unit) {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
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
    pub fn from_secrets(secrets: &HashMap<String, String>) -> Result<Option<Self>, Invalid> {
        use base64::Engine;
        match (secrets.get("bearerToken"), secrets.get("username"), secrets.get("password")) {
            (None, None, None) => Ok(None),
            (Some(t), None, None) if !t.is_empty() => Ok(Some(Credentials(format!("Bearer {t}")))),
            (None, Some(u), Some(p)) => {
                Ok(Some(Credentials(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))))))
            }
            _ => Err(invalid("node-stage secrets must hold either bearerToken, or username and password")),
        }
    }
}

impl Credentials {
    /// Options of an HTTP source that sends `creds` (if any) as its Authorization header.
    pub fn source_options(creds: Option<&Credentials>) -> Result<lazy_image_engine::source::HttpSourceOptions, Invalid> {
        let mut opts = lazy_image_engine::source::HttpSourceOptions::default();
        if let Some(c) = creds {
            let mut v = http::HeaderValue::from_str(&c.0).map_err(|_| invalid("credentials are not a valid header value"))?;
            v.set_sensitive(true);
            opts.headers.insert(http::header::AUTHORIZATION, v);
        }
        Ok(opts)
    }

    /// The same secrets as a registry's credentials: Basic for its realm or its token service,
    /// a bearer token used as the registry's token.
    pub fn to_registry(&self) -> Result<lazy_image_engine::oci::Credentials, Invalid> {
        use base64::Engine;
        use lazy_image_engine::oci::Credentials as Oci;
        if let Some(t) = self.0.strip_prefix("Bearer ") {
            return Ok(Oci::Bearer(t.to_string()));
        }
        let pair = self
            .0
            .strip_prefix("Basic ")
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok());
        match pair.as_deref().and_then(|p| p.split_once(':')) {
            Some((user, password)) => Ok(Oci::Basic { user: user.to_string(), password: password.to_string() }),
            None => Err(invalid("node-stage secrets do not make registry credentials")),
        }
    }
}

/// Volume ids become file names under the state directory: a conservative alphabet, no way out.
pub fn check_volume_id(id: &str) -> Result<(), Invalid> {
    if id.is_empty() {
        return Err(invalid("volume_id is required"));
    }
    let ok = id.len() <= 256
        && id != "."
        && id != ".."
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if !ok {
        return Err(invalid(format!(
            "volume_id {id:?} must be 1-256 characters of letters, digits, '-', '_', '.', ':' (and not \".\" or \"..\")"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn attributes_are_checked_strictly() {
        let s = VolumeSpec::from_attributes(&attrs(&[
            ("url", "http://h/x.img"),
            ("format", "erofs"),
            ("chunkSize", "64K"),
            ("csi.storage.k8s.io/pod.name", "p"),
        ]))
        .unwrap();
        assert_eq!(s.format, Some(ImageFormat::Erofs));
        assert_eq!(s.chunk_size, Some(65536));
        assert!(VolumeSpec::from_attributes(&attrs(&[])).is_err());
        assert!(VolumeSpec::from_attributes(&attrs(&[("url", "ftp://h/x")])).is_err());
        assert!(VolumeSpec::from_attributes(&attrs(&[("url", "file://relative/x.img")])).is_err());
        assert_eq!(VolumeSpec::from_attributes(&attrs(&[("url", "file:///data/x.img")])).unwrap().url, "file:///data/x.img");
        assert_eq!(VolumeSpec::from_attributes(&attrs(&[("device", "/dev/sdb")])).unwrap().url, "device:///dev/sdb");
        assert!(VolumeSpec::from_attributes(&attrs(&[("device", "/tmp/x")])).is_err());
        assert!(VolumeSpec::from_attributes(&attrs(&[("device", "/dev/sdb"), ("url", "http://h/x")])).is_err());
        let pinned = "sha256:".to_string() + &"ab".repeat(32);
        assert!(VolumeSpec::from_attributes(&attrs(&[("device", "/dev/sdb"), ("digest", &pinned)])).is_err(), "a device needs manifestUrl");
        assert!(VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x"), ("fromat", "ext4")])).is_err());
        assert!(VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x"), ("format", "xfs")])).is_err());
        assert!(VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x"), ("digest", "md5:1")])).is_err());
        assert!(VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x"), ("chunkSize", "3000")])).is_err());
        assert!(VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x"), ("prefetch", "true")])).unwrap().prefetch);
        assert!(!VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x")])).unwrap().prefetch);
        assert!(VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x"), ("prefetch", "yes")])).is_err());
        let w = VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x"), ("writable", "true"), ("writableSize", "2Gi")])).unwrap();
        assert_eq!((w.writable, w.writable_size), (true, Some(2 << 30)));
        let w = VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x"), ("writable", "true")])).unwrap();
        assert_eq!((w.writable, w.writable_size), (true, None));
        assert!(!VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x")])).unwrap().writable);
        for bad in [
            &[("url", "http://h/x"), ("writable", "yes")][..],
            &[("url", "http://h/x"), ("writableSize", "1Gi")],
            &[("url", "http://h/x"), ("writable", "true"), ("writableSize", "10K")],
            &[("url", "http://h/x"), ("writable", "true"), ("writableSize", "lots")],
        ] {
            let err = VolumeSpec::from_attributes(&attrs(bad)).expect_err("refused");
            assert!(err.to_string().contains("writable"), "{err}");
        }
        let d = format!("sha256:{}", "a".repeat(64));
        let s = VolumeSpec::from_attributes(&attrs(&[("url", "http://h/x"), ("digest", &d.to_uppercase().replace("SHA256", "sha256"))]))
            .unwrap();
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
    fn volume_ids() {
        assert!(check_volume_id("pvc-1234_a.b:c").is_ok());
        for bad in ["", ".", "..", "a/b", "../x", "a b", "a\0b"] {
            assert!(check_volume_id(bad).is_err(), "{bad:?}");
        }
    }
}
