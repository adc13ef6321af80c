//! The `password-recovery` binary: configuration, logging, then the application until a stop
//! signal. A configuration error is one line on stderr and exit code 2.

use std::process::ExitCode;

use password_recovery::app::{AppError, Application};
use password_recovery::config::{Command, Config};
use password_recovery::telemetry;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(AppError::Config(err)) => {
            eprintln!("password-recovery: configuration error: {err}");
            ExitCode::from(2)
        }
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
