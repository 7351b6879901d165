//! Provisioning: from a CreateVolume's name, size and parameters (StorageClass parameters plus
//! the claim's name and namespace the external-provisioner adds with `--extra-create-metadata`)
//! to a volume: the image's attributes as the volume context the node plugin stages from, its
//! size as the capacity. Knows nothing about gRPC; the cluster and the origin come as traits.
//!
//! The image is named once: by the StorageClass (`url` and the other attributes, or
//! `image: <LazyImage>`), or by the claim (annotation `lazy-image.csi.dev/url` or
//! `lazy-image.csi.dev/image`, the class then giving defaults such as `format` or `prefetch`).
//!
//! Volumes are recorded in memory by name, for idempotency and ListVolumes: a repeated call
//! with the same arguments gets the same volume, with other arguments ALREADY_EXISTS. A
//! restarted controller starts with none (the external-provisioner only calls again for claims
//! that have no volume yet); nothing is allocated anywhere, so there is nothing to leak.

use crate::cluster::Cluster;
use crate::error::{ControllerError, Kind, Result};
use crate::origin::Origin;
use lazy_image_csi_common::attributes::{check_volume_id, Credentials, VolumeSpec};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// Keys the external-provisioner adds: the claim and the PV.
pub const PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
pub const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
/// Annotations on a claim that name its image.
pub const ANNOTATION_URL: &str = "lazy-image.csi.dev/url";
pub const ANNOTATION_IMAGE: &str = "lazy-image.csi.dev/image";
/// The StorageClass parameter that names a LazyImage.
pub const PARAM_IMAGE: &str = "image";

pub struct CreateArgs {
    pub name: String,
    /// CapacityRange: 0 means not given.
    pub required_bytes: u64,
    pub limit_bytes: u64,
    pub parameters: HashMap<String, String>,
    /// The provisioner's secrets (StorageClass `csi.storage.k8s.io/provisioner-secret-*`).
    pub secrets: HashMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub volume_id: String,
    pub capacity_bytes: u64,
    /// The volume context: attributes the node plugin accepts.
    pub context: HashMap<String, String>,
}

struct Recorded {
    /// The arguments it was made from (parameters, sizes), to tell a retry from a conflict.
    args: String,
    volume: Volume,
}

pub struct Provisioner {
    cluster: Arc<dyn Cluster>,
    origin: Arc<dyn Origin>,
    volumes: Mutex<BTreeMap<String, Recorded>>,
    busy: Mutex<HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Held while one call works on a volume name; a second call on it meanwhile is refused (Busy).
struct Guard<'a> {
    p: &'a Provisioner,
    name: String,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        lock(&self.p.busy).remove(&self.name);
    }
}

impl Provisioner {
    pub fn new(cluster: Arc<dyn Cluster>, origin: Arc<dyn Origin>) -> Self {
        Provisioner { cluster, origin, volumes: Mutex::new(BTreeMap::new()), busy: Mutex::new(HashSet::new()) }
    }

    fn begin(&self, name: &str) -> Result<Guard<'_>> {
        if !lock(&self.busy).insert(name.to_string()) {
            return Err(ControllerError::new(Kind::Busy, format!("an operation on volume {name} is already in progress; retry later")));
        }
        Ok(Guard { p: self, name: name.to_string() })
    }

    pub async fn create(&self, a: CreateArgs) -> Result<Volume> {
        if a.name.is_empty() {
            return Err(ControllerError::invalid("name is required"));
        }
        check_volume_id(&a.name)?;
        let _g = self.begin(&a.name)?;
        let args = fingerprint(&a);
        if let Some(r) = lock(&self.volumes).get(&a.name) {
            if r.args == args {
                return Ok(r.volume.clone());
            }
            return Err(ControllerError::new(Kind::AlreadyExists, format!("volume {} exists with other parameters or size", a.name)));
        }
        let (attrs, creds) = self.resolve(&a).await?;
        let spec = VolumeSpec::from_attributes(&attrs)?;
        let info = self.origin.probe(&spec.url, creds.as_ref()).await?;
        let size = info.size;
        if a.required_bytes > size {
            return Err(ControllerError::new(
                Kind::OutOfRange,
                format!(
                    "the claim asks for {} bytes, and the image {} holds {size}: ask for {size} bytes or less",
                    a.required_bytes, spec.url
                ),
            ));
        }
        if a.limit_bytes != 0 && a.limit_bytes < size {
            return Err(ControllerError::new(
                Kind::OutOfRange,
                format!("the image {} holds {size} bytes, over the limit of {} bytes", spec.url, a.limit_bytes),
            ));
        }
        let mut attrs = attrs;
        if lazy_image_engine::oci::is_reference(&spec.url) {
            if let Some(pinned) = crate::origin::pin(&spec.url, &info) {
                attrs.insert("url".into(), pinned);
            }
        }
        let volume = Volume { volume_id: a.name.clone(), capacity_bytes: size, context: attrs };
        tracing::info!(volume = %a.name, url = %spec.url, size, "volume provisioned");
        if let (Some(ns), Some(claim)) = (a.parameters.get(PVC_NAMESPACE), a.parameters.get(PVC_NAME)) {
            let note = format!("volume {} serves {} ({size} bytes), fetched lazily on the nodes that mount it", a.name, spec.url);
            self.cluster.note_on_claim(ns, claim, "ImageResolved", &note).await;
        }
        lock(&self.volumes).insert(a.name.clone(), Recorded { args, volume: volume.clone() });
        Ok(volume)
    }

    /// The attributes of the image the call names (StorageClass or claim), and credentials to
    /// probe it with.
    async fn resolve(&self, a: &CreateArgs) -> Result<(HashMap<String, String>, Option<Credentials>)> {
        let mut attrs: HashMap<String, String> =
            a.parameters.iter().filter(|(k, _)| !k.starts_with("csi.storage.k8s.io/")).map(|(k, v)| (k.clone(), v.clone())).collect();
        let class_names = attrs.contains_key("url") || attrs.contains_key(PARAM_IMAGE);
        let claim = match (a.parameters.get(PVC_NAMESPACE), a.parameters.get(PVC_NAME)) {
            (Some(ns), Some(name)) if !class_names => {
                let ann = self.cluster.claim_annotations(ns, name).await?;
                Some((format!("{ns}/{name}"), ann.get(ANNOTATION_URL).cloned(), ann.get(ANNOTATION_IMAGE).cloned()))
            }
            _ => None,
        };
        let mut image = attrs.remove(PARAM_IMAGE);
        match claim {
            Some((_, Some(_), Some(_))) => {
                return Err(ControllerError::invalid(format!("the claim has both {ANNOTATION_URL} and {ANNOTATION_IMAGE}: keep one")));
            }
            Some((_, Some(url), None)) => {
                attrs.insert("url".into(), url);
            }
            Some((_, None, Some(name))) => image = Some(name),
            Some((claim, None, None)) => {
                return Err(ControllerError::invalid(format!(
                    "no image for claim {claim}: annotate it with {ANNOTATION_URL} or {ANNOTATION_IMAGE}, or give its StorageClass a `url` or `image` parameter"
                )))
            }
            None if !class_names => {
                return Err(ControllerError::invalid(
                    "no image: give the StorageClass a `url` or `image` parameter, or annotate the claim (the provisioner must run with --extra-create-metadata)",
                ))
            }
            None => {}
        }
        if attrs.contains_key("url") && image.is_some() {
            return Err(ControllerError::invalid("both `url` and `image` name an image: keep one"));
        }
        let mut creds = Credentials::from_secrets(&a.secrets)?;
        if let Some(name) = image {
            let li = self
                .cluster
                .lazy_image(&name)
                .await?
                .ok_or_else(|| ControllerError::new(Kind::NotFound, format!("LazyImage {name} does not exist")))?;
            for (k, v) in li.spec.attributes() {
                match attrs.get(&k) {
                    Some(mine) if *mine != v => {
                        return Err(ControllerError::invalid(format!("parameter {k}={mine:?} disagrees with LazyImage {name}'s {v:?}")));
                    }
                    _ => {
                        attrs.insert(k, v);
                    }
                }
            }
            if let (None, Some(r)) = (&creds, &li.spec.credentials_secret_ref) {
                creds = Credentials::from_secrets(&self.cluster.secret(&r.namespace, &r.name).await?)?;
            }
        }
        Ok((attrs, creds))
    }

    /// Forgets a volume; unknown names are done already.
    pub fn delete(&self, volume_id: &str) -> Result<()> {
        if volume_id.is_empty() {
            return Err(ControllerError::invalid("volume_id is required"));
        }
        let _g = self.begin(volume_id)?;
        if lock(&self.volumes).remove(volume_id).is_some() {
            tracing::info!(volume = volume_id, "volume deleted");
        }
        Ok(())
    }

    /// How many volumes are known.
    pub fn count(&self) -> usize {
        lock(&self.volumes).len()
    }

    /// A volume made here, if it is known.
    pub fn get(&self, volume_id: &str) -> Option<Volume> {
        lock(&self.volumes).get(volume_id).map(|r| r.volume.clone())
    }

    /// Up to `max` volumes (0: all) after `after`, in name order, and the token of the next page.
    pub fn list(&self, after: &str, max: usize) -> Result<(Vec<Volume>, Option<String>)> {
        let vols = lock(&self.volumes);
        if !after.is_empty() && !vols.contains_key(after) {
            return Err(ControllerError::new(Kind::Aborted, format!("starting_token {after:?} is not a volume of this controller")));
        }
        let mut rest = vols.iter().filter(|(k, _)| after.is_empty() || k.as_str() > after).map(|(_, r)| r.volume.clone());
        let page: Vec<Volume> = if max == 0 { rest.by_ref().collect() } else { rest.by_ref().take(max).collect() };
        let next = match rest.next() {
            Some(_) => page.last().map(|v| v.volume_id.clone()),
            None => None,
        };
        Ok((page, next))
    }
}

/// The arguments that decide a volume, in a canonical form.
fn fingerprint(a: &CreateArgs) -> String {
    let params: BTreeMap<&String, &String> = a.parameters.iter().collect();
    format!("{}:{}:{params:?}", a.required_bytes, a.limit_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{LazyImage, LazyImageSpec};
    use lazy_image_engine::ImageInfo;

    struct FakeCluster {
        claims: HashMap<String, BTreeMap<String, String>>,
        images: HashMap<String, LazyImageSpec>,
    }

    #[async_trait::async_trait]
    impl Cluster for FakeCluster {
        async fn claim_annotations(&self, ns: &str, name: &str) -> Result<BTreeMap<String, String>> {
            self.claims.get(&format!("{ns}/{name}")).cloned().ok_or_else(|| ControllerError::new(Kind::NotFound, "no claim"))
        }
        async fn lazy_image(&self, name: &str) -> Result<Option<LazyImage>> {
            Ok(self.images.get(name).map(|s| LazyImage::new(name, s.clone())))
        }
        async fn secret(&self, _: &str, _: &str) -> Result<HashMap<String, String>> {
            Ok(HashMap::from([("bearerToken".to_string(), "t".to_string())]))
        }
        async fn note_on_claim(&self, _: &str, _: &str, _: &str, _: &str) {}
    }

    struct FakeOrigin;

    #[async_trait::async_trait]
    impl Origin for FakeOrigin {
        async fn probe(&self, url: &str, _: Option<&Credentials>) -> Result<ImageInfo> {
            match url {
                "http://o/down.img" => Err(ControllerError::new(Kind::Unavailable, "down")),
                _ => Ok(ImageInfo { size: 1 << 20, etag: Some("\"v1\"".into()), last_modified: None }),
            }
        }
    }

    fn provisioner() -> Provisioner {
        let spec = LazyImageSpec {
            url: "http://o/model.img".into(),
            format: Some("erofs".into()),
            digest: None,
            manifest_url: None,
            chunk_size: None,
            credentials_secret_ref: None,
            warm: Default::default(),
        };
        let cluster = FakeCluster {
            claims: HashMap::from([
                ("ns/by-url".to_string(), BTreeMap::from([(ANNOTATION_URL.to_string(), "http://o/x.img".to_string())])),
                ("ns/by-image".to_string(), BTreeMap::from([(ANNOTATION_IMAGE.to_string(), "model".to_string())])),
                ("ns/bare".to_string(), BTreeMap::new()),
            ]),
            images: HashMap::from([("model".to_string(), spec)]),
        };
        Provisioner::new(Arc::new(cluster), Arc::new(FakeOrigin))
    }

    fn args(name: &str, params: &[(&str, &str)]) -> CreateArgs {
        CreateArgs {
            name: name.into(),
            required_bytes: 0,
            limit_bytes: 0,
            parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            secrets: HashMap::new(),
        }
    }

    #[tokio::test]
    async fn images_come_from_the_class_or_the_claim() {
        let p = provisioner();
        let v = p.create(args("pvc-1", &[("url", "http://o/a.img"), ("chunkSize", "64K")])).await.unwrap();
        assert_eq!(v.capacity_bytes, 1 << 20);
        assert_eq!(v.context.get("chunkSize").map(String::as_str), Some("64K"));
        fn claim(n: &str) -> [(&str, &str); 3] {
            [(PVC_NAMESPACE, "ns"), (PVC_NAME, n), ("prefetch", "true")]
        }
        let v = p.create(args("pvc-2", &claim("by-url"))).await.unwrap();
        assert_eq!(v.context.get("url").map(String::as_str), Some("http://o/x.img"));
        assert_eq!(v.context.get("prefetch").map(String::as_str), Some("true"), "the class gives defaults");
        assert!(!v.context.keys().any(|k| k.starts_with("csi.storage.k8s.io/")));
        let v = p.create(args("pvc-3", &claim("by-image"))).await.unwrap();
        assert_eq!(v.context.get("url").map(String::as_str), Some("http://o/model.img"));
        assert_eq!(v.context.get("format").map(String::as_str), Some("erofs"));
        let v = p.create(args("pvc-4", &[(PARAM_IMAGE, "model")])).await.unwrap();
        assert_eq!(v.context.get("url").map(String::as_str), Some("http://o/model.img"));
        // Every context is one the node plugin accepts as it is.
        for id in ["pvc-1", "pvc-2", "pvc-3", "pvc-4"] {
            VolumeSpec::from_attributes(&p.get(id).unwrap().context).unwrap();
        }
    }

    #[tokio::test]
    async fn refusals_have_precise_kinds() {
        let p = provisioner();
        let kind = |r: Result<Volume>| r.map(|_| ()).unwrap_err().kind;
        assert_eq!(kind(p.create(args("v", &[])).await), Kind::InvalidArgument, "no image");
        assert_eq!(kind(p.create(args("v", &[(PVC_NAMESPACE, "ns"), (PVC_NAME, "bare")])).await), Kind::InvalidArgument);
        assert_eq!(kind(p.create(args("v", &[(PARAM_IMAGE, "nope")])).await), Kind::NotFound);
        assert_eq!(kind(p.create(args("v", &[(PARAM_IMAGE, "model"), ("format", "ext4")])).await), Kind::InvalidArgument, "disagrees");
        assert_eq!(kind(p.create(args("v", &[("url", "http://o/a.img"), (PARAM_IMAGE, "model")])).await), Kind::InvalidArgument);
        assert_eq!(kind(p.create(args("v", &[("url", "ftp://o/a.img")])).await), Kind::InvalidArgument);
        assert_eq!(kind(p.create(args("v", &[("url", "http://o/down.img")])).await), Kind::Unavailable);
        assert_eq!(kind(p.create(args("a/b", &[("url", "http://o/a.img")])).await), Kind::InvalidArgument);
        let mut big = args("v", &[("url", "http://o/a.img")]);
        big.required_bytes = 2 << 20;
        let e = p.create(big).await.unwrap_err();
        assert_eq!(e.kind, Kind::OutOfRange);
        assert!(e.message.contains(&(2u64 << 20).to_string()) && e.message.contains(&(1u64 << 20).to_string()), "{}", e.message);
        assert!(p.list("", 0).unwrap().0.is_empty(), "nothing recorded by failed calls");
    }

    #[tokio::test]
    async fn idempotent_by_name() {
        let p = provisioner();
        let a = || args("pvc-1", &[("url", "http://o/a.img")]);
        let v1 = p.create(a()).await.unwrap();
        assert_eq!(p.create(a()).await.unwrap(), v1);
        let e = p.create(args("pvc-1", &[("url", "http://o/b.img")])).await.unwrap_err();
        assert_eq!(e.kind, Kind::AlreadyExists);
        p.delete("pvc-1").unwrap();
        p.delete("pvc-1").unwrap();
        assert!(p.get("pvc-1").is_none());
        p.create(args("pvc-1", &[("url", "http://o/b.img")])).await.unwrap();
    }

    #[tokio::test]
    async fn list_pages() {
        let p = provisioner();
        for i in 0..5 {
            p.create(args(&format!("pvc-{i}"), &[("url", "http://o/a.img")])).await.unwrap();
        }
        let (a, next) = p.list("", 2).unwrap();
        assert_eq!(a.len(), 2);
        let (b, next) = p.list(&next.unwrap(), 2).unwrap();
        let (c, next) = p.list(&next.unwrap(), 2).unwrap();
        assert_eq!((b.len(), c.len(), next), (2, 1, None));
        assert_eq!(p.list("nope", 2).unwrap_err().kind, Kind::Aborted);
    }
}
