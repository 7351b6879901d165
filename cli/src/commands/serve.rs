use crate::args::ServeArgs;
use anyhow::{bail, Context, Result};

pub async fn run(a: ServeArgs) -> Result<()> {
    if !a.dir.is_dir() {
        bail!("{} is not a directory", a.dir.display());
    }
    let srv = lazy_image_serve::spawn(&a.dir, a.listen, None).await.with_context(|| format!("listening on {}", a.listen))?;
    eprintln!("lazy-image: serving {} at http://{}/ (Ctrl-C to stop)", a.dir.display(), srv.addr);
    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
    srv.shutdown();
    Ok(())
}
