use crate::args::WarmArgs;
use crate::units::human;
use anyhow::Result;

pub async fn run(a: WarmArgs) -> Result<()> {
    let img = super::open_image(&a.image).await?;
    let (have, total) = img.fill();
    eprintln!("lazy-image: {} ({}), {have}/{total} chunks cached", a.image.url, human(img.size()));
    let mut last = std::time::Instant::now();
    img.prefetch_all(a.parallel, |have, total| {
        if last.elapsed().as_millis() >= 500 {
            last = std::time::Instant::now();
            eprint!("\rlazy-image: {:.1}% cached", have as f64 * 100.0 / total.max(1) as f64);
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!(e.report()))?;
    let s = img.stats();
    img.close().await.map_err(|e| anyhow::anyhow!(e.report()))?;
    eprintln!("\rlazy-image: fully cached; {} fetched from the origin in {} requests", human(s.origin_bytes), s.origin_requests);
    Ok(())
}
