//! Logging: `tracing` to standard output, as JSON lines (the default) or text, filtered by
//! `RUST_LOG`. Log lines never hold passwords, codes, secrets or usernames (see `privacy`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{ConfigError, LogFormat, LogSettings};

/// Installs the global subscriber. A malformed `RUST_LOG` is a [`ConfigError`]; a subscriber
/// already installed (as in tests) is left in place.
pub fn init(settings: &LogSettings) -> Result<(), ConfigError> {
    let filter = EnvFilter::try_new(&settings.filter)
        .map_err(|e| ConfigError::setting("RUST_LOG", format!("not a log filter: {e}")))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(std::io::stdout().is_terminal());
    // Ignoring the error keeps a subscriber a test installed first.
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    Ok(())
}
