//! `lazy-image`: parse arguments, set up logging, run the command, print errors as one sentence.

mod args;
mod commands;
mod run_state;
mod units;

use clap::Parser;

fn main() {
    let cli = args::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("LAZY_IMAGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(if cli.verbose { "debug" } else { "warn" }));
    // Colours only on a terminal: a daemon's stderr is usually a log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    if let Err(e) = commands::run(cli) {
        eprintln!("lazy-image: error: {e:#}");
        std::process::exit(1);
    }
}
