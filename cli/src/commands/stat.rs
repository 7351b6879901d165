use crate::args::StatArgs;
use crate::units::human;
use anyhow::Result;
use lazy_image_engine::cache::list_images;

pub fn run(a: StatArgs) -> Result<()> {
    let images = list_images(&a.cache_dir).map_err(|e| anyhow::anyhow!(e.report()))?;
    if a.json {
        let v: Vec<_> = images
            .iter()
            .map(|i| {
                serde_json::json!({
                    "key": i.key, "url": i.header.url, "size": i.header.info.size,
                    "chunk_size": i.header.chunk_size, "fill": i.fill_ratio(), "disk_bytes": i.disk_bytes,
                    "stats": i.stats,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if images.is_empty() {
        println!("no cached images in {}", a.cache_dir.display());
        return Ok(());
    }
    println!("{:<8} {:>10} {:>7} {:>10} {:>9} {:>9} {:>12}  URL", "KEY", "SIZE", "FILL", "ON DISK", "HITS", "MISSES", "FROM ORIGIN");
    for i in images {
        let s = i.stats.clone().unwrap_or_default();
        println!(
            "{:<8} {:>10} {:>6.1}% {:>10} {:>9} {:>9} {:>12}  {}",
            &i.key[..8.min(i.key.len())],
            human(i.header.info.size),
            i.fill_ratio() * 100.0,
            human(i.disk_bytes),
            s.chunk_hits,
            s.chunk_misses,
            human(s.origin_bytes),
            i.header.url
        );
    }
    Ok(())
}
