//! `lazy-image-csi-node`: parse flags, set up logging, run the node plugin.

use clap::Parser;

fn main() {
    let args = lazy_image_csi_node::config::Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("LAZY_IMAGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log_level));
    // Colours only on a terminal: in a pod, stderr is the container log.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if args.log_json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    if let Err(e) = lazy_image_csi_node::run(args) {
        eprintln!("lazy-image-csi-node: error: {e}");
        std::process::exit(1);
    }
}
