//! `lazy-image-fd-holder`: keeps the `/dev/fuse` descriptors of FUSE+loop volumes open while
//! the node plugin restarts (see `fd_holder`). The plugin starts one itself when none answers;
//! a deployment may run it as a container of its own so that it outlives the plugin's.

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "lazy-image-fd-holder", version, about = "Holds FUSE session descriptors across lazy-image node plugin restarts")]
struct Args {
    /// The Unix socket the plugin talks to (the plugin's --fd-holder-socket).
    #[arg(long, default_value = "/var/lib/lazy-image/node/fd-holder.sock")]
    socket: PathBuf,
    /// Exit after holding nothing for 10 s (how the plugin starts it).
    #[arg(long)]
    exit_when_idle: bool,
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() {
    let args = Args::parse();
    lazy_image_csi_common::init_logging(&args.log_level, false);
    let idle = args.exit_when_idle.then_some(std::time::Duration::from_secs(10));
    if let Err(e) = lazy_image_csi_node::fd_holder::serve(&args.socket, idle) {
        eprintln!("lazy-image-fd-holder: error: {e}");
        std::process::exit(1);
    }
}
