//! Metrics every stage shares: its consumer groups' positions on the streams
//! (the autoscaler's lag signal), bus errors, model load times, and the
//! histogram buckets sized to the fleet's budgets.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nexus_bus::Bus;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Buckets of caption latencies, in seconds, around the 1 s caption budget.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
];
/// Buckets of one model call, in seconds (a 20 ms frame up to a long batch).
pub const INFERENCE_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0,
];
/// Buckets of real-time factors (processing time over audio time).
pub const RTF_BUCKETS: [f64; 10] = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0];
/// Buckets of batch sizes.
pub const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// A consumer group on a stage's stream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    /// The stage's stream (`audio`, `encoded`, `jobs` ...).
    pub stream: String,
    /// The consumer group.
    pub group: String,
}

/// A stage's stream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// The stage's stream (`audio`, `encoded`, `jobs` ...).
    pub stream: String,
}

/// A bus operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// What was tried.
    pub op: String,
}

/// A model.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// The model's name.
    pub model: String,
}

/// Stream positions, bus errors and model load times of one process: one
/// value shared by every stage the process runs (see [`crate::Process`]), so
/// each family and each series appears once on its `/metrics` whether the
/// process runs one stage or all of them.
#[derive(Clone, Default)]
pub struct FleetMetrics {
    lag: Family<GroupLabels, Gauge>,
    pending: Family<GroupLabels, Gauge>,
    dead_letters: Family<StreamLabels, Gauge>,
    bus_errors: Family<OpLabels, Counter>,
    model_load: Family<ModelLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Stages whose streams the sampler reads, and whether it runs.
    sampled: Arc<Mutex<(BTreeSet<String>, bool)>>,
}

impl std::fmt::Debug for FleetMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetMetrics")
    }
}

impl FleetMetrics {
    /// Registers the families (`nexus_stream_lag`, `nexus_stream_pending`,
    /// `nexus_stream_dead_letters`,
    /// `nexus_bus_errors_total`, `nexus_model_load_seconds`) in a registry
    /// prefixed `nexus`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "stream_lag",
            "Entries of a stage's stream not yet delivered to a consumer group",
            m.lag.clone(),
        );
        registry.register(
            "stream_pending",
            "Entries delivered to a consumer group and not yet acknowledged",
            m.pending.clone(),
        );
        registry.register(
            "stream_dead_letters",
            "Entries of a stage's dead-letter stream (failed too many deliveries; the newest are kept)",
            m.dead_letters.clone(),
        );
        registry.register(
            "bus_errors",
            "Failed bus operations by operation",
            m.bus_errors.clone(),
        );
        registry.register(
            "model_load_seconds",
            "Time the process took to load a model",
            m.model_load.clone(),
        );
        m
    }

    /// Counts a failed bus operation.
    pub fn bus_error(&self, op: &str) {
        self.bus_errors
            .get_or_create(&OpLabels { op: op.to_owned() })
            .inc();
    }

    /// Records model load times.
    pub fn models_loaded(&self, models: &crate::ModelSet) {
        for (name, secs) in models.load_seconds() {
            self.model_load
                .get_or_create(&ModelLabels { model: name })
                .set(secs);
        }
    }

    /// Samples the groups and dead letters of the streams of `stages` every
    /// `every` until `shutdown`. Stages of one process call it each with their
    /// own streams; one sampler reads the union (the first call's bus, period
    /// and shutdown), so no stream is read twice.
    pub fn sample_streams<B: Bus>(
        &self,
        bus: B,
        keys: &nexus_bus::Keys,
        stages: &[&str],
        every: Duration,
        shutdown: CancellationToken,
    ) {
        {
            let mut sampled = self.sampled.lock().unwrap_or_else(|p| p.into_inner());
            sampled.0.extend(stages.iter().map(|s| (*s).to_owned()));
            if std::mem::replace(&mut sampled.1, true) {
                return;
            }
        }
        let (m, keys) = (self.clone(), keys.clone());
        tokio::spawn(async move {
            loop {
                let stages: Vec<String> = m
                    .sampled
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .0
                    .iter()
                    .cloned()
                    .collect();
                for stage in &stages {
                    m.sample(&bus, &keys, stage).await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        });
    }

    async fn sample<B: Bus>(&self, bus: &B, keys: &nexus_bus::Keys, stage: &str) {
        let key = crate::stages::stream(keys, stage);
        match bus.groups(&key).await {
            Ok(groups) => {
                for g in groups {
                    let l = GroupLabels {
                        stream: stage.to_owned(),
                        group: g.name,
                    };
                    self.lag.get_or_create(&l).set(g.lag as i64);
                    self.pending.get_or_create(&l).set(g.pending as i64);
                }
            }
            Err(e) => {
                tracing::debug!(stream = %key, error = %e, "sampling stream groups failed");
                self.bus_error("xinfo_groups");
            }
        }
        let dead = keys.dead_letter(stage);
        match bus.len(&dead).await {
            Ok(n) => {
                self.dead_letters
                    .get_or_create(&StreamLabels {
                        stream: stage.to_owned(),
                    })
                    .set(n as i64);
            }
            Err(e) => {
                tracing::debug!(stream = %dead, error = %e, "sampling dead letters failed");
                self.bus_error("xlen");
            }
        }
    }
}

/// The text exposition of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SegmentLabels {
    kind: &'static str,
    outcome: &'static str,
}

/// Work counters of a model stage (encoder or decoder): `nexus_{stage}_*`.
/// The process's [`FleetMetrics`] are rendered once by the process, not here.
pub struct StageMetrics {
    registry: Registry,
    /// Streams, bus errors, model load times (the process's, shared).
    pub fleet: FleetMetrics,
    segments: Family<SegmentLabels, Counter>,
    skipped: Counter,
    batch: Histogram,
    inference: Histogram,
    rtf: Histogram,
}

impl StageMetrics {
    /// The metrics of `stage` (`encoder`, `decoder`) beside the process's
    /// shared `fleet` families.
    pub fn new(stage: &str, fleet: FleetMetrics) -> Self {
        let mut registry = Registry::with_prefix("nexus");
        let segments = Family::<SegmentLabels, Counter>::default();
        let skipped = Counter::default();
        let batch = Histogram::new(BATCH_BUCKETS);
        let inference = Histogram::new(INFERENCE_BUCKETS);
        let rtf = Histogram::new(RTF_BUCKETS);
        let sub = registry.sub_registry_with_prefix(stage);
        sub.register(
            "segments",
            "Windows processed, by kind (interim, final) and outcome (ok, error)",
            segments.clone(),
        );
        sub.register(
            "skipped",
            "Interim windows skipped: superseded by a newer one, or too old to show",
            skipped.clone(),
        );
        sub.register(
            "batch_size",
            "Windows (encoder) or sequences (decoder) in one model call",
            batch.clone(),
        );
        sub.register(
            "inference_seconds",
            "Time of one model call (encoder batch, decoder window)",
            inference.clone(),
        );
        sub.register(
            "real_time_factor",
            "Model time over the audio time it covered",
            rtf.clone(),
        );
        Self {
            registry,
            fleet,
            segments,
            skipped,
            batch,
            inference,
            rtf,
        }
    }

    /// The registry, to add a stage's own families.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Counts a processed window.
    pub fn segment(&self, is_final: bool, ok: bool) {
        self.segments
            .get_or_create(&SegmentLabels {
                kind: if is_final { "final" } else { "interim" },
                outcome: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// Counts skipped windows.
    pub fn skipped(&self, n: usize) {
        self.skipped.inc_by(n as u64);
    }

    /// Records one model call over `size` items covering `audio_seconds`.
    pub fn call(&self, size: usize, took: Duration, audio_seconds: f64) {
        self.batch.observe(size as f64);
        self.inference.observe(took.as_secs_f64());
        if audio_seconds > 0.0 {
            self.rtf.observe(took.as_secs_f64() / audio_seconds);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}
