//! `lazy-image convert`: a flat image into an OverlayBD layer, written beside the output and
//! renamed into place once whole.

use crate::args::ConvertArgs;
use crate::units::human;
use anyhow::{bail, Context, Result};
use lazy_image_formats::overlaybd::{lsmt, zfile};
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

pub fn run(a: ConvertArgs) -> Result<()> {
    if a.compress.is_some() {
        let ok = u32::try_from(a.block_size).is_ok_and(|b| b.is_power_of_two() && zfile::WRITE_BLOCK_SIZES.contains(&b));
        if !ok {
            bail!(
                "--block-size {} is not a power of two from 4K to 32K (OverlayBD's reader refuses blocks that compress to more than 64 KiB, as incompressible 64 KiB blocks do)",
                a.block_size
            );
        }
    }
    let mut image = BufReader::with_capacity(1 << 20, File::open(&a.image).with_context(|| format!("opening {}", a.image.display()))?);
    let mut base = match &a.base {
        Some(b) => Some(BufReader::with_capacity(1 << 20, File::open(b).with_context(|| format!("opening {}", b.display()))?)),
        None => None,
    };
    let part = |suffix: &str| -> PathBuf {
        let name = a.output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "layer".into());
        a.output.with_file_name(format!(".{name}.{suffix}"))
    };
    let lsmt_path = part("lsmt-part");
    let written = (|| -> Result<lsmt::WrittenLayer> {
        let mut out = BufWriter::new(File::create(&lsmt_path).with_context(|| format!("creating {}", lsmt_path.display()))?);
        let w = lsmt::write_layer(&mut image, base.as_mut().map(|b| b as &mut dyn std::io::Read), &mut out)
            .with_context(|| format!("writing the layer of {}", a.image.display()))?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(w)
    })();
    let result = written.and_then(|w| {
        let final_bytes = match a.compress {
            None => {
                std::fs::rename(&lsmt_path, &a.output)?;
                w.bytes
            }
            Some(algo) => {
                let zpath = part("zfile-part");
                let n = compress(&lsmt_path, &zpath, algo, a.block_size as u32);
                let _ = std::fs::remove_file(&lsmt_path);
                let n = n.inspect_err(|_| {
                    let _ = std::fs::remove_file(&zpath);
                })?;
                std::fs::rename(&zpath, &a.output)?;
                n
            }
        };
        Ok((w, final_bytes))
    });
    let (w, bytes) = result.inspect_err(|_| {
        let _ = std::fs::remove_file(&lsmt_path);
    })?;
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
