//! `lazy-image-crdgen`: prints the LazyImage CRD, generated from the Rust types, as YAML
//! (what `deploy/helm/lazy-image/crds/` holds; a test keeps the two equal).

fn main() {
    match lazy_image_csi_controller::crd::crd_yaml() {
        Ok(y) => print!("{y}"),
        Err(e) => {
            eprintln!("lazy-image-crdgen: error: {e}");
            std::process::exit(1);
        }
    }
}
