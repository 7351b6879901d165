//! The node's volumes: stage (open the image, attach a device, mount it read-only at the staging
//! path), publish (read-only bind mount into a pod), unpublish, unstage, usage and condition,
//! and re-adoption of everything after a restart. Knows nothing about gRPC: callers pass checked
//! arguments (`spec`) and get `NodeError`s.
//!
//! Every operation on a volume first takes that volume's guard (`begin`); a second operation on
//! the same volume while one runs fails with `Busy` at once. Each operation is idempotent: it
//! checks what is already done before doing anything.

pub mod warm;

use crate::error::{NodeError, NodeErrorKind, NodeResult};
use crate::fd_holder::HolderClient;
use crate::spec::{Credentials, VolumeSpec};
use crate::state::{StateDir, VolumeRecord};
use lazy_image_attach::{Attachment, Backend, DeviceRecord, FsType, FuseSessionInfo, Takeover, UblkOptions};
use lazy_image_csi_common::attributes::DEVICE_SCHEME;
use lazy_image_engine::oci;
use lazy_image_engine::source::{local_source, HttpSourceOptions};
use lazy_image_engine::{
    load_manifest_from, resolve_manifest, CowView, FileSource, FillResume, HttpSource, ImageConfig, LazyImage, Manifest, RangeSource,
    StatsSnapshot, View,
};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

pub struct NodeConfig {
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub cache_limit: Option<u64>,
    pub backend: Backend,
    pub ublk: UblkOptions,
    /// Volumes staged at once at most (NodeGetInfo's max_volumes_per_node).
    pub max_volumes: usize,
    /// Where FUSE sessions are kept across a restart; `None`: they end with the plugin.
    pub fd_holder: Option<HolderClient>,
    /// Which node-local files and devices volumes may read.
    pub local: crate::local::LocalSources,
}

/// What `stage` needs, checked by the caller.
pub struct StageArgs {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub spec: VolumeSpec,
    pub credentials: Option<Credentials>,
    /// fs_type from the volume capability, if any.
    pub fs_type: Option<FsType>,
}

/// Usage and condition of one volume path.
pub struct VolumeStats {
    pub bytes_total: u64,
    pub bytes_used: u64,
    pub bytes_available: u64,
    pub inodes_total: u64,
    pub inodes_used: u64,
    pub inodes_available: u64,
    pub abnormal: bool,
    pub message: String,
}

/// A staged volume in memory.
struct Live {
    rec: VolumeRecord,
    image: Option<PooledImage>,
    attachment: Option<Attachment>,
    /// Why the volume is not being served (recovery after a restart failed); retried.
    broken: Option<String>,
}

/// What a volume holds of the pool: its image's blobs (one for a flat image; every layer of a
/// registry image, each shared with the other volumes that use it) and the device view.
#[derive(Clone)]
struct PooledImage {
    keys: Vec<String>,
    /// The top blob: counters, cache reports, the prefetch.
    image: LazyImage,
    view: View,
    /// A registry image's reference pinned to the manifest digest it resolved to.
    pinned: Option<String>,
    /// The cache directories of every blob the volume reads (warm orders pin them all).
    dirs: Vec<PathBuf>,
}

/// Volumes of the same image share one open `LazyImage` (one cache, one set of counters).
#[derive(Default)]
struct ImagePool {
    open: HashMap<String, Pooled>,
}

struct Pooled {
    image: LazyImage,
    refs: usize,
    /// The background fill some volume of this image asked for (`prefetch`).
    filler: Option<tokio::task::JoinHandle<()>>,
}

impl Pooled {
    fn prefetch_if(&mut self, wanted: bool) {
        if !wanted || self.filler.is_some() || self.image.complete_data_file().is_some() {
            return;
        }
        let image = self.image.clone();
        self.filler = Some(tokio::spawn(async move {
            let paused = |e: &lazy_image_engine::Error, pause: std::time::Duration| tracing::warn!(error = %e.report(), resume_in_s = pause.as_secs(), "background prefetch paused");
            match image.fill_until_complete(&FillResume::default(), paused).await {
                Ok(()) => tracing::info!(cache = %image.cache_dir().display(), "image complete in the cache"),
                Err(e) => tracing::warn!(error = %e.report(), "background prefetch stopped"),
            }
        }));
    }
}

pub struct Volumes {
    cfg: NodeConfig,
    state: StateDir,
    busy: Mutex<HashSet<String>>,
    live: Mutex<HashMap<String, Live>>,
    pool: tokio::sync::Mutex<ImagePool>,
    /// Warm orders being carried out (see `warm`).
    orders: tokio::sync::Mutex<warm::HeldOrders>,
    /// Reads per image cache at the last report, and when they last changed (see `warm`).
    reads_seen: Mutex<HashMap<PathBuf, (u64, u64)>>,
    /// For the metrics endpoint: warm orders held, and cache reports written.
    pub(crate) orders_gauge: std::sync::atomic::AtomicU64,
    pub(crate) report_writes: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Releases a volume's operation guard when the operation ends, however it ends.
pub struct OpGuard<'a> {
    vols: &'a Volumes,
    id: String,
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        lock(&self.vols.busy).remove(&self.id);
    }
}

fn attach_err(what: &str) -> impl Fn(lazy_image_attach::AttachError) -> NodeError + '_ {
    move |e| NodeError::attach(what, &e)
}

impl Volumes {
    pub fn new(cfg: NodeConfig) -> NodeResult<Arc<Self>> {
        let state = StateDir::open(&cfg.state_dir)?;
        Ok(Arc::new(Volumes {
            cfg,
            state,
            busy: Mutex::new(HashSet::new()),
            live: Mutex::new(HashMap::new()),
            pool: tokio::sync::Mutex::new(ImagePool::default()),
            orders: Default::default(),
            reads_seen: Mutex::new(HashMap::new()),
            orders_gauge: Default::default(),
            report_writes: Default::default(),
        }))
    }

    pub fn backend(&self) -> Backend {
        self.cfg.backend
    }

    /// Where an inline ephemeral volume is staged: the plugin's own directory, not kubelet's.
    pub fn ephemeral_staging(&self, volume_id: &str) -> PathBuf {
        self.state.ephemeral_staging(volume_id)
    }

    /// Takes the guard of `volume_id`, or fails with `Busy` if an operation on it is running.
    pub fn begin(&self, volume_id: &str) -> NodeResult<OpGuard<'_>> {
        if !lock(&self.busy).insert(volume_id.to_string()) {
            return Err(NodeError::new(
                NodeErrorKind::Busy,
                format!("an operation on volume {volume_id} is already in progress; retry later"),
            ));
        }
        Ok(OpGuard { vols: self, id: volume_id.to_string() })
    }

    /// The volume's source, and its manifest if one is pinned or named: over HTTP(S), or a
    /// node-local file or device through the allowlist (a local manifest too).
    async fn open_source(
        &self,
        spec: &VolumeSpec,
        opts: HttpSourceOptions,
        what: &str,
    ) -> NodeResult<(Arc<dyn RangeSource>, Option<Manifest>)> {
        let engine = |e: lazy_image_engine::Error| NodeError::engine(what, &e);
        let local_file = |path: &str| -> NodeResult<Arc<dyn RangeSource>> {
            let file = self.cfg.local.open_file(path)?;
            Ok(Arc::new(FileSource::from_file(file, path.to_string()).map_err(engine)?))
        };
        let manifest_at = spec.manifest_url.clone().or_else(|| spec.digest.as_ref().map(|_| format!("{}.manifest", spec.url)));
        let manifest = match manifest_at.as_deref().and_then(|m| m.strip_prefix("file://")) {
            Some(path) => {
                let m = load_manifest_from(local_file(path)?, &format!("manifest {path}"), spec.digest.as_deref()).await.map_err(engine)?;
                Some(m)
            }
            None => resolve_manifest(&spec.url, spec.manifest_url.as_deref(), spec.digest.as_deref(), &opts).await.map_err(engine)?,
        };
        let source: Arc<dyn RangeSource> = if let Some(path) = spec.url.strip_prefix("file://") {
            local_file(path)?
        } else if let Some(dev) = spec.url.strip_prefix(DEVICE_SCHEME) {
            let file = self.cfg.local.open_device(dev)?;
            local_source(file, dev.to_string()).map_err(engine)?
        } else {
            Arc::new(HttpSource::new(&spec.url, opts).map_err(engine)?)
        };
        Ok((source, manifest))
    }

    async fn open_image(&self, spec: &VolumeSpec, creds: Option<&Credentials>) -> NodeResult<PooledImage> {
        if oci::is_reference(&spec.url) {
            return self.open_registry_image(spec, creds).await;
        }
        // The image's blob, then what it holds: a qcow2 image's backing files are opened
        // through the pool too (same credentials and allowlist), a lone OverlayBD layer stacks
        // on nothing.
        let what = format!("image {}", spec.url);
        let opener = PoolUrls { vols: self, spec, creds, taken: Mutex::new(Vec::new()), refused: Mutex::new(None) };
        let top = opener.open_pooled(spec).await?;
        let view = lazy_image_formats::view_of(&spec.url, top.clone(), &opener).await;
        let keys = std::mem::take(&mut *lock(&opener.taken));
        match view {
            Ok(view) => {
                let dirs = self.blobs_of(&keys, spec.prefetch).await;
                Ok(PooledImage { keys, image: top, view, pinned: None, dirs })
            }
            Err(e) => {
                self.release_keys(keys).await;
                Err(lock(&opener.refused).take().unwrap_or_else(|| NodeError::engine(&what, &e)))
            }
        }
    }

    /// The pooled blob of `spec` (with the volume's credentials), opened if no volume has it:
    /// volumes that differ only in `prefetch` or in a writable layer share it (and its one cache).
    async fn pool_blob(&self, spec: &VolumeSpec, creds: Option<&Credentials>) -> NodeResult<(String, LazyImage)> {
        let image_spec = VolumeSpec { prefetch: false, writable: false, writable_size: None, ..spec.clone() };
        let key = serde_json::to_string(&(image_spec, creds.map(|c| &c.0))).map_err(|e| NodeError::internal(format!("image key: {e}")))?;
        let image = self
            .take_pooled(&key, async {
                let what = format!("image {}", spec.url);
                let opts = Credentials::source_options(creds)?;
                let (source, manifest) = self.open_source(spec, opts, &what).await?;
                let mut cfg = self.image_config(spec);
                cfg.manifest = manifest;
                LazyImage::open(source, cfg).await.map_err(|e| NodeError::engine(&what, &e))
            })
            .await?;
        Ok((key, image))
    }

    /// The pooled blob under `key` with one more reference, or the one `open` makes, pooled.
    /// (Prefetching is the volume's: `blobs_of`.)
    async fn take_pooled<E>(&self, key: &str, open: impl std::future::Future<Output = Result<LazyImage, E>>) -> Result<LazyImage, E> {
        let mut pool = self.pool.lock().await;
        if let Some(p) = pool.open.get_mut(key) {
            p.refs += 1;
            return Ok(p.image.clone());
        }
        let image = open.await?;
        pool.open.insert(key.to_string(), Pooled { image: image.clone(), refs: 1, filler: None });
        Ok(image)
    }

    /// The cache settings of a volume's blobs.
    fn image_config(&self, spec: &VolumeSpec) -> ImageConfig {
        let mut cfg = ImageConfig::new(&self.cfg.cache_dir);
        cfg.cache_limit = self.cfg.cache_limit;
        if let Some(cs) = spec.chunk_size {
            cfg.chunk_size = cs;
        }
        cfg
    }

    /// A registry image: its manifest resolved with the volume's credentials, each layer blob
    /// taken from the pool by digest (one cache and one set of fetches per blob on the node,
    /// whichever images and volumes use it) or opened and pooled, and the device built over them.
    async fn open_registry_image(&self, spec: &VolumeSpec, creds: Option<&Credentials>) -> NodeResult<PooledImage> {
        let what = format!("image {}", spec.url);
        let engine = |e: lazy_image_engine::Error| NodeError::engine(&what, &e);
        let reference = oci::Reference::parse(&spec.url).map_err(engine)?;
        let reg = Arc::new(oci::Registry::new(reference, creds.map(|c| c.to_registry()).transpose()?).map_err(engine)?);
        let resolved = reg.resolve().await.map_err(engine)?;
        let opener = PoolBlobs { vols: self, reg, resolved: resolved.clone(), spec, taken: Mutex::new(Vec::new()) };
        let opened = lazy_image_formats::open_oci(&resolved, &opener).await;
        let keys = std::mem::take(&mut *lock(&opener.taken));
        match opened {
            Ok((image, view)) => {
                let dirs = self.blobs_of(&keys, spec.prefetch).await;
                let mut pinned = resolved.reference.clone();
                pinned.digest = Some(resolved.manifest_digest.clone());
                Ok(PooledImage { keys, image, view, pinned: Some(pinned.to_string()), dirs })
            }
            Err(e) => {
                self.release_keys(keys).await;
                Err(engine(e))
            }
        }
    }

    /// The cache directories of pooled blobs; with `prefetch`, each is filled in the background
    /// (a volume's prefetch or a warm order fetches every blob of its image).
    async fn blobs_of(&self, keys: &[String], prefetch: bool) -> Vec<PathBuf> {
        let mut pool = self.pool.lock().await;
        let mut dirs = Vec::new();
        for k in keys {
            if let Some(p) = pool.open.get_mut(k) {
                p.prefetch_if(prefetch);
                dirs.push(p.image.cache_dir());
            }
        }
        dirs
    }

    async fn release_image(&self, img: PooledImage) {
        drop(img.view);
        self.release_keys(img.keys).await;
    }

    async fn release_keys(&self, keys: Vec<String>) {
        for key in keys {
            let mut pool = self.pool.lock().await;
            let last = match pool.open.get_mut(&key) {
                Some(p) if p.refs > 1 => {
                    p.refs -= 1;
                    false
                }
                Some(_) => true,
                None => false,
            };
            if last {
                if let Some(p) = pool.open.remove(&key) {
                    drop(pool);
                    if let Some(f) = p.filler {
                        f.abort();
                    }
                    if let Err(e) = p.image.close().await {
                        tracing::warn!(error = %e.report(), "closing image");
                    }
                }
            }
        }
    }

    fn work_dir(&self, volume_id: &str) -> PathBuf {
        self.cfg.state_dir.join("work").join(volume_id)
    }

    /// Where a writable volume's copy-on-write layer lives (on the node, beside the records).
    fn layer_dir(&self, volume_id: &str) -> PathBuf {
        self.cfg.state_dir.join("layers").join(volume_id)
    }

    /// A writable volume's image with its layer over it: a new, empty layer at staging
    /// (`fresh`: one left by an earlier staging of the same id is not this volume's), the one
    /// the volume had when re-adopting it after a restart.
    async fn with_layer(&self, id: &str, spec: &VolumeSpec, mut image: PooledImage, fresh: bool) -> NodeResult<PooledImage> {
        if !spec.writable {
            return Ok(image);
        }
        if fresh {
            self.remove_layer(id);
        }
        let limit = spec.writable_size.unwrap_or(image.view.size());
        match CowView::open(image.view.clone(), &self.layer_dir(id), limit) {
            Ok(layer) => {
                image.view = layer;
                Ok(image)
            }
            Err(e) => {
                self.release_image(image).await;
                Err(NodeError::engine(&format!("volume {id}: its writable layer"), &e))
            }
        }
    }

    fn remove_layer(&self, id: &str) {
        let dir = self.layer_dir(id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(volume_id = id, dir = %dir.display(), error = %e, "removing the writable layer");
            }
        }
    }

    /// NodeStageVolume: one device and one read-only mount at the staging path.
    pub async fn stage(&self, a: StageArgs) -> NodeResult<()> {
        let _g = self.begin(&a.volume_id)?;
        self.stage_locked(a, false).await
    }

    async fn stage_locked(&self, a: StageArgs, ephemeral: bool) -> NodeResult<()> {
        let id = a.volume_id.clone();
        // The attributes' format, in the attach crate's terms (the same names).
        let format = match a.spec.format {
            Some(f) => Some(f.name().parse::<FsType>().map_err(attach_err(&id))?),
            None => None,
        };
        let fs = match (format, a.fs_type) {
            (Some(x), Some(y)) if x != y => {
                return Err(NodeError::invalid(format!("volume {id}: format {} and fs_type {} disagree", x.name(), y.name())))
            }
            (x, y) => x.or(y),
        };
        if let Some(live) = lock(&self.live).get(&id) {
            if live.rec.staging_path == a.staging_path && live.rec.spec == a.spec {
                return Ok(()); // already done
            }
            return Err(NodeError::new(
                NodeErrorKind::AlreadyExists,
                format!("volume {id} is already staged at {} with other attributes", live.rec.staging_path.display()),
            ));
        }
        let staged = lock(&self.live).len();
        if staged >= self.cfg.max_volumes {
            return Err(NodeError::new(
                NodeErrorKind::ResourceExhausted,
                format!("volume {id}: this node already stages {staged} volumes, its limit (--max-volumes-per-node)"),
            ));
        }
        std::fs::create_dir_all(&a.staging_path).map_err(|e| NodeError::internal(format!("creating {}: {e}", a.staging_path.display())))?;
        if lazy_image_attach::is_mountpoint(&a.staging_path).map_err(attach_err(&id))? {
            return Err(NodeError::new(
                NodeErrorKind::FailedPrecondition,
                format!("staging path {} already has something mounted", a.staging_path.display()),
            ));
        }
        let image = self.open_image(&a.spec, a.credentials.as_ref()).await?;
        let image = self.with_layer(&id, &a.spec, image, true).await?;
        let (handover, work) = (self.cfg.fd_holder.is_some(), self.work_dir(&id));
        let att = Attachment::attach(image.view.clone(), &work, &a.staging_path, fs, self.cfg.backend, &self.cfg.ublk, handover);
        let att = match att.await {
            Ok(att) => att,
            Err(e) => {
                self.release_image(image).await;
                self.remove_layer(&id);
                return Err(NodeError::attach(&format!("volume {id}"), &e));
            }
        };
        let fuse_session = self.hand_over(&id, &att).await;
        let rec = VolumeRecord {
            volume_id: id.clone(),
            staging_path: a.staging_path.clone(),
            spec: a.spec,
            credentials: a.credentials,
            fs: att.fs,
            device: DeviceRecord::of(&att, fuse_session),
            targets: BTreeSet::new(),
            ephemeral,
            resolved: image.pinned.clone(),
        };
        if let Err(e) = self.state.save(&rec) {
            let _ = att.detach().await;
            self.release_image(image).await;
            self.remove_layer(&id);
            return Err(e);
        }
        tracing::info!(
            volume_id = %id, device = %att.device_path().display(), staging = %a.staging_path.display(),
            // Reads of a direct volume never reach the plugin: its read counters stay still.
            direct_from_cache = att.is_direct(), "volume staged"
        );
        lock(&self.live).insert(id, Live { rec, image: Some(image), attachment: Some(att), broken: None });
        Ok(())
    }

    /// NodeUnstageVolume: unmount, remove the device, close the image. Unknown volumes and paths
    /// that are not mounted count as done.
    pub async fn unstage(&self, volume_id: &str, staging_path: &Path) -> NodeResult<()> {
        let _g = self.begin(volume_id)?;
        self.unstage_locked(volume_id, staging_path).await
    }

    async fn unstage_locked(&self, volume_id: &str, staging_path: &Path) -> NodeResult<()> {
        let live = lock(&self.live).remove(volume_id);
        let Some(mut live) = live else {
            // Not ours (any more): make sure nothing stays mounted there.
            return lazy_image_attach::unmount(staging_path).map_err(attach_err(volume_id));
        };
        let put_back = |live: Live, e: NodeError| {
            lock(&self.live).insert(volume_id.to_string(), live);
            Err(e)
        };
        if live.rec.staging_path != staging_path {
            let msg = format!("volume {volume_id} is staged at {}, not {}", live.rec.staging_path.display(), staging_path.display());
            return put_back(live, NodeError::new(NodeErrorKind::FailedPrecondition, msg));
        }
        if !live.rec.targets.is_empty() {
            let msg = format!("volume {volume_id} is still published at {:?}; unpublish it first", live.rec.targets);
            return put_back(live, NodeError::new(NodeErrorKind::FailedPrecondition, msg));
        }
        let res = match live.attachment.take() {
            Some(att) => att.detach().await.map_err(attach_err(volume_id)),
            None => live.rec.device.teardown(&live.rec.staging_path).map_err(attach_err(volume_id)),
        };
        if let Err(e) = res {
            // The attachment is gone with the failed detach; what is left is described by the
            // record, whose teardown can finish it later.
            return put_back(live, e);
        }
        if let Some(img) = live.image.take() {
            self.release_image(img).await;
        }
        self.remove_layer(volume_id);
        self.state.remove(volume_id)?;
        let _ = std::fs::remove_dir_all(self.work_dir(volume_id));
        if matches!(live.rec.device, DeviceRecord::Fuse { session: Some(_), .. }) {
            self.holder_forget(volume_id).await;
        }
        if live.rec.ephemeral {
            // The plugin made this directory (kubelet made none for an inline volume).
            if let Err(e) = std::fs::remove_dir(&live.rec.staging_path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(volume_id, path = %live.rec.staging_path.display(), error = %e, "removing the inline volume's staging directory");
                }
            }
        }
        tracing::info!(volume_id, "volume unstaged");
        Ok(())
    }

    /// NodePublishVolume: a bind mount of the staged volume at `target`, read-write when the pod
    /// writes (`writes`: its writer's access mode) to a writable volume, read-only otherwise. An
    /// ephemeral volume is staged here first, from `ephemeral`'s spec.
    pub async fn publish(
        &self,
        volume_id: &str,
        staging_path: Option<&Path>,
        target: &Path,
        writes: Option<&str>,
        ephemeral: Option<StageArgs>,
    ) -> NodeResult<()> {
        let _g = self.begin(volume_id)?;
        let refuse_write = |mode: &str| {
            Err(NodeError::invalid(format!(
                "access mode {mode} without readonly asks for a writable volume, and this lazy-image volume is a read-only image: \
                 set readOnly: true on the pod's csi volume (or on the PV's csi source), give the PV the access mode ReadOnlyMany, \
                 or set the volume attribute writable: \"true\" for a writable copy-on-write volume"
            )))
        };
        if let (Some(m), Some(a)) = (writes, &ephemeral) {
            if !a.spec.writable {
                return refuse_write(m);
            }
        }
        if let Some(a) = ephemeral {
            let known = lock(&self.live).get(volume_id).map(|l| l.rec.ephemeral);
            match known {
                Some(true) => {}
                Some(false) => {
                    return Err(NodeError::new(
                        NodeErrorKind::AlreadyExists,
                        format!("volume {volume_id} is staged as a persistent volume"),
                    ))
                }
                None => self.stage_locked(a, true).await?,
            }
        }
        let staging = {
            let live = lock(&self.live);
            let Some(l) = live.get(volume_id) else {
                return Err(NodeError::new(NodeErrorKind::FailedPrecondition, format!("volume {volume_id} is not staged on this node")));
            };
            if let Some(sp) = staging_path {
                if !l.rec.ephemeral && l.rec.staging_path != sp {
                    return Err(NodeError::new(
                        NodeErrorKind::FailedPrecondition,
                        format!("volume {volume_id} is staged at {}, not {}", l.rec.staging_path.display(), sp.display()),
                    ));
                }
            }
            if let Some(why) = &l.broken {
                return Err(NodeError::new(NodeErrorKind::Unavailable, format!("volume {volume_id} is not being served: {why}")));
            }
            if let Some(m) = writes.filter(|_| !l.rec.spec.writable) {
                return refuse_write(m);
            }
            if l.rec.targets.contains(target) && lazy_image_attach::is_mountpoint(target).unwrap_or(false) {
                return Ok(()); // already done
            }
            l.rec.staging_path.clone()
        };
        std::fs::create_dir_all(target).map_err(|e| NodeError::internal(format!("creating {}: {e}", target.display())))?;
        if lazy_image_attach::is_mountpoint(target).map_err(attach_err(volume_id))? {
            return Err(NodeError::new(
                NodeErrorKind::FailedPrecondition,
                format!("target path {} already has something mounted", target.display()),
            ));
        }
        lazy_image_attach::bind(&staging, target, writes.is_none()).map_err(attach_err(volume_id))?;
        let rec = {
            let mut live = lock(&self.live);
            let Some(l) = live.get_mut(volume_id) else {
                return Err(NodeError::internal(format!("volume {volume_id} vanished while publishing")));
            };
            l.rec.targets.insert(target.to_path_buf());
            l.rec.clone()
        };
        self.state.save(&rec)?;
        tracing::info!(volume_id, target = %target.display(), "volume published");
        Ok(())
    }

    /// NodeUnpublishVolume: unmount and remove the target; an ephemeral volume is unstaged too.
    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> NodeResult<()> {
        let _g = self.begin(volume_id)?;
        lazy_image_attach::unmount(target).map_err(attach_err(volume_id))?;
        match std::fs::remove_dir(target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(NodeError::internal(format!("removing {}: {e}", target.display()))),
        }
        let rec = {
            let mut live = lock(&self.live);
            match live.get_mut(volume_id) {
                Some(l) => l.rec.targets.remove(target).then(|| l.rec.clone()),
                None => None,
            }
        };
        if let Some(rec) = rec {
            self.state.save(&rec)?;
            tracing::info!(volume_id, target = %target.display(), "volume unpublished");
            if rec.ephemeral && rec.targets.is_empty() {
                self.unstage_locked(volume_id, &rec.staging_path).await?;
            }
        }
        Ok(())
    }

    /// NodeGetVolumeStats for a published target or the staging path of `volume_id`.
    pub fn stats(&self, volume_id: &str, path: &Path) -> NodeResult<VolumeStats> {
        let (image, broken, device) = {
            let live = lock(&self.live);
            let Some(l) = live.get(volume_id) else {
                return Err(NodeError::new(NodeErrorKind::NotFound, format!("volume {volume_id} is not staged or published on this node")));
            };
            if l.rec.staging_path != path && !l.rec.targets.contains(path) {
                return Err(NodeError::new(NodeErrorKind::NotFound, format!("{} is not a path of volume {volume_id}", path.display())));
            }
            (l.image.as_ref().map(|i| i.view.clone()), l.broken.clone(), l.attachment.as_ref().map(|a| a.device_path()))
        };
        let mounted = lazy_image_attach::is_mountpoint(path).map_err(attach_err(volume_id))?;
        let mut st = VolumeStats {
            bytes_total: 0,
            bytes_used: 0,
            bytes_available: 0,
            inodes_total: 0,
            inodes_used: 0,
            inodes_available: 0,
            abnormal: false,
            message: "healthy".into(),
        };
        if mounted {
            let vfs = lazy_image_attach::statvfs(path).map_err(attach_err(volume_id))?;
            let bs = vfs.f_frsize as u64;
            st.bytes_total = vfs.f_blocks as u64 * bs;
            st.bytes_available = vfs.f_bavail as u64 * bs;
            st.bytes_used = (vfs.f_blocks as u64).saturating_sub(vfs.f_bfree as u64) * bs;
            st.inodes_total = vfs.f_files as u64;
            st.inodes_available = vfs.f_favail as u64;
            st.inodes_used = (vfs.f_files as u64).saturating_sub(vfs.f_ffree as u64);
        }
        let condition = image.map(|i| i.condition());
        if let Some(why) = broken {
            (st.abnormal, st.message) = (true, format!("not being served: {why}"));
        } else if !mounted {
            (st.abnormal, st.message) = (true, format!("{} is not mounted", path.display()));
        } else if device.as_deref().is_some_and(|d| !d.exists()) {
            (st.abnormal, st.message) = (true, "the volume's block device is gone".into());
        } else if let Some(c) = condition.filter(|c| c.abnormal) {
            (st.abnormal, st.message) = (true, c.message);
        }
        Ok(st)
    }

    /// Per-volume counters for the metrics endpoint: (volume id, image URL, stats, fill ratio).
    pub fn metrics(&self) -> Vec<(String, String, StatsSnapshot, f64)> {
        let live = lock(&self.live);
        let mut v: Vec<_> = live
            .iter()
            .filter_map(|(id, l)| {
                let img = l.image.as_ref()?;
                let (have, total) = img.image.fill();
                // Counters of every blob the volume reads; the fill is its top blob's.
                Some((id.clone(), l.rec.spec.url.clone(), img.view.stats(), have as f64 / total.max(1) as f64))
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Re-adopts every volume in the state directory after a (re)start. A volume that cannot be
    /// served yet (say, the origin is down) is kept and retried by `retry_broken`.
    pub async fn recover_all(&self) {
        for rec in self.state.load_all() {
            let id = rec.volume_id.clone();
            let _g = match self.begin(&id) {
                Ok(g) => g,
                Err(_) => continue,
            };
            match self.recover_one(&rec).await {
                Ok((image, att, session)) => self.adopt(rec, image, att, session),
                Err(e) => {
                    tracing::error!(volume_id = %id, error = %e, "cannot re-adopt volume yet; will retry");
                    lock(&self.live).insert(id, Live { rec, image: None, attachment: None, broken: Some(e.message) });
                }
            }
        }
    }

    /// Retries volumes whose re-adoption failed, until they are served or unstaged.
    pub async fn retry_broken(self: Arc<Self>, every: std::time::Duration) {
        loop {
            tokio::time::sleep(every).await;
            let broken: Vec<VolumeRecord> = lock(&self.live).values().filter(|l| l.broken.is_some()).map(|l| l.rec.clone()).collect();
            for rec in broken {
                let Ok(_g) = self.begin(&rec.volume_id) else { continue };
                if lock(&self.live).get(&rec.volume_id).is_none_or(|l| l.broken.is_none()) {
                    continue;
                }
                match self.recover_one(&rec).await {
                    Ok((image, att, session)) => self.adopt(rec, image, att, session),
                    Err(e) => {
                        if let Some(l) = lock(&self.live).get_mut(&rec.volume_id) {
                            l.broken = Some(e.message);
                        }
                    }
                }
            }
        }
    }

    /// Records the device a re-adopted volume is served from now and makes it live.
    fn adopt(&self, mut rec: VolumeRecord, image: PooledImage, att: Attachment, fuse_session: Option<FuseSessionInfo>) {
        tracing::info!(volume_id = %rec.volume_id, device = %att.device_path().display(), "volume re-adopted");
        rec.device = DeviceRecord::of(&att, fuse_session);
        if let Err(e) = self.state.save(&rec) {
            tracing::error!(volume_id = %rec.volume_id, error = %e, "saving a re-adopted volume");
        }
        lock(&self.live).insert(rec.volume_id.clone(), Live { rec, image: Some(image), attachment: Some(att), broken: None });
    }

    /// Serves a recorded volume again: takes over its ublk device if the kernel kept it for us,
    /// or keeps a loop device on the complete cache file (mount and readers survive), otherwise tears down what is left and attaches afresh, then
    /// restores the pods' bind mounts.
    async fn recover_one(&self, rec: &VolumeRecord) -> NodeResult<(PooledImage, Attachment, Option<FuseSessionInfo>)> {
        let id = &rec.volume_id;
        // The image the volume was staged with, not what its tag names now.
        let spec = match &rec.resolved {
            Some(pinned) => VolumeSpec { url: pinned.clone(), ..rec.spec.clone() },
            None => rec.spec.clone(),
        };
        let image = self.open_image(&spec, rec.credentials.as_ref()).await?;
        let image = self.with_layer(id, &spec, image, false).await?;
        // The kernel quiesces a ublk device a moment after its server died: wait that long.
        let takeover = rec.device.takeover(&rec.staging_path, std::time::Duration::from_secs(5));
        match takeover.map_err(attach_err(id))? {
            Takeover::Ublk(dev) => {
                match Attachment::recover_ublk(image.view.clone(), dev, &rec.staging_path, rec.fs, &self.cfg.ublk).await {
                    Ok(att) => return Ok((image, att, None)),
                    Err(e) => {
                        self.release_image(image).await;
                        return Err(NodeError::attach(&format!("volume {id}: taking over /dev/ublkb{dev}"), &e));
                    }
                }
            }
            // A loop device on the complete cache file never needed us: keep it as it is.
            Takeover::Loop(dev) => match Attachment::adopt_direct_loop(&image.image, &dev, &rec.staging_path, rec.fs) {
                Ok(att) => return Ok((image, att, None)),
                Err(e) => tracing::warn!(volume_id = %id, error = %e, "cannot keep the direct loop device; attaching afresh"),
            },
            Takeover::FuseSession { loop_device, fuse_dir, session } => {
                match self.take_over_fuse(id, &image, session, &fuse_dir, &loop_device, &rec.staging_path, rec.fs).await {
                    Ok(att) => return Ok((image, att, Some(session))),
                    Err(e) => {
                        tracing::warn!(volume_id = %id, error = %e, "cannot take the FUSE session over; attaching afresh (pods see EIO until they are replaced)");
                        // Whatever the holder kept serves nobody now: let the kernel end it.
                        self.holder_forget(id).await;
                    }
                }
            }
            Takeover::None => {}
        }
        // Nothing to take over: the pods' mounts point at a dead filesystem. Detach them (a pod
        // may still hold files there) and start again.
        for t in &rec.targets {
            if let Err(e) = lazy_image_attach::unmount_detach(t) {
                tracing::warn!(volume_id = %id, target = %t.display(), error = %e, "detaching a stale pod mount");
            }
        }
        if let Err(e) = lazy_image_attach::unmount_detach(&rec.staging_path) {
            tracing::warn!(volume_id = %id, error = %e, "detaching the stale staging mount");
        }
        if let Err(e) = rec.device.teardown(&rec.staging_path) {
            self.release_image(image).await;
            return Err(NodeError::attach(&format!("volume {id}: cleaning up"), &e));
        }
        std::fs::create_dir_all(&rec.staging_path)
            .map_err(|e| NodeError::internal(format!("creating {}: {e}", rec.staging_path.display())))?;
        let (handover, work) = (self.cfg.fd_holder.is_some(), self.work_dir(id));
        let att =
            Attachment::attach(image.view.clone(), &work, &rec.staging_path, Some(rec.fs), self.cfg.backend, &self.cfg.ublk, handover);
        let att = match att.await {
            Ok(att) => att,
            Err(e) => {
                self.release_image(image).await;
                return Err(NodeError::attach(&format!("volume {id}"), &e));
            }
        };
        let session = self.hand_over(id, &att).await;
        // Targets are recorded without their readonly flag: a writable volume's come back
        // read-write.
        for t in &rec.targets {
            let _ = std::fs::create_dir_all(t);
            if let Err(e) = lazy_image_attach::bind(&rec.staging_path, t, !rec.spec.writable) {
                tracing::error!(volume_id = %id, target = %t.display(), error = %e, "restoring a pod's mount");
            }
        }
        Ok((image, att, session))
    }

    /// Hands a copy of the volume's FUSE session to the fd holder, so that it outlives this
    /// process. Returns what was handed over; `None` when there is nothing to hand over or the
    /// holder refused (the volume works, but a restart will break its pods' mounts).
    async fn hand_over(&self, id: &str, att: &Attachment) -> Option<FuseSessionInfo> {
        let holder = self.cfg.fd_holder.as_ref()?;
        let (fd, info) = match att.fuse_handover()? {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(volume_id = id, error = %e, "cannot copy the FUSE session descriptor; the volume will not survive a plugin restart");
                return None;
            }
        };
        let meta = serde_json::to_string(&info).ok()?;
        let res = tokio::task::block_in_place(|| holder.put(id, &meta, std::os::fd::AsFd::as_fd(&fd)));
        match res {
            Ok(()) => Some(info),
            Err(e) => {
                tracing::warn!(volume_id = id, socket = %holder.socket().display(), error = %e, "the fd holder did not take the FUSE session; the volume will not survive a plugin restart");
                None
            }
        }
    }

    /// Tells the fd holder to let go of a volume's session.
    async fn holder_forget(&self, id: &str) {
        if let Some(h) = &self.cfg.fd_holder {
            if let Err(e) = tokio::task::block_in_place(|| h.forget(id)) {
                tracing::warn!(volume_id = id, error = %e, "the fd holder did not let go of a FUSE session");
            }
        }
    }

    /// Serves again the FUSE session a dead plugin left with the fd holder: its loop device, the
    /// staging mount and the pods' mounts stay as they are.
    #[allow(clippy::too_many_arguments)]
    async fn take_over_fuse(
        &self,
        id: &str,
        image: &PooledImage,
        info: FuseSessionInfo,
        fuse_dir: &Path,
        loop_dev: &Path,
        staging: &Path,
        fs: FsType,
    ) -> NodeResult<Attachment> {
        let holder = self.cfg.fd_holder.as_ref().ok_or_else(|| NodeError::internal("no fd holder is configured (--fd-holder off)"))?;
        let held = tokio::task::block_in_place(|| holder.get(id)).map_err(|e| NodeError::internal(format!("asking the fd holder: {e}")))?;
        let Some((meta, fd)) = held else {
            return Err(NodeError::internal(
                "the fd holder does not hold this volume's FUSE session (it was restarted, or the connection ended)",
            ));
        };
        if serde_json::from_str::<FuseSessionInfo>(&meta).ok() != Some(info) {
            return Err(NodeError::internal(format!("the fd holder's session {meta} is not the recorded one {info:?}")));
        }
        Attachment::resume_fuse(image.view.clone(), fd, info, fuse_dir, loop_dev, staging, fs).map_err(attach_err(id))
    }
}

/// The pool key of a registry blob: its digest, whatever repository or image names it.
fn blob_key(digest: &str) -> String {
    format!("oci-blob {digest}")
}

/// Opens an image's blobs for one volume through the pool: the image itself with the volume's
/// spec, a qcow2 backing file by its URL (no digest of its own; a remote image's backing file is
/// remote, a local one's local and through the allowlist). Remembers the keys it took and the
/// first refusal in the plugin's own terms (a backing file outside the allowlist is
/// PERMISSION_DENIED, not a format error).
struct PoolUrls<'a> {
    vols: &'a Volumes,
    spec: &'a VolumeSpec,
    creds: Option<&'a Credentials>,
    taken: Mutex<Vec<String>>,
    refused: Mutex<Option<NodeError>>,
}

impl PoolUrls<'_> {
    async fn open_pooled(&self, spec: &VolumeSpec) -> NodeResult<LazyImage> {
        let (key, image) = self.vols.pool_blob(spec, self.creds).await?;
        lock(&self.taken).push(key);
        Ok(image)
    }
}

#[async_trait::async_trait]
impl lazy_image_formats::BlobOpener for PoolUrls<'_> {
    async fn open(&self, url: &str) -> lazy_image_engine::Result<LazyImage> {
        let spec = match url == self.spec.url {
            true => self.spec.clone(),
            false => {
                VolumeSpec { url: url.to_string(), format: None, digest: None, manifest_url: None, prefetch: false, ..self.spec.clone() }
            }
        };
        self.open_pooled(&spec).await.map_err(|e| {
            let msg = e.to_string();
            lock(&self.refused).get_or_insert(e);
            lazy_image_engine::Error::new(lazy_image_engine::ErrorKind::InvalidInput, msg)
        })
    }
}

/// Opens a registry image's layers for one volume through the pool; remembers the keys it
/// took a reference on.
struct PoolBlobs<'a> {
    vols: &'a Volumes,
    reg: Arc<oci::Registry>,
    resolved: oci::Resolved,
    spec: &'a VolumeSpec,
    taken: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl lazy_image_formats::BlobOpener for PoolBlobs<'_> {
    async fn open(&self, digest: &str) -> lazy_image_engine::Result<LazyImage> {
        let layer = self.resolved.layer(digest)?;
        let key = blob_key(digest);
        let image = self.vols.take_pooled(&key, self.reg.open_layer(layer, self.vols.image_config(self.spec))).await?;
        lock(&self.taken).push(key);
        Ok(image)
    }
}
