use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use fhir_cdc::cli::{Cli, LogFormat};
use tracing_subscriber::EnvFilter;

// Mapping and encoding allocate many small, short-lived values; mimalloc serves them several
// times faster than glibc's allocator (see benches/map_encode.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        // One object a line: `timestamp`, `level`, `target` (the component), the message
        // and its fields at the top level.
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = cli.worker_threads() {
        builder.worker_threads(workers);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fhir-cdc: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(cli.run())
}
