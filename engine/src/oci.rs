//! Images in OCI registries (opencontainers/distribution-spec): a reference such as
//! `oci://registry.example/team/model:v3` or `oci+http://127.0.0.1:5000/data@sha256:...`
//! resolves through the registry's manifest (or image index, by platform) to layer blobs, and
//! each blob is read lazily with ranged GETs like any other origin (`BlobSource`).
//!
//! Registries authenticate as Docker's clients expect: a 401 names a Basic realm or a Bearer
//! token service; tokens are fetched (anonymously, or with the given user and password) and
//! renewed when a later request is refused. Credentials are never logged.

use crate::error::{Error, ErrorKind, Result};
use crate::source::{HttpSource, HttpSourceOptions, ImageInfo, RangeSink, RangeSource};
use async_trait::async_trait;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RANGE, RETRY_AFTER, WWW_AUTHENTICATE};
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use sha2::{Digest as _, Sha256};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Manifests larger than this are refused (the distribution registry's own limit).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Layers of one image, at most (OverlayBD's bound on a stack).
pub const MAX_LAYERS: usize = 255;
/// Annotation OverlayBD puts on each of its layers' descriptors.
pub const OVERLAYBD_ANNOTATION: &str = "containerd.io/snapshot/overlaybd/blob-digest";
/// A per-chunk manifest (`lazy-image manifest build`) pushed beside a layer, in the same image
/// manifest (so a registry's garbage collection keeps it): its descriptor has this media type
/// and names the layer it vouches for in `CHUNK_MANIFEST_FOR`.
pub const CHUNK_MANIFEST_MEDIA_TYPE: &str = "application/vnd.lazy-image.chunk-manifest.v1+json";
pub const CHUNK_MANIFEST_FOR: &str = "dev.lazy-image.chunk-manifest.for";

const ACCEPTED: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// `oci://REGISTRY/REPOSITORY[:TAG][@DIGEST]` (https) or `oci+http://...` (plain http).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub scheme: &'static str,
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

/// True when `s` names a registry image rather than a URL or path.
pub fn is_reference(s: &str) -> bool {
    s.starts_with("oci://") || s.starts_with("oci+http://")
}

fn invalid(what: &str, why: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::InvalidInput, format!("{what}: {why}"))
}

fn valid_component(c: &str) -> bool {
    // [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let sep = |x: u8| matches!(x, b'.' | b'_' | b'-');
    b.iter().all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || sep(x))
        && !c.contains("..")
        && !c.contains("___")
        && !c.contains("._")
        && !c.contains("_.")
}

/// Checks `sha256:<64 hex>`, the one algorithm this reader verifies.
pub fn check_digest(d: &str, what: &str) -> Result<()> {
    match d.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) => Ok(()),
        _ => Err(invalid(what, format!("digest {d:?} is not sha256:<64 lowercase hex digits>"))),
    }
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference> {
        let what = format!("image reference {s:?}");
        let (scheme, rest) = match (s.strip_prefix("oci://"), s.strip_prefix("oci+http://")) {
            (Some(r), _) => ("https", r),
            (_, Some(r)) => ("http", r),
            _ => return Err(invalid(&what, "must start with oci:// (or oci+http:// for a plain-http registry)")),
        };
        let (registry, path) = rest.split_once('/').ok_or_else(|| invalid(&what, "names no repository (oci://REGISTRY/REPOSITORY:TAG)"))?;
        if registry.is_empty() || !registry.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':' | b'[' | b']')) {
            return Err(invalid(&what, format!("registry {registry:?} is not a host[:port]")));
        }
        let (path, digest) = match path.split_once('@') {
            Some((p, d)) => {
                check_digest(d, &what)?;
                (p, Some(d.to_string()))
            }
            None => (path, None),
        };
        // A tag follows the last ':' after the last '/'.
        let (repository, tag) = match path.rfind(':').filter(|&i| i > path.rfind('/').map_or(0, |j| j)) {
            Some(i) => (&path[..i], Some(path[i + 1..].to_string())),
            None => (path, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
                && !t.starts_with(['.', '-']);
            if !ok {
                return Err(invalid(&what, format!("tag {t:?} is not a valid tag")));
            }
        }
        if repository.is_empty() || repository.len() > 255 || !repository.split('/').all(valid_component) {
            return Err(invalid(&what, format!("repository {repository:?} is not lowercase path components")));
        }
        let tag = if tag.is_none() && digest.is_none() { Some("latest".to_string()) } else { tag };
        Ok(Reference { scheme, registry: registry.to_string(), repository: repository.to_string(), tag, digest })
    }

    fn base(&self) -> String {
        format!("{}://{}/v2/{}", self.scheme, self.registry, self.repository)
    }

    /// What a manifest is fetched by: the digest when pinned, else the tag.
    fn manifest_ref(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    pub fn blob_url(&self, digest: &str) -> String {
        format!("{}/blobs/{digest}", self.base())
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let prefix = if self.scheme == "http" { "oci+http" } else { "oci" };
        write!(f, "{prefix}://{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// What a registry is given to authenticate with.
#[derive(Clone)]
pub enum Credentials {
    Basic {
        user: String,
        password: String,
    },
    /// A registry token used as it is.
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Basic { user, .. } => write!(f, "Basic({user}, <redacted>)"),
            Credentials::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

/// One layer blob of a resolved image, in manifest order (bottom first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    /// Carries OverlayBD's layer annotation.
    pub overlaybd: bool,
    /// The per-chunk manifest pushed for it: (digest, size).
    pub chunk_manifest: Option<(String, u64)>,
}

/// A reference resolved to one platform's manifest.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub reference: Reference,
    pub manifest_digest: String,
    pub layers: Vec<Layer>,
}

impl Resolved {
    /// The layer with this digest.
    pub fn layer(&self, digest: &str) -> Result<&Layer> {
        self.layers
            .iter()
            .find(|l| l.digest == digest)
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("layer {digest} of {}", self.reference)))
    }
}

/// A registry's repository, with the authorization it has earned so far.
pub struct Registry {
    r: Reference,
    client: reqwest::Client,
    creds: Option<Credentials>,
    /// The Authorization header that works now (after a challenge).
    auth: Mutex<Option<HeaderValue>>,
    timeout: Duration,
}

fn sha256_of(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Parses `Bearer realm="...",service="...",scope="..."` into its scheme and parameters.
fn parse_challenge(v: &str) -> (String, Vec<(String, String)>) {
    let v = v.trim();
    let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
    let mut params = Vec::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((k, after)) = rest.split_once('=') else { break };
        let (val, tail) = match after.strip_prefix('"') {
            Some(q) => match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            },
            None => after.split_once(',').map_or((after, ""), |(a, b)| (a, b)),
        };
        params.push((k.trim().to_ascii_lowercase(), val.to_string()));
        rest = tail.trim_start_matches([',', ' ']);
    }
    (scheme.to_ascii_lowercase(), params)
}

impl Registry {
    pub fn new(r: Reference, creds: Option<Credentials>) -> Result<Registry> {
        let timeout = Duration::from_secs(20);
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(timeout)
            .no_gzip()
            .build()
            .map_err(|e| Error::with_source(ErrorKind::InvalidInput, "building the HTTP client", e))?;
        Ok(Registry { r, client, creds, auth: Mutex::new(None), timeout })
    }

    pub fn reference(&self) -> &Reference {
        &self.r
    }

    fn current_auth(&self) -> Option<HeaderValue> {
        self.auth.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A GET with the current authorization; a 401 is answered once by authenticating as its
    /// challenge asks, a 429 by waiting as Retry-After says (up to 10 s, three times).
    async fn get(&self, url: &str, headers: HeaderMap) -> Result<reqwest::Response> {
        let mut challenged = false;
        let mut throttled = 0;
        loop {
            let mut req = self.client.get(url).headers(headers.clone());
            if let Some(a) = self.current_auth() {
                req = req.header(AUTHORIZATION, a);
            }
            let resp =
                req.send().await.map_err(|e| Error::with_source(ErrorKind::Transport, format!("registry {}", self.r.registry), e))?;
            match resp.status().as_u16() {
                401 if !challenged => {
                    challenged = true;
                    let ch = resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                    self.authenticate(&ch).await?;
                }
                401 => {
                    let with = if self.creds.is_some() { "the credentials given" } else { "no credentials (anonymous pull)" };
                    return Err(Error::new(
                        ErrorKind::OriginStatus(401),
                        format!("registry {} refused access to repository {} with {with}", self.r.registry, self.r.repository),
                    ));
                }
                429 if throttled < 3 => {
                    throttled += 1;
                    let wait = resp
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .unwrap_or(1);
                    tokio::time::sleep(Duration::from_secs(wait.min(10))).await;
                }
                _ => return Ok(resp),
            }
        }
    }

    /// Earns an Authorization header as the challenge asks.
    async fn authenticate(&self, challenge: &str) -> Result<()> {
        let who = format!("registry {} (repository {})", self.r.registry, self.r.repository);
        let (scheme, params) = parse_challenge(challenge);
        let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let header = match (scheme.as_str(), &self.creds) {
            ("basic", Some(Credentials::Basic { user, password })) => basic(user, password),
            ("basic", _) => return Err(Error::new(ErrorKind::OriginStatus(401), format!("{who} wants a user and password (none given)"))),
            ("bearer", Some(Credentials::Bearer(t))) if self.current_auth().is_none() => bearer(t)?,
            ("bearer", Some(Credentials::Bearer(_))) => {
                return Err(Error::new(ErrorKind::OriginStatus(401), format!("{who} refused the given token")))
            }
            ("bearer", creds) => {
                let realm =
                    param("realm").ok_or_else(|| Error::new(ErrorKind::Protocol, format!("{who}: a Bearer challenge without a realm")))?;
                let mut url = reqwest::Url::parse(&realm)
                    .map_err(|e| Error::with_source(ErrorKind::Protocol, format!("{who}: token realm {realm:?}"), e))?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(Error::new(ErrorKind::Protocol, format!("{who}: token realm {realm:?} is not http(s)")));
                }
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = param("service") {
                        q.append_pair("service", &s);
                    }
                    q.append_pair("scope", &param("scope").unwrap_or_else(|| format!("repository:{}:pull", self.r.repository)));
                }
                let mut req = self.client.get(url);
                if let Some(Credentials::Basic { user, password }) = creds {
                    req = req.header(AUTHORIZATION, basic(user, password));
                }
                let resp = req.send().await.map_err(|e| Error::with_source(ErrorKind::Transport, format!("{who}: token service"), e))?;
                let status = resp.status().as_u16();
                if status != 200 {
                    return Err(Error::new(ErrorKind::OriginStatus(status), format!("{who}: the token service refused (HTTP {status})")));
                }
                let body = resp.bytes().await.map_err(|e| Error::with_source(ErrorKind::Transport, format!("{who}: token service"), e))?;
                let v: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|e| Error::with_source(ErrorKind::Protocol, format!("{who}: token answer"), e))?;
                let token = v.get("token").or_else(|| v.get("access_token")).and_then(|t| t.as_str()).filter(|t| !t.is_empty());
                bearer(token.ok_or_else(|| Error::new(ErrorKind::Protocol, format!("{who}: the token answer holds no token")))?)?
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!("{who}: an authentication scheme this client does not speak ({scheme:?})"),
                ))
            }
        };
        *self.auth.lock().unwrap_or_else(|p| p.into_inner()) = Some(header);
        Ok(())
    }

    /// Drops the authorization earned so far (a token that expired) and earns it again from a
    /// fresh challenge at `url`.
    pub async fn reauthenticate(&self, url: &str) -> Result<()> {
        *self.auth.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let mut h = HeaderMap::new();
        h.insert(RANGE, HeaderValue::from_static("bytes=0-0"));
        self.get(url, h).await.map(|_| ())
    }

    async fn manifest(&self, reference: &str, want_digest: Option<&str>) -> Result<(String, Bytes, String)> {
        let url = format!("{}/manifests/{reference}", self.r.base());
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_static(ACCEPTED));
        let resp = self.get(&url, h).await?;
        let status = resp.status().as_u16();
        let what = format!("{} manifest {reference}", self.r);
        match status {
            200 => {}
            404 => return Err(Error::new(ErrorKind::NotFound, what)),
            s => return Err(Error::new(ErrorKind::OriginStatus(s), what)),
        }
        let ctype = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        if resp.content_length().is_some_and(|n| n > MAX_MANIFEST_BYTES as u64) {
            return Err(invalid(&what, format!("larger than {MAX_MANIFEST_BYTES} bytes")));
        }
        let mut body = Vec::new();
        let mut resp = resp;
        while let Some(part) = resp.chunk().await.map_err(|e| Error::with_source(ErrorKind::Transport, what.clone(), e))? {
            if body.len() + part.len() > MAX_MANIFEST_BYTES {
                return Err(invalid(&what, format!("larger than {MAX_MANIFEST_BYTES} bytes")));
            }
            body.extend_from_slice(&part);
        }
        let digest = sha256_of(&body);
        if let Some(want) = want_digest {
            if digest != want {
                return Err(Error::new(ErrorKind::Integrity, format!("{what}: the registry served a manifest whose digest is {digest}")));
            }
        }
        Ok((digest, Bytes::from(body), ctype))
    }

    /// Resolves the reference to one manifest (choosing this machine's platform from an index)
    /// and its layers. A pinned digest is checked against what the registry serves.
    pub async fn resolve(&self) -> Result<Resolved> {
        let pinned = self.r.digest.clone();
        let (mut digest, mut body, mut ctype) = self.manifest(self.r.manifest_ref(), pinned.as_deref()).await?;
        let what = self.r.to_string();
        let kind = |body: &[u8], ctype: &str| -> String {
            let inner = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("mediaType").and_then(|m| m.as_str()).map(str::to_string));
            inner.unwrap_or_else(|| ctype.split(';').next().unwrap_or("").trim().to_string())
        };
        let mut k = kind(&body, &ctype);
        if k.ends_with("image.index.v1+json") || k.ends_with("manifest.list.v2+json") {
            let index: ImageIndex =
                serde_json::from_slice(&body).map_err(|e| Error::with_source(ErrorKind::Protocol, format!("{what}: image index"), e))?;
            let chosen = choose_platform(index.manifests(), &what)?;
            let d = chosen.digest().to_string();
            check_digest(&d, &what)?;
            (digest, body, ctype) = self.manifest(&d, Some(&d)).await?;
            k = kind(&body, &ctype);
        }
        if !(k.ends_with("image.manifest.v1+json") || k.ends_with("manifest.v2+json")) {
            return Err(invalid(&what, format!("the registry served a {k:?}, not an image manifest")));
        }
        let m: ImageManifest =
            serde_json::from_slice(&body).map_err(|e| Error::with_source(ErrorKind::Protocol, format!("{what}: manifest"), e))?;
        let is_chunk_manifest = |l: &&Descriptor| l.media_type().to_string() == CHUNK_MANIFEST_MEDIA_TYPE;
        let mut vouched: std::collections::HashMap<String, (String, u64)> = std::collections::HashMap::new();
        for l in m.layers().iter().filter(is_chunk_manifest) {
            let d = l.digest().to_string();
            check_digest(&d, &what)?;
            let Some(target) = l.annotations().as_ref().and_then(|a| a.get(CHUNK_MANIFEST_FOR)).cloned() else {
                return Err(invalid(&what, format!("chunk manifest {d} names no layer (annotation {CHUNK_MANIFEST_FOR})")));
            };
            vouched.insert(target, (d, l.size()));
        }
        let image_layers: Vec<&Descriptor> = m.layers().iter().filter(|l| !is_chunk_manifest(l)).collect();
        if image_layers.is_empty() || image_layers.len() > MAX_LAYERS {
            return Err(invalid(&what, format!("an image of {} layers (1 to {MAX_LAYERS} are served)", image_layers.len())));
        }
        let mut layers = Vec::new();
        for l in image_layers {
            let d = l.digest().to_string();
            check_digest(&d, &what)?;
            let overlaybd = l.annotations().as_ref().is_some_and(|a| a.contains_key(OVERLAYBD_ANNOTATION));
            let chunk_manifest = vouched.remove(&d);
            layers.push(Layer { digest: d, size: l.size(), media_type: l.media_type().to_string(), overlaybd, chunk_manifest });
        }
        if let Some((target, (d, _))) = vouched.into_iter().next() {
            return Err(invalid(&what, format!("chunk manifest {d} vouches for {target}, which is not one of its layers")));
        }
        Ok(Resolved { reference: self.r.clone(), manifest_digest: digest, layers })
    }

    /// The per-chunk manifest pushed for `layer`, fetched and checked against its digest and
    /// the layer's size: the layer's chunks are then verified as they arrive.
    pub async fn chunk_manifest(self: &Arc<Self>, layer: &Layer) -> Result<Option<crate::Manifest>> {
        let Some((digest, size)) = &layer.chunk_manifest else { return Ok(None) };
        let what = format!("{} chunk manifest {digest}", self.r);
        let blob = Layer {
            digest: digest.clone(),
            size: *size,
            media_type: CHUNK_MANIFEST_MEDIA_TYPE.into(),
            overlaybd: false,
            chunk_manifest: None,
        };
        let m = crate::load_manifest_from(Arc::new(self.blob_source(&blob)), &what, Some(digest)).await?;
        if m.size != layer.size {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!("{what} is for {} bytes, and layer {} has {}", m.size, layer.digest, layer.size),
            ));
        }
        Ok(Some(m))
    }

    /// A layer as a lazily fetched image with the cache settings `cfg`: checked whole against
    /// its digest once complete, and chunk by chunk when a chunk manifest vouches for it.
    pub async fn open_layer(self: &Arc<Self>, layer: &Layer, mut cfg: crate::ImageConfig) -> Result<crate::LazyImage> {
        cfg.blob_digest = Some(layer.digest.clone());
        cfg.manifest = self.chunk_manifest(layer).await?;
        crate::LazyImage::open(Arc::new(self.blob_source(layer)), cfg).await
    }

    /// A lazily read layer blob of this repository.
    pub fn blob_source(self: &Arc<Self>, layer: &Layer) -> BlobSource {
        BlobSource { reg: self.clone(), digest: layer.digest.clone(), size: layer.size, inner: tokio::sync::Mutex::new(None) }
    }
}

fn basic(user: &str, password: &str) -> HeaderValue {
    use base64::Engine;
    let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut h = HeaderValue::from_str(&format!("Basic {v}")).unwrap_or_else(|_| HeaderValue::from_static("Basic"));
    h.set_sensitive(true);
    h
}

fn bearer(t: &str) -> Result<HeaderValue> {
    let mut h = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| invalid("registry token", "not a valid header value"))?;
    h.set_sensitive(true);
    Ok(h)
}

/// This machine's platform in OCI's words.
pub fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        a => a,
    };
    ("linux", arch)
}

fn choose_platform<'a>(manifests: &'a [Descriptor], what: &str) -> Result<&'a Descriptor> {
    let (os, arch) = host_platform();
    if let Some(d) =
        manifests.iter().find(|d| d.platform().as_ref().is_some_and(|p| p.os().to_string() == os && p.architecture().to_string() == arch))
    {
        return Ok(d);
    }
    // An artifact index names no platform: its one manifest is the image.
    match manifests {
        [only] if only.platform().is_none() => Ok(only),
        _ => {
            let have: Vec<String> = manifests
                .iter()
                .map(|d| d.platform().as_ref().map_or("(no platform)".to_string(), |p| format!("{}/{}", p.os(), p.architecture())))
                .collect();
            Err(Error::new(ErrorKind::NotFound, format!("{what}: no manifest for {os}/{arch} in its index (it has {})", have.join(", "))))
        }
    }
}

/// One layer blob, read with ranged GETs (redirects to storage followed, each request from the
/// registry's URL, so an expired storage URL is never reused). A blob is content-addressed: its
/// digest is its validator and its cache is shared by every repository and image that names it.
pub struct BlobSource {
    reg: Arc<Registry>,
    digest: String,
    size: u64,
    /// The HTTP source with the authorization of its time, and what its probe saw.
    inner: tokio::sync::Mutex<Option<(Arc<HttpSource>, ImageInfo)>>,
}

impl BlobSource {
    pub fn digest(&self) -> &str {
        &self.digest
    }

    async fn connect(&self) -> Result<(Arc<HttpSource>, ImageInfo)> {
        let url = self.reg.r.blob_url(&self.digest);
        let mut attempt = 0;
        loop {
            let mut headers = HeaderMap::new();
            if let Some(a) = self.reg.current_auth() {
                headers.insert(AUTHORIZATION, a);
            }
            // Our own HTTP/1.1 connections do not follow redirects: reqwest does.
            let src = Arc::new(HttpSource::new(
                &url,
                HttpSourceOptions { headers, own_http1: false, request_timeout: self.reg.timeout, ..Default::default() },
            )?);
            match src.probe().await {
                Ok(info) if info.size == self.size => return Ok((src, info)),
                Ok(info) => {
                    return Err(Error::new(
                        ErrorKind::Integrity,
                        format!(
                            "{}: the registry serves {} bytes for a blob its manifest says is {}",
                            self.describe(),
                            info.size,
                            self.size
                        ),
                    ))
                }
                Err(e) if matches!(e.kind(), ErrorKind::OriginStatus(401) | ErrorKind::OriginStatus(403)) && attempt == 0 => {
                    attempt += 1;
                    self.reg.reauthenticate(&url).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn current(&self) -> Result<(Arc<HttpSource>, ImageInfo)> {
        let mut g = self.inner.lock().await;
        if g.is_none() {
            *g = Some(self.connect().await?);
        }
        g.clone().ok_or_else(|| Error::new(ErrorKind::Transport, self.describe()))
    }

    async fn reconnect(&self, seen: &Arc<HttpSource>) -> Result<(Arc<HttpSource>, ImageInfo)> {
        let mut g = self.inner.lock().await;
        // Another reader may have reconnected already.
        if let Some((s, i)) = g.as_ref() {
            if !Arc::ptr_eq(s, seen) {
                return Ok((s.clone(), i.clone()));
            }
        }
        let url = self.reg.r.blob_url(&self.digest);
        self.reg.reauthenticate(&url).await?;
        let fresh = self.connect().await?;
        *g = Some(fresh.clone());
        Ok(fresh)
    }
}

#[async_trait]
impl RangeSource for BlobSource {
    fn describe(&self) -> String {
        // The cache key comes from this: the same blob from any repository shares one cache.
        format!("oci blob {}", self.digest)
    }

    async fn probe(&self) -> Result<ImageInfo> {
        self.current().await?;
        Ok(ImageInfo { size: self.size, etag: Some(self.digest.clone()), last_modified: None })
    }

    async fn fetch(&self, offset: u64, len: u64, expect: &ImageInfo) -> Result<Bytes> {
        let buf = crate::source::RangeBuf::new(len as usize);
        self.fetch_to(offset, len, expect, &buf).await?;
        Ok(buf.take())
    }

    async fn fetch_to(&self, offset: u64, len: u64, _expect: &ImageInfo, sink: &dyn RangeSink) -> Result<()> {
        let (src, info) = self.current().await?;
        match src.fetch_to(offset, len, &info, sink).await {
            // An expired token, or storage that now answers with another validator (a new
            // presigned location): renew and try once more. The bytes are the digest's either
            // way, and the whole blob is checked against it once complete.
            Err(e) if matches!(e.kind(), ErrorKind::OriginStatus(401) | ErrorKind::OriginStatus(403) | ErrorKind::OriginChanged) => {
                let (src, info) = self.reconnect(&src).await?;
                src.fetch_to(offset, len, &info, sink).await
            }
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_or_say_why_not() {
        let r = Reference::parse("oci://registry.example:5000/team/model:v3").unwrap();
        assert_eq!(
            (r.scheme, r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("https", "registry.example:5000", "team/model", Some("v3"))
        );
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = Reference::parse(&format!("oci+http://127.0.0.1:5000/data@{d}")).unwrap();
        assert_eq!((r.scheme, r.tag.as_deref(), r.digest.as_deref()), ("http", None, Some(d.as_str())));
        assert_eq!(r.to_string(), format!("oci+http://127.0.0.1:5000/data@{d}"));
        assert_eq!(Reference::parse("oci://r.example/x").unwrap().tag.as_deref(), Some("latest"));
        for bad in [
            "r.example/x:1",
            "oci://r.example",
            "oci://r.example/UPPER:1",
            "oci://r.example/x:-t",
            "oci://r.example/x@sha256:12",
            "oci://r.example/x@md5:00",
        ] {
            assert_eq!(Reference::parse(bad).unwrap_err().kind(), ErrorKind::InvalidInput, "{bad}");
        }
    }

    #[test]
    fn challenges_parse() {
        let (s, p) = parse_challenge(r#"Bearer realm="http://127.0.0.1:1/token",service="reg",scope="repository:a/b:pull,push""#);
        assert_eq!(s, "bearer");
        assert_eq!(p[0], ("realm".into(), "http://127.0.0.1:1/token".into()));
        assert_eq!(p[2], ("scope".into(), "repository:a/b:pull,push".into()));
        assert_eq!(parse_challenge(r#"Basic realm="Registry Realm""#).0, "basic");
    }

    #[test]
    fn credentials_never_print() {
        let c = Credentials::Basic { user: "u".into(), password: "hunter2".into() };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{:?}", Credentials::Bearer("tok".into())).contains("tok"));
    }
}
