//! Logging for every process: an env-filter, text or JSON lines, and a handle
//! to change the filter while the process runs.

use clap::{Args, ValueEnum};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Logging options shared by every binary.
#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Log filter in `tracing` env-filter syntax, e.g. `info,nexus_models=debug`.
    #[arg(
        long = "log",
        env = "NEXUS_LOG",
        default_value = "info,symphonia=off",
        global = true
    )]
    pub log_filter: String,
    /// Log line format.
    #[arg(
        long,
        env = "NEXUS_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
}

/// Keeps logging configured; changes the filter at run time.
pub struct Telemetry {
    filter: reload::Handle<EnvFilter, Registry>,
}

/// Errors of [`init`] and [`Telemetry::set_filter`].
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The filter string does not parse.
    #[error("invalid log filter {filter:?}: {source}")]
    Filter {
        /// The rejected filter.
        filter: String,
        /// Why it was rejected.
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was installed already.
    #[error("logging was initialised twice: {0}")]
    Init(String),
    /// The subscriber is gone.
    #[error("cannot reload log filter: {0}")]
    Reload(String),
}

fn parse_filter(filter: &str) -> Result<EnvFilter, TelemetryError> {
    EnvFilter::try_new(filter).map_err(|source| TelemetryError::Filter {
        filter: filter.to_owned(),
        source,
    })
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(args: &TelemetryArgs) -> Result<Telemetry, TelemetryError> {
    let (filter, handle) = reload::Layer::new(parse_filter(&args.log_filter)?);
    let registry = tracing_subscriber::registry().with(filter);
    let res = match args.log_format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    res.map_err(|e| TelemetryError::Init(e.to_string()))?;
    Ok(Telemetry { filter: handle })
}

impl Telemetry {
    /// Replaces the log filter, e.g. to turn on `debug` for one crate while live.
    pub fn set_filter(&self, filter: &str) -> Result<(), TelemetryError> {
        let parsed = parse_filter(filter)?;
        self.filter
            .reload(parsed)
            .map_err(|e| TelemetryError::Reload(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_filter_is_named_in_the_error() {
        let err = parse_filter("info,nexus=loud").unwrap_err();
        assert!(err.to_string().contains("nexus=loud"), "{err}");
        assert!(parse_filter("info,nexus_core=debug").is_ok());
    }
}
