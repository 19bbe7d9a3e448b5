//! Logging and tracing for every process: an env-filter, text or JSON lines,
//! a handle to change the filter while the process runs, and (with the
//! `fleet` feature) spans exported over OTLP/gRPC when an endpoint is
//! configured (flushed when the [`Telemetry`] guard drops).

#[cfg(feature = "fleet")]
use std::sync::Arc;
#[cfg(feature = "fleet")]
use std::time::Duration;

use clap::{Args, ValueEnum};
#[cfg(feature = "fleet")]
use opentelemetry::trace::TracerProvider as _;
#[cfg(feature = "fleet")]
use opentelemetry_otlp::WithExportConfig;
#[cfg(feature = "fleet")]
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
#[cfg(feature = "fleet")]
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
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
    /// OTLP/gRPC endpoint that receives traces (e.g. `http://otel-collector:4317`);
    /// no traces are exported when unset. `OTEL_BSP_*` variables tune batching.
    #[cfg(feature = "fleet")]
    #[arg(long, env = "NEXUS_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
}

/// Keeps logging configured; changes the filter at run time.
pub struct Telemetry {
    filter: reload::Handle<EnvFilter, Registry>,
    #[cfg(feature = "fleet")]
    traces: Option<(SdkTracerProvider, tokio::runtime::Runtime)>,
}

#[cfg(feature = "fleet")]
impl Drop for Telemetry {
    /// Exports the spans still buffered.
    fn drop(&mut self) {
        if let Some((provider, runtime)) = self.traces.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("flushing traces failed: {e}");
            }
            runtime.shutdown_background();
        }
    }
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
    /// The OTLP exporter could not be set up.
    #[cfg(feature = "fleet")]
    #[error("OTLP trace export to {endpoint}: {reason}")]
    Otlp {
        /// The endpoint.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
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

/// Installs the global subscriber for a process named `service` (the
/// `service.name` of its spans). Call once, first thing in `main`, and keep
/// the guard until the end.
pub fn init(args: &TelemetryArgs, service: &str) -> Result<Telemetry, TelemetryError> {
    let (filter, handle) = reload::Layer::new(parse_filter(&args.log_filter)?);
    #[cfg(feature = "fleet")]
    let traces = args
        .otlp_endpoint
        .as_deref()
        .filter(|e| !e.is_empty())
        .map(|e| tracer_provider(e, service))
        .transpose()?;
    #[cfg(feature = "fleet")]
    let otel = traces.as_ref().map(|(p, _)| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("nexus"))
            .with_tracked_inactivity(false)
    });
    // Without the fleet's OTLP export, spans go nowhere but the log lines.
    #[cfg(not(feature = "fleet"))]
    let otel = {
        let _ = service;
        None::<tracing_subscriber::layer::Identity>
    };
    let registry = tracing_subscriber::registry().with(filter).with(otel);
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
    Ok(Telemetry {
        filter: handle,
        #[cfg(feature = "fleet")]
        traces,
    })
}

/// The provider and the one-thread runtime its exports run on (the process's
/// own runtime may not exist yet, and ends before the last flush).
#[cfg(feature = "fleet")]
fn tracer_provider(
    endpoint: &str,
    service: &str,
) -> Result<(SdkTracerProvider, tokio::runtime::Runtime), TelemetryError> {
    let fail = |reason: String| TelemetryError::Otlp {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let exporter = {
        let _in = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| fail(e.to_string()))?
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(OnRuntime {
            inner: Arc::new(exporter),
            runtime: runtime.handle().clone(),
        })
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build();
    Ok((provider, runtime))
}

/// Runs a span exporter's calls on a Tokio runtime: the SDK's
/// batch processor exports from a thread of its own, where tonic's
/// connections (which need the runtime's reactor) cannot be driven.
#[cfg(feature = "fleet")]
#[derive(Debug)]
struct OnRuntime<E> {
    inner: Arc<E>,
    runtime: tokio::runtime::Handle,
}

#[cfg(feature = "fleet")]
impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let inner = self.inner.clone();
        let task = self.runtime.spawn(async move { inner.export(batch).await });
        async move {
            task.await
                .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string())))
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

impl Telemetry {
    /// Replaces the log filter, e.g. to turn on `debug` for one crate while live.
    pub fn set_filter(&self, filter: &str) -> Result<(), TelemetryError> {
        self.log_filter().set(filter)
    }

    /// A handle that changes the log filter (the admin port's `PUT /log`).
    pub fn log_filter(&self) -> LogFilter {
        LogFilter(self.filter.clone())
    }
}

/// Changes the process's log filter while it runs.
#[derive(Clone)]
pub struct LogFilter(reload::Handle<EnvFilter, Registry>);

impl LogFilter {
    /// Replaces the filter with `filter` (env-filter syntax).
    pub fn set(&self, filter: &str) -> Result<(), TelemetryError> {
        let parsed = parse_filter(filter)?;
        self.0
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
