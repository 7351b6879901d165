//! `lazy-image-csi-controller`: parse flags, set up logging, run the controller.

use clap::Parser;

fn main() {
    let args = lazy_image_csi_controller::config::Args::parse();
    lazy_image_csi_common::init_logging(&args.log_level, args.log_json);
    if let Err(e) = lazy_image_csi_controller::run(args) {
        eprintln!("lazy-image-csi-controller: error: {e}");
        std::process::exit(1);
    }
}
