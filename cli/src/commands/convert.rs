//! `lazy-image convert`: a flat image into an OverlayBD layer, written beside the output and
//! renamed into place once whole.

use crate::args::ConvertArgs;
use crate::units::human;
use anyhow::{Context, Result};
use lazy_image_formats::overlaybd::{lsmt, zfile};
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

pub fn run(a: ConvertArgs) -> Result<()> {
    let block_size = match a.compress {
        Some(_) => zfile::check_write_block_size(a.block_size).map_err(|m| anyhow::anyhow!("--block-size: {m}"))?,
        None => 0,
    };
    let mut image = BufReader::with_capacity(1 << 20, File::open(&a.image).with_context(|| format!("opening {}", a.image.display()))?);
    let mut base = match &a.base {
        Some(b) => Some(BufReader::with_capacity(1 << 20, File::open(b).with_context(|| format!("opening {}", b.display()))?)),
        None => None,
    };
    let part = |suffix: &str| -> PathBuf {
        let name = a.output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "layer".into());
        a.output.with_file_name(format!(".{name}.{suffix}"))
    };
    let (lsmt_path, zpath) = (part("lsmt-part"), part("zfile-part"));
    let _parts = Parts(vec![lsmt_path.clone(), zpath.clone()]);
    let mut out = BufWriter::new(File::create(&lsmt_path).with_context(|| format!("creating {}", lsmt_path.display()))?);
    let w = lsmt::write_layer(&mut image, base.as_mut().map(|b| b as &mut dyn std::io::Read), &mut out)
        .with_context(|| format!("writing the layer of {}", a.image.display()))?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    let (done, bytes) = match a.compress {
        None => (&lsmt_path, w.bytes),
        Some(algo) => (&zpath, compress(&lsmt_path, &zpath, algo, block_size)?),
    };
    std::fs::rename(done, &a.output)?;
    let parent = if w.layer.parent_uuid.is_empty() { String::new() } else { format!(", on layer {}", w.layer.parent_uuid) };
    println!(
        "wrote {}: OverlayBD layer {}{parent}, {} device, {} extents, {}{}",
        a.output.display(),
        w.layer.uuid,
        human(w.layer.virtual_size),
        w.extents,
        human(bytes),
        a.compress.map(|c| format!(" ({c:?} ZFile)")).unwrap_or_default()
    );
    Ok(())
}

/// The part files of a conversion: gone once it ends, whichever way (the finished one has been
/// renamed into place by then).
struct Parts(Vec<PathBuf>);

impl Drop for Parts {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn compress(src: &Path, dst: &Path, algo: zfile::Algo, block_size: u32) -> Result<u64> {
    let mut input = BufReader::with_capacity(1 << 20, File::open(src)?);
    let mut out = BufWriter::new(File::create(dst).with_context(|| format!("creating {}", dst.display()))?);
    let n = zfile::write(&mut input, &mut out, zfile::WriteOptions { algo, block_size, verify: true })
        .with_context(|| format!("compressing {}", src.display()))?;
    out.flush()?;
    let f = out.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    Ok(n)
}
