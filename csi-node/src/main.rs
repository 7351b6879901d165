//! `lazy-image-csi-node`: parse flags, set up logging, run the node plugin.

use clap::Parser;

fn main() {
    let args = lazy_image_csi_node::config::Args::parse();
    lazy_image_csi_common::init_logging(&args.log_level, args.log_json);
    if let Err(e) = lazy_image_csi_node::run(args) {
        eprintln!("lazy-image-csi-node: error: {e}");
        std::process::exit(1);
    }
}
