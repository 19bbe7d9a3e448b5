//! The ingest stage's metrics, served on its admin port.

use nexus_fleet::metrics::{FleetMetrics, LATENCY_BUCKETS};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Source {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Call {
    method: &'static str,
    code: String,
}

/// Counters and histograms of one ingest replica (prefix `nexus_ingest_`);
/// the fleet-wide families (`nexus_stream_*`, `nexus_bus_errors_total`) are
/// the process's, rendered once by it.
pub struct IngestMetrics {
    registry: Registry,
    /// Streams and bus errors.
    pub fleet: FleetMetrics,
    sessions_started: Counter,
    sessions_ended: Family<Outcome, Counter>,
    sessions_active: Gauge,
    refused: Family<Outcome, Counter>,
    calls: Family<Call, Counter>,
    audio: Family<Source, Counter<f64, std::sync::atomic::AtomicU64>>,
    latency: Family<Kind, Histogram>,
}

impl IngestMetrics {
    /// The ingest families beside the process's shared `fleet` ones.
    pub fn new(fleet: FleetMetrics) -> Self {
        let mut registry = Registry::with_prefix("nexus");
        let sessions_started = Counter::default();
        let sessions_ended = Family::<Outcome, Counter>::default();
        let sessions_active = Gauge::default();
        let refused = Family::<Outcome, Counter>::default();
        let calls = Family::<Call, Counter>::default();
        let audio = Family::<Source, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        let latency =
            Family::<Kind, Histogram>::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS));
        let sub = registry.sub_registry_with_prefix("ingest");
        sub.register(
            "sessions_started",
            "Live sessions admitted",
            sessions_started.clone(),
        );
        sub.register(
            "sessions_ended",
            "Live sessions ended, by outcome (ok or the gRPC code)",
            sessions_ended.clone(),
        );
        sub.register(
            "sessions_active",
            "Live sessions running on this replica",
            sessions_active.clone(),
        );
        sub.register(
            "admission_refused",
            "Sessions and calls refused, by reason",
            refused.clone(),
        );
        sub.register("calls", "Unary calls by method and outcome", calls.clone());
        sub.register(
            "audio_seconds",
            "Seconds of audio taken in, by source (live sessions or whole files)",
            audio.clone(),
        );
        sub.register(
            "caption_latency_seconds",
            "From a window leaving ingest to its caption going to the client, by kind (interim, final)",
            latency.clone(),
        );
        Self {
            registry,
            fleet,
            sessions_started,
            sessions_ended,
            sessions_active,
            refused,
            calls,
            audio,
            latency,
        }
    }

    pub(crate) fn session_started(&self) {
        self.sessions_started.inc();
        self.sessions_active.inc();
    }

    pub(crate) fn session_ended(&self, outcome: Option<tonic::Code>, audio_seconds: f64) {
        self.sessions_active.dec();
        let outcome = outcome.map_or_else(|| "ok".to_owned(), code_label);
        self.sessions_ended
            .get_or_create(&Outcome { outcome })
            .inc();
        self.audio(true, audio_seconds);
    }

    pub(crate) fn refused(&self, why: &str) {
        self.refused
            .get_or_create(&Outcome {
                outcome: why.to_owned(),
            })
            .inc();
    }

    pub(crate) fn call(&self, method: &'static str, outcome: Option<tonic::Code>) {
        let code = outcome.map_or_else(|| "ok".to_owned(), code_label);
        self.calls.get_or_create(&Call { method, code }).inc();
    }

    pub(crate) fn audio(&self, live: bool, seconds: f64) {
        self.audio
            .get_or_create(&Source {
                source: if live { "live" } else { "file" },
            })
            .inc_by(seconds);
    }

    pub(crate) fn caption(&self, is_final: bool, seconds: f64) {
        self.latency
            .get_or_create(&Kind {
                kind: if is_final { "final" } else { "interim" },
            })
            .observe(seconds);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        nexus_fleet::metrics::render(&self.registry)
    }
}

/// `ResourceExhausted` → `resource_exhausted`.
fn code_label(c: tonic::Code) -> String {
    let mut out = String::new();
    for (i, ch) in format!("{c:?}").chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_lowercase());
    }
    out
}
