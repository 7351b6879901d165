use crate::args::ManifestCommand;
use crate::units::human;
use anyhow::{Context, Result};
use lazy_image_engine::{Manifest, DEFAULT_CHUNK_SIZE};
use std::io::Write;

pub fn run(cmd: ManifestCommand) -> Result<()> {
    let ManifestCommand::Build { image, output, chunk_size } = cmd;
    let f = std::fs::File::open(&image).with_context(|| format!("opening {}", image.display()))?;
    let total = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut last = std::time::Instant::now();
    let m = Manifest::build(std::io::BufReader::with_capacity(1 << 20, f), chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE), |done| {
        if last.elapsed().as_millis() >= 500 {
            last = std::time::Instant::now();
            eprint!("\rlazy-image: hashing {} of {}", human(done), human(total));
        }
    })
    .map_err(|e| anyhow::anyhow!(e.report()))?;
    let out = output.unwrap_or_else(|| {
        let mut p = image.clone().into_os_string();
        p.push(".manifest");
        p.into()
    });
    std::fs::write(&out, m.to_bytes()).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("\rlazy-image: wrote {} ({} chunks of {})", out.display(), m.chunks.len(), human(m.chunk_size));
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", m.digest())?;
    Ok(())
}
