//! The `password-recovery` binary: configuration, logging, then the application until a stop
//! signal. A configuration error is one line on stderr and exit code 2.

use std::process::ExitCode;

use password_recovery::app::{AppError, Application};
use password_recovery::config::{Command, Config};
use password_recovery::telemetry;

/// jemalloc: fewer instructions per allocation than glibc's malloc, and it gives freed memory
/// back by itself (see [`MALLOC_CONF`]). C code (aws-lc) keeps glibc's, which the memory
/// module trims.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts: a background thread purges freed pages over
/// about a second (`dirty_decay_ms`), straight back to the system, so resident memory falls
/// back near idle after a burst without waiting for the next allocation.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Option<&'static std::ffi::c_char> =
    Some(unsafe { &*c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr() });

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(AppError::Config(err)) => {
            eprintln!("password-recovery: configuration error: {err}");
            ExitCode::from(2)
        }
        Err(AppError::Unproven) => ExitCode::from(2),
        Err(err) => {
            tracing::error!(error = %err, "password-recovery stopped");
            eprintln!("password-recovery: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), AppError> {
    let config = match Config::load()? {
        Command::Run(config) => config,
        Command::Check(config) => return check(&config).await,
        Command::Print(text) => {
            print!("{text}");
            return Ok(());
        }
    };
    let telemetry = telemetry::init(&config.log, config.otlp_endpoint.as_deref())?;
    let result = async { Application::build(*config).await?.run_until_stopped().await }.await;
    telemetry.shutdown();
    result
}

/// `password-recovery check`: proves every app client once and prints a line for each; exit 2
/// unless every one works.
async fn check(config: &Config) -> Result<(), AppError> {
    let proven = password_recovery::proofs::check(config).await?;
    for proof in &proven {
        println!("{}", proof.line());
    }
    match proven.iter().all(|proof| proof.verdict.works()) {
        true => Ok(()),
        false => Err(AppError::Unproven),
    }
}
