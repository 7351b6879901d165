//! The ublk backend: an image becomes a `/dev/ublkbN` (read-only unless its view is writable) served by this process (queue
//! handling in `queue`). This module owns the device's life: add (with a timeout), recovery of
//! a device whose server died (USER_RECOVERY: the kernel holds its I/O until a new server
//! attaches), stop and delete, and cleanup of a device nobody will recover.
//!
//! libublk's control ring is per thread, so every control command issued outside the thread
//! that created a device opens a fresh control (`UblkCtrl::new_simple`); such a control never
//! deletes its device on drop.

mod queue;
mod window;

use crate::{AttachError, AttachErrorKind};
use lazy_image_engine::View;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkError, UblkFlags};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

pub const CONTROL_PATH: &str = "/dev/ublk-control";
/// The target name the kernel and `ublk list` show for our devices.
const TARGET_NAME: &str = "lazy-image";

/// Tunables of one device. The defaults suit one image read by many pods: a single queue is
/// enough because the work happens in the engine's runtime, not on queue threads.
#[derive(Debug, Clone)]
pub struct UblkOptions {
    pub queues: u16,
    pub depth: u16,
    /// Largest request the kernel sends us (also the per-tag buffer size).
    pub max_io_bytes: u32,
    /// How long adding or recovering a device may take before it is torn down again.
    pub start_timeout: Duration,
}

impl Default for UblkOptions {
    fn default() -> Self {
        UblkOptions { queues: 1, depth: 128, max_io_bytes: 1 << 20, start_timeout: Duration::from_secs(30) }
    }
}

/// True when this kernel can give us ublk devices.
pub fn available() -> bool {
    Path::new(CONTROL_PATH).exists()
}

/// The driver's feature bits (e.g. 0x1fe on Debian's 6.12), or `None` without ublk.
pub fn driver_features() -> Option<u64> {
    if !available() {
        return None;
    }
    UblkCtrl::get_features()
}

/// What we ask of the driver: recovery after a crash (and re-issue of the requests the dead
/// server had taken); for a writable device, writes whose bytes we fetch to an address of our
/// choosing (a rewrite is copied straight into the layer, see `queue::get_data_and_write`).
/// Never anything the running driver lacks.
fn wanted_flags(features: u64, writable: bool) -> u64 {
    let mut want = sys::UBLK_F_USER_RECOVERY as u64 | sys::UBLK_F_CMD_IOCTL_ENCODE as u64;
    if features & sys::UBLK_F_USER_RECOVERY as u64 != 0 {
        want |= sys::UBLK_F_USER_RECOVERY_REISSUE as u64;
    }
    if writable {
        want |= sys::UBLK_F_NEED_GET_DATA as u64;
    }
    want & features
}

/// The one place a libublk error becomes an attach error: kind from the errno, message with it.
fn ublk_err(context: impl Into<String>, e: UblkError) -> AttachError {
    let errno = match &e {
        UblkError::UringIOError(c) | UblkError::OtherError(c) => Some(c.abs()),
        UblkError::IOError(io) => io.raw_os_error(),
        _ => None,
    };
    let kind = match errno {
        Some(libc::ENOENT) | Some(libc::ENODEV) => AttachErrorKind::NotFound,
        Some(libc::EBUSY) => AttachErrorKind::Busy,
        Some(libc::EINVAL) => AttachErrorKind::InvalidInput,
        Some(libc::EPERM) | Some(libc::EOPNOTSUPP) => AttachErrorKind::Unsupported,
        _ => AttachErrorKind::Io,
    };
    let detail = match errno {
        Some(n) => format!("{e} ({})", std::io::Error::from_raw_os_error(n)),
        None => e.to_string(),
    };
    AttachError::new(kind, format!("{}: {detail}", context.into()))
}

/// True while the kernel has device `id` (its char device exists).
pub fn exists(id: u32) -> bool {
    Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
}

/// State of a ublk device as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    Dead,
    Live,
    /// Its server is gone; I/O is held until a new one recovers it.
    Quiesced,
    /// Its server is gone and I/O fails.
    FailIo,
}

/// The device's kernel state and the pid of the server that last started it.
pub fn device_state(id: u32) -> Result<(DeviceState, i32), AttachError> {
    if !exists(id) {
        return Err(AttachError::new(AttachErrorKind::NotFound, format!("ublk device {id} does not exist")));
    }
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(|e| ublk_err(format!("ublk device {id}"), e))?;
    let info = ctrl.dev_info();
    let state = match info.state as u32 {
        sys::UBLK_S_DEV_LIVE => DeviceState::Live,
        sys::UBLK_S_DEV_QUIESCED => DeviceState::Quiesced,
        sys::UBLK_S_DEV_FAIL_IO => DeviceState::FailIo,
        _ => DeviceState::Dead,
    };
    Ok((state, info.ublksrv_pid))
}

/// True when device `id` was created by lazy-image (libublk records the target name in the
/// server's JSON under /run/ublksrvd); other software's devices are never touched.
pub fn is_ours(id: u32) -> bool {
    exists(id) && UblkCtrl::new_simple(id as i32).and_then(|c| c.get_target_type_from_json()).is_ok_and(|t| t == TARGET_NAME)
}

/// Ids of every ublk device on this host.
pub fn list_devices() -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir("/sys/class/ublk-char")
        .map(|rd| {
            rd.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("ublkc")).and_then(|n| n.parse().ok())).collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    ids
}

pub fn block_device_path(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{id}"))
}

/// Stops and deletes a device whose server is gone (or that we are done with). Stopping first
/// fails any I/O the kernel was holding, so nothing waits forever. Unmount before calling this.
pub fn delete_device(id: u32) -> Result<(), AttachError> {
    if !exists(id) {
        return Ok(());
    }
    let ctrl = match UblkCtrl::new_simple(id as i32) {
        Ok(c) => c,
        Err(e) => {
            let err = ublk_err(format!("ublk device {id}"), e);
            return if err.kind == AttachErrorKind::NotFound { Ok(()) } else { Err(err) };
        }
    };
    let _ = ctrl.kill_dev();
    match ctrl.del_dev() {
        Ok(_) => Ok(()),
        Err(e) => {
            let err = ublk_err(format!("deleting ublk device {id}"), e);
            if err.kind == AttachErrorKind::NotFound {
                Ok(())
            } else {
                Err(err)
            }
        }
    }
}

/// Device parameters for an image: read-only (or, over a writable layer, writable with a volatile
/// cache, so filesystems flush, and discard), the given logical block size, the last block
/// zero-padded when the image is not whole blocks.
fn set_params(dev: &mut UblkDev, image_size: u64, lbs_shift: u8, chunk_size: u64, max_io_bytes: u32, writable: bool) {
    let dev_size = image_size.div_ceil(1 << lbs_shift) << lbs_shift;
    dev.tgt.dev_size = dev_size;
    // Room on the ring for the doorbell read beside one command per tag.
    dev.tgt.sq_depth = dev.dev_info.queue_depth + 8;
    dev.tgt.cq_depth = dev.dev_info.queue_depth * 2 + 8;
    let block = lazy_image_engine::cow::BLOCK as u32;
    dev.tgt.params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | if writable { sys::UBLK_PARAM_TYPE_DISCARD } else { 0 },
        discard: sys::ublk_param_discard {
            discard_granularity: if writable { block } else { 0 },
            // Both carry no data: one request may cover much more than a read or write.
            max_discard_sectors: if writable { ZEROES_MAX_SECTORS } else { 0 },
            max_write_zeroes_sectors: if writable { ZEROES_MAX_SECTORS } else { 0 },
            max_discard_segments: if writable { 1 } else { 0 },
            ..Default::default()
        },
        basic: sys::ublk_param_basic {
            attrs: if writable { sys::UBLK_ATTR_VOLATILE_CACHE } else { sys::UBLK_ATTR_READ_ONLY },
            logical_bs_shift: lbs_shift,
            physical_bs_shift: 12,
            io_opt_shift: chunk_size.trailing_zeros().min(20) as u8,
            io_min_shift: lbs_shift,
            max_sectors: max_io_bytes >> 9,
            dev_sectors: dev_size >> 9,
            ..Default::default()
        },
        ..Default::default()
    };
}

/// Largest discard or write-zeroes request (1 GiB).
const ZEROES_MAX_SECTORS: u32 = (1 << 30) >> 9;

enum Startup {
    /// The kernel gave the device this id (sent before START, so a timeout can still kill it).
    Added(u32),
    Started,
    Failed(AttachError),
}

/// A running ublk device served by this process. Dropping the handle leaves the device served
/// until the process exits; after that the kernel holds its I/O for a successor (`recover`).
pub struct UblkDevice {
    id: u32,
    delete_on_stop: Arc<AtomicBool>,
    server: Option<std::thread::JoinHandle<()>>,
}

impl UblkDevice {
    /// Adds a new device for `image` (read-only unless the view is writable), with logical blocks of `block_size` (512 or
    /// 4096: no larger than the filesystem's blocks), and starts serving it.
    pub fn create(image: View, block_size: u32, opts: &UblkOptions) -> Result<Self, AttachError> {
        Self::start(image, opts, Some(block_size), None)
    }

    /// Takes over device `id`, left quiesced by a server that died, and resumes serving it; the
    /// reads the kernel held meanwhile are re-issued to us.
    pub fn recover(image: View, id: u32, opts: &UblkOptions) -> Result<Self, AttachError> {
        // The kernel keeps the parameters the device was created with.
        Self::start(image, opts, None, Some(id))
    }

    fn start(image: View, opts: &UblkOptions, block_size: Option<u32>, recover: Option<u32>) -> Result<Self, AttachError> {
        let lbs_shift: u8 = if block_size == Some(4096) { 12 } else { 9 };
        let features = driver_features().ok_or_else(|| {
            AttachError::new(AttachErrorKind::Unsupported, format!("{CONTROL_PATH} is missing: load the ublk_drv module"))
        })?;
        if let Some(id) = recover {
            let (state, _) = device_state(id)?;
            if !matches!(state, DeviceState::Quiesced | DeviceState::FailIo) {
                return Err(AttachError::new(
                    AttachErrorKind::InvalidInput,
                    format!("ublk device {id} is {state:?}, not waiting for recovery"),
                ));
            }
        }
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| AttachError::new(AttachErrorKind::InvalidInput, "ublk devices must be created inside the engine's runtime"))?;
        let (tx, rx) = mpsc::channel::<Startup>();
        let delete_on_stop = Arc::new(AtomicBool::new(false));
        let delete = delete_on_stop.clone();
        let opts2 = opts.clone();
        let server = std::thread::Builder::new()
            .name("ublk-ctrl".into())
            .spawn(move || run_server(image, rt, opts2, DeviceSpec { features, lbs_shift, recover }, tx, delete))
            .map_err(|e| AttachError::os("starting the ublk control thread", e))?;

        let deadline = std::time::Instant::now() + opts.start_timeout;
        let mut id = recover;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(Startup::Added(n)) => id = Some(n),
                Ok(Startup::Started) => break,
                Ok(Startup::Failed(e)) => {
                    let _ = server.join();
                    return Err(e);
                }
                Err(_) => {
                    // Timed out (or the thread died): never leave a half-started device behind.
                    if let Some(n) = id {
                        delete_on_stop.store(true, Ordering::SeqCst);
                        let _ = delete_device(n);
                    }
                    let _ = server.join();
                    return Err(AttachError::new(
                        AttachErrorKind::Io,
                        format!("the ublk device did not start within {:?}", opts.start_timeout),
                    ));
                }
            }
        }
        let id = id.ok_or_else(|| AttachError::new(AttachErrorKind::Io, "ublk device started without an id"))?;
        let dev = UblkDevice { id, delete_on_stop, server: Some(server) };
        dev.tune_readahead();
        Ok(dev)
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn path(&self) -> PathBuf {
        block_device_path(self.id)
    }

    /// The block layer's readahead decides how much a sequential reader asks for at once; the
    /// default 128 KiB leaves the engine's parallel fetches idle.
    fn tune_readahead(&self) {
        let p = format!("/sys/block/ublkb{}/queue/read_ahead_kb", self.id);
        if let Err(e) = std::fs::write(&p, crate::READ_AHEAD_KB) {
            tracing::debug!(error = %e, "cannot raise {p}");
        }
    }

    /// Stops serving and deletes the device. Unmount it first. (To leave a device for a
    /// successor instead, just exit: the kernel holds its I/O until `recover`.)
    pub fn delete(mut self) -> Result<(), AttachError> {
        self.delete_on_stop.store(true, Ordering::SeqCst);
        let ctrl = UblkCtrl::new_simple(self.id as i32).map_err(|e| ublk_err(format!("ublk device {}", self.id), e))?;
        ctrl.kill_dev().map_err(|e| ublk_err(format!("stopping ublk device {}", self.id), e))?;
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
        delete_device(self.id)
    }
}

/// The device the control thread adds (or recovers), as the driver and the image shape it.
struct DeviceSpec {
    /// The driver's feature flags.
    features: u64,
    lbs_shift: u8,
    /// The id of a quiesced device to take over instead of adding one.
    recover: Option<u32>,
}

fn run_server(
    image: View,
    rt: tokio::runtime::Handle,
    opts: UblkOptions,
    spec: DeviceSpec,
    tx: mpsc::Sender<Startup>,
    delete_on_stop: Arc<AtomicBool>,
) {
    let DeviceSpec { features, lbs_shift, recover } = spec;
    let fail = |e: AttachError| {
        let _ = tx.send(Startup::Failed(e));
    };
    let builder = UblkCtrlBuilder::default()
        .name(TARGET_NAME)
        .id(recover.map_or(-1, |i| i as i32))
        .nr_queues(opts.queues.max(1))
        .depth(opts.depth.max(1))
        .io_buf_bytes(opts.max_io_bytes)
        .ctrl_flags(wanted_flags(features, image.writable()))
        .dev_flags(if recover.is_some() { UblkFlags::UBLK_DEV_F_RECOVER_DEV } else { UblkFlags::UBLK_DEV_F_ADD_DEV });
    let ctrl = match builder.build() {
        Ok(c) => c,
        Err(e) => return fail(ublk_err("adding a ublk device", e)),
    };
    let id = ctrl.dev_info().dev_id;
    let _ = tx.send(Startup::Added(id));
    if recover.is_some() {
        if let Err(e) = ctrl.start_user_recover() {
            return fail(ublk_err(format!("starting recovery of ublk device {id}"), e));
        }
    }
    let (size, chunk, writable) = (image.size(), image.chunk_size(), image.writable());
    let max_io = opts.max_io_bytes;
    let ctx = Arc::new(queue::QueueContext { image, rt });
    let started_tx = tx.clone();
    let res = ctrl.run_target(
        move |dev: &mut UblkDev| {
            set_params(dev, size, lbs_shift, chunk, max_io, writable);
            Ok(())
        },
        move |qid, dev: &UblkDev| queue::serve_queue(qid, dev, &ctx),
        move |_ctrl: &UblkCtrl| {
            let _ = started_tx.send(Startup::Started);
        },
    );
    if let Err(e) = res {
        // Returning drops `ctrl`: a device we added is deleted with it; one we were recovering
        // stays quiesced for another attempt.
        return fail(ublk_err(format!("starting ublk device {id}"), e));
    }
    // Queues are gone: the device was stopped (delete requested) or failed to start.
    if delete_on_stop.load(Ordering::SeqCst) {
        let _ = ctrl.del_dev();
    } else {
        // Leave it for a successor to recover; dropping an adding control would delete it.
        ctrl.disown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_only_for_what_the_driver_has() {
        // Debian 6.12: recovery, reissue, ioctl encoding and more, no zero copy.
        assert_eq!(wanted_flags(0x1fe, false), 0x58);
        // A writable device fetches write bytes on request there.
        assert_eq!(wanted_flags(0x1fe, true), 0x5c);
        // An old driver without recovery gets neither recovery flag.
        assert_eq!(wanted_flags(0x4, false), 0);
        assert_eq!(wanted_flags(0x4, true), 0x4);
        assert_eq!(wanted_flags(0, true), 0);
    }
}
