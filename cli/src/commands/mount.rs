//! `mount` runs in the foreground: open the image, attach it (ublk or FUSE + loop), mount, record
//! the mount for `umount`, then serve until SIGINT/SIGTERM and tear down in order. Run again
//! for a mount point whose ublk daemon died, it takes the device over instead (the mount and
//! the readers blocked on it survive); likewise a loop device on the complete cache file, which
//! went on serving without it. `umount` and `cleanup` undo what dead daemons left.

use crate::args::{CleanupArgs, MountArgs, UblkArgs, UmountArgs};
use crate::run_state::{self, MountRecord};
use crate::units::human;
use anyhow::{bail, Context, Result};
use lazy_image_attach::ublk::{self, DeviceState};
use lazy_image_attach::{Attachment, Backend, DeviceRecord, FsType, Takeover, UblkOptions};
use lazy_image_engine::{CowView, View};
use std::path::Path;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

pub fn ublk_options(a: &UblkArgs) -> UblkOptions {
    UblkOptions { queues: a.ublk_queues, depth: a.ublk_depth, ..UblkOptions::default() }
}

pub async fn mount(a: MountArgs, backend: Backend) -> Result<()> {
    let mountpoint = a.mountpoint.canonicalize().with_context(|| format!("mount point {}", a.mountpoint.display()))?;
    let fs: Option<FsType> = match a.format.as_str() {
        "auto" => None,
        f => Some(f.parse()?),
    };
    let opts = ublk_options(&a.ublk);
    let mut takeover = None;
    let layer_dir = run_state::layer_dir(&a.run_dir, &mountpoint);
    if let Some(rec) = run_state::read(&a.run_dir, &mountpoint)? {
        if run_state::pid_alive(rec.pid) {
            bail!("{} is already mounted by lazy-image (pid {})", mountpoint.display(), rec.pid);
        }
        if rec.layer.is_some() != a.writable {
            bail!(
                "{} was mounted {} by a daemon that died; take it over the same way, or run `lazy-image umount {}` first",
                mountpoint.display(),
                if a.writable { "read-only" } else { "with --writable" },
                mountpoint.display()
            );
        }
        match recoverable(&rec, &mountpoint, backend)? {
            Some(t) => takeover = Some((t, rec.fs)),
            None => bail!(
                "{} is left over from a lazy-image daemon that died (pid {}); run `lazy-image umount {}` first",
                mountpoint.display(),
                rec.pid,
                mountpoint.display()
            ),
        }
    }
    eprintln!("lazy-image: probing {}", a.image.url);
    let (img, view) = super::open_device(&a.image, &a.lowers).await?;
    let view = if a.writable {
        if takeover.is_none() {
            // A fresh mount starts from the image: a layer left by an earlier one is not its.
            remove_layer(&layer_dir)?;
        }
        let limit = a.writable_size.unwrap_or(view.size());
        CowView::open(view, &layer_dir, limit).map_err(|e| anyhow::anyhow!(e.report()))? as View
    } else {
        view
    };
    let (have, total) = img.fill();
    // A qcow2 chain or layer stack reads other blobs too: the fill is the top blob's.
    let whose = if view.size() == img.size() && a.lowers.is_empty() { "" } else { " of the top blob" };
    eprintln!(
        "lazy-image: image is {}, cache {} ({:.1}%{whose} present)",
        human(view.size()),
        img.cache_dir().display(),
        have as f64 * 100.0 / total.max(1) as f64
    );
    let work = img.cache_dir();
    let att = match takeover {
        Some((Takeover::Ublk(id), fs)) => {
            let att = Attachment::recover_ublk(view.clone(), id, &mountpoint, fs, &opts).await?;
            eprintln!("lazy-image: took over /dev/ublkb{id} (its daemon had died); {} stays mounted", mountpoint.display());
            att
        }
        Some((Takeover::Loop(dev), fs)) => {
            let att = Attachment::adopt_direct_loop(&*view, &dev, &mountpoint, fs).with_context(|| {
                format!(
                    "{} is left over from a daemon that died; run `lazy-image umount {}` first",
                    mountpoint.display(),
                    mountpoint.display()
                )
            })?;
            eprintln!(
                "lazy-image: adopted {} (reads the complete cache; its daemon had died); {} stays mounted",
                dev.display(),
                mountpoint.display()
            );
            att
        }
        Some((Takeover::FuseSession { .. } | Takeover::None, _)) | None => {
            eprintln!(
                "lazy-image: using the {} backend{}",
                backend.name(),
                if backend == Backend::Fuse { " (no /dev/ublk-control, or --backend fuse)" } else { "" }
            );
            let att = Attachment::attach(view.clone(), &work, &mountpoint, fs, backend, &opts, false).await;
            let att = att.inspect_err(|_| {
                if a.writable {
                    let _ = remove_layer(&layer_dir);
                }
            })?;
            if att.is_direct() {
                eprintln!("lazy-image: the image is complete in the cache: the loop device reads the cache file directly");
            }
            att
        }
    };
    let device = DeviceRecord::of(&att, None);
    let rec = MountRecord {
        pid: std::process::id(),
        url: a.image.url.clone(),
        mountpoint: mountpoint.clone(),
        fs: att.fs,
        cache_dir: work.clone(),
        device,
        layer: a.writable.then(|| layer_dir.clone()),
    };
    run_state::write(&a.run_dir, &rec)?;
    let via = match att.fuse_io_uring() {
        Some(true) => " (FUSE over io_uring)",
        Some(false) => " (FUSE over /dev/fuse)",
        None => "",
    };
    let how = if a.writable { "read-write (changes go to a layer dropped at unmount)" } else { "read-only" };
    eprintln!(
        "lazy-image: mounted {} {how} at {} from {}{via}. Ctrl-C or `lazy-image umount {}` detaches.",
        att.fs.name(),
        mountpoint.display(),
        att.device_path().display(),
        mountpoint.display()
    );

    let filler = (a.prefetch && img.complete_data_file().is_none()).then(|| {
        let img = img.clone();
        tokio::spawn(async move {
            let t = std::time::Instant::now();
            let resume = lazy_image_engine::FillResume::default();
            let paused = |e: &lazy_image_engine::Error, pause: std::time::Duration| {
                eprintln!("lazy-image: background prefetch paused: {}; resuming in {} s", e.report(), pause.as_secs())
            };
            match img.fill_until_complete(&resume, paused).await {
                Ok(()) => eprintln!(
                    "lazy-image: the whole image is cached now ({:.1} s); its next mount reads the cache file directly",
                    t.elapsed().as_secs_f64()
                ),
                Err(e) => eprintln!("lazy-image: background prefetch stopped: {}", e.report()),
            }
        })
    });
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        // Never pull the device from under a busy filesystem: report and keep serving.
        match lazy_image_attach::unmount(&mountpoint) {
            Ok(()) => break,
            Err(e) => eprintln!("lazy-image: cannot unmount yet ({e}); still serving, signal again to retry"),
        }
    }
    if let Some(f) = filler {
        f.abort();
    }
    att.detach().await?;
    let s = view.stats();
    view.close().await.map_err(|e| anyhow::anyhow!(e.report()))?;
    drop(view);
    drop(img);
    if a.writable {
        remove_layer(&layer_dir)?;
    }
    run_state::remove(&a.run_dir, &mountpoint);
    eprintln!(
        "lazy-image: stopped serving {}; {} read, {} fetched from the origin in {} requests",
        mountpoint.display(),
        human(s.bytes_read),
        human(s.origin_bytes),
        s.origin_requests
    );
    Ok(())
}

/// What a dead daemon left mounted that a new daemon of `backend` can take over: a ublk device
/// the kernel holds, or a loop device on the complete cache file.
fn recoverable(rec: &MountRecord, mountpoint: &Path, backend: Backend) -> Result<Option<Takeover>> {
    let t = rec.device.takeover(mountpoint, Duration::from_secs(5))?;
    Ok(match (&t, backend) {
        (Takeover::Ublk(_), Backend::Ublk) | (Takeover::Loop(_), Backend::Fuse) => Some(t),
        _ => None,
    })
}

pub async fn umount(a: UmountArgs) -> Result<()> {
    let mountpoint = a.mountpoint.canonicalize().unwrap_or_else(|_| a.mountpoint.clone());
    let Some(rec) = run_state::read(&a.run_dir, &mountpoint)? else {
        bail!("{} was not mounted by lazy-image (no record under {})", mountpoint.display(), a.run_dir.display());
    };
    if run_state::pid_alive(rec.pid) {
        // SAFETY: sending SIGTERM to a pid we recorded; kill has no memory-safety preconditions.
        unsafe { libc::kill(rec.pid as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(a.timeout_secs);
        while run_state::pid_alive(rec.pid) {
            if std::time::Instant::now() > deadline {
                bail!("the daemon (pid {}) did not finish within {} s; is {} busy?", rec.pid, a.timeout_secs, mountpoint.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if run_state::read(&a.run_dir, &mountpoint)?.is_none() {
            eprintln!("lazy-image: unmounted {}", mountpoint.display());
            return Ok(());
        }
    }
    eprintln!("lazy-image: daemon pid {} is gone; cleaning up after it", rec.pid);
    tokio::task::spawn_blocking(move || clean_up_after(&rec)).await.context("cleanup task")??;
    run_state::remove(&a.run_dir, &mountpoint);
    eprintln!("lazy-image: unmounted {}", mountpoint.display());
    Ok(())
}

/// Undoes, in order, what a daemon that died left: the mount, then its device, then its
/// writable layer.
fn clean_up_after(rec: &MountRecord) -> Result<()> {
    rec.device.teardown(&rec.mountpoint)?;
    if let Some(dir) = &rec.layer {
        remove_layer(dir)?;
    }
    Ok(())
}

fn remove_layer(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing the writable layer {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// `lazy-image cleanup`: every mount whose daemon died, then ublk devices nobody serves or mounts.
pub async fn cleanup(a: CleanupArgs) -> Result<()> {
    tokio::task::spawn_blocking(move || -> Result<()> {
        let mut cleaned = 0;
        for rec in run_state::all(&a.run_dir) {
            if run_state::pid_alive(rec.pid) {
                continue;
            }
            clean_up_after(&rec).with_context(|| format!("cleaning up {}", rec.mountpoint.display()))?;
            run_state::remove(&a.run_dir, &rec.mountpoint);
            eprintln!("lazy-image: cleaned up {} (daemon pid {} was gone)", rec.mountpoint.display(), rec.pid);
            cleaned += 1;
        }
        if ublk::available() {
            for id in ublk::list_devices() {
                if !ublk::is_ours(id) {
                    continue;
                }
                let Ok((state, pid)) = ublk::device_state(id) else { continue };
                let served = state == DeviceState::Live && pid > 0 && run_state::pid_alive(pid as u32);
                let mounted = !lazy_image_attach::mount_points_of(&ublk::block_device_path(id))?.is_empty();
                if served || mounted {
                    continue;
                }
                ublk::delete_device(id)?;
                eprintln!("lazy-image: deleted /dev/ublkb{id} ({state:?}, no server, not mounted)");
                cleaned += 1;
            }
        }
        eprintln!("lazy-image: cleanup done, {cleaned} removed");
        Ok(())
    })
    .await
    .context("cleanup task")?
}
