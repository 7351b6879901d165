//! `mount` runs in the foreground: open the image, attach it (FUSE + loop), mount, record the
//! mount for `umount`, then serve until SIGINT/SIGTERM and tear down in order.

use crate::args::{MountArgs, UmountArgs};
use crate::run_state::{self, MountRecord};
use crate::units::human;
use anyhow::{bail, Context, Result};
use lazy_image_attach::{Attachment, FsType, LoopDevice};
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

pub async fn mount(a: MountArgs) -> Result<()> {
    let mountpoint = a
        .mountpoint
        .canonicalize()
        .with_context(|| format!("mount point {}", a.mountpoint.display()))?;
    let fs: Option<FsType> = match a.format.as_str() {
        "auto" => None,
        f => Some(f.parse()?),
    };
    if let Some(rec) = run_state::read(&a.run_dir, &mountpoint)? {
        if run_state::pid_alive(rec.pid) {
            bail!("{} is already mounted by lazy-image (pid {})", mountpoint.display(), rec.pid);
        }
    }
    eprintln!("lazy-image: probing {}", a.image.url);
    let img = super::open_image(&a.image).await?;
    let (have, total) = img.fill();
    eprintln!(
        "lazy-image: image is {}, cache {} ({:.1}% present)",
        human(img.size()),
        img.cache_dir().display(),
        have as f64 * 100.0 / total.max(1) as f64
    );
    let work = img.cache_dir();
    let att = Attachment::attach(img.clone(), &work, &mountpoint, fs).await?;
    let rec = MountRecord {
        pid: std::process::id(),
        url: a.image.url.clone(),
        mountpoint: mountpoint.clone(),
        loop_device: att.loop_dev.path().to_path_buf(),
        fuse_dir: work.join("fuse"),
        cache_dir: work.clone(),
    };
    run_state::write(&a.run_dir, &rec)?;
    eprintln!(
        "lazy-image: mounted {} read-only at {} via FUSE+loop ({}). Ctrl-C or `lazy-image umount {}` detaches.",
        att.fs.name(),
        mountpoint.display(),
        att.loop_dev.path().display(),
        mountpoint.display()
    );

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
    att.detach().await?;
    let s = img.stats();
    img.close().await.map_err(|e| anyhow::anyhow!(e.report()))?;
    run_state::remove(&a.run_dir, &mountpoint);
    eprintln!(
        "lazy-image: unmounted {}; {} read, {} fetched from the origin in {} requests",
        mountpoint.display(),
        human(s.bytes_read),
        human(s.origin_bytes),
        s.origin_requests
    );
    Ok(())
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
    // The daemon is gone without cleaning up (killed): undo what it left, in order.
    eprintln!("lazy-image: daemon pid {} is gone; cleaning up after it", rec.pid);
    lazy_image_attach::unmount(&mountpoint)?;
    let _ = LoopDevice::from_path(&rec.loop_device).detach();
    lazy_image_attach::unmount(&rec.fuse_dir)?;
    run_state::remove(&a.run_dir, &mountpoint);
    eprintln!("lazy-image: unmounted {}", mountpoint.display());
    Ok(())
}
