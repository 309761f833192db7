//! `router --config agent.toml`: see `router --help`.

use std::process::ExitCode;

use clap::Parser;
use router::{agent, cli::Cli, logging};

fn main() -> ExitCode {
    // One malloc arena per thread would keep each thread's freed memory resident; two are
    // plenty for an agent whose threads mostly sleep.
    // Large blocks (an unwind table being built, a batch being encoded) come from their own
    // mappings and go back to the kernel when freed: a fixed threshold keeps glibc from
    // raising it after the first large free and keeping such blocks in the heap.
    // SAFETY: mallopt has no preconditions; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
    let cli = Cli::parse();
    let loaded = match router_config::load(cli.config.as_deref(), cli.overrides()) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("router: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        print!("{}", loaded.to_redacted_toml());
        return ExitCode::SUCCESS;
    }
    let config = &loaded.config;
    logging::init(&config.log_level, config.log_format);
    if cli.check {
        return if agent::check(config) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    match agent::run(config, cli.record.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
