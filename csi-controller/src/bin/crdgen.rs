//! `lazy-image-crdgen [lazyimages|nodecaches]`: prints a CRD, generated from the Rust types, as
//! YAML (what `deploy/helm/lazy-image/crds/` holds; tests keep the two equal). Default: lazyimages.

fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "lazyimages".into());
    let yaml = match which.as_str() {
        "lazyimages" => lazy_image_csi_controller::crd::crd_yaml(),
        "nodecaches" => lazy_image_csi_common::node_cache::crd_yaml(),
        other => {
            eprintln!("lazy-image-crdgen: unknown CRD {other:?} (expected lazyimages or nodecaches)");
            std::process::exit(2);
        }
    };
    match yaml {
        Ok(y) => print!("{y}"),
        Err(e) => {
            eprintln!("lazy-image-crdgen: error: {e}");
            std::process::exit(1);
        }
    }
}
