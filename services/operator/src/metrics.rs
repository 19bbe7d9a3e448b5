//! The operator's metrics and its admin port (`/metrics`, `/healthz`).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::crd::Phase;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Ended {
    phase: &'static str,
}

/// Counters of the controller, in their own registry (no global state).
pub struct Metrics {
    registry: Registry,
    reconciles: Family<Outcome, Counter>,
    duration: Histogram,
    submitted: Counter,
    retried: Counter,
    cancelled: Counter,
    finished: Family<Ended, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("nexus_operator");
        let reconciles = Family::<Outcome, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles of TranscriptionJobs by outcome",
            reconciles.clone(),
        );
        let duration = Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]);
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            duration.clone(),
        );
        let submitted = Counter::default();
        registry.register(
            "runs_submitted",
            "Runs queued on the fleet's job stream",
            submitted.clone(),
        );
        let retried = Counter::default();
        registry.register(
            "runs_retried",
            "Failed runs submitted again",
            retried.clone(),
        );
        let cancelled = Counter::default();
        registry.register(
            "runs_cancelled",
            "Runs cancelled because their resource was deleted",
            cancelled.clone(),
        );
        let finished = Family::<Ended, Counter>::default();
        registry.register(
            "jobs_finished",
            "Jobs that reached a final phase",
            finished.clone(),
        );
        Self {
            registry,
            reconciles,
            duration,
            submitted,
            retried,
            cancelled,
            finished,
        }
    }
}

impl Metrics {
    pub(crate) fn reconciled(&self, outcome: &'static str, took: Duration) {
        self.reconciles.get_or_create(&Outcome { outcome }).inc();
        self.duration.observe(took.as_secs_f64());
    }
    pub(crate) fn submitted(&self) {
        self.submitted.inc();
    }
    pub(crate) fn retried(&self) {
        self.retried.inc();
    }
    pub(crate) fn cancelled(&self) {
        self.cancelled.inc();
    }
    pub(crate) fn finished(&self, phase: Phase) {
        self.finished
            .get_or_create(&Ended {
                phase: phase.as_str(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
