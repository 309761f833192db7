//! `router --config agent.toml`: see `router --help`.

use std::{
    io::{self, Write},
    process::ExitCode,
};

use clap::Parser;
use router::{
    agent::{self, Reload},
    cli::Cli,
    logging,
    shutdown::AgentSignals,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runs = !cli.check && !cli.print_config;
    // Caught before anything that takes time: a SIGTERM or SIGHUP while the agent starts is
    // acted on once it runs, instead of killing it.
    let signals = match runs.then(AgentSignals::catch).transpose() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("router: cannot catch signals: {e}");
            return ExitCode::FAILURE;
        }
    };
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
    let loaded = match router_config::load(cli.config.as_deref(), cli.overrides()) {
        Ok(loaded) => loaded,
        Err(e) => {
            let _ = writeln!(io::stderr(), "router: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        let _ = write!(io::stdout(), "{}", loaded.to_redacted_toml());
        return ExitCode::SUCCESS;
    }
    let config = loaded.config;
    let log_level = logging::init(&config.log_level, config.log_format);
    let Some(signals) = signals else {
        return if agent::check(&config) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    };
    let record = cli.record.clone();
    let reload = Reload {
        load: Box::new(move || {
            router_config::load(cli.config.as_deref(), cli.overrides()).map(|l| l.config)
        }),
        log_level,
    };
    match agent::run(config, record.as_deref(), signals, reload) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
