//! The Kubernetes operator of the fleet's batch transcription.
//!
//! Owns the `TranscriptionJob` custom resource ([`crd`]) and its controller
//! ([`reconcile`]): a job is validated, submitted as a run on the fleet's
//! Redis job stream (the same records the public `TranscriptionJobs` API
//! writes, so ingest replicas run it), followed into `.status`, submitted
//! again when a run fails (up to `retries`), written into an owned ConfigMap
//! when it succeeds, and cancelled when the resource is deleted.

pub mod crd;
mod metrics;
pub mod reconcile;

#[cfg(test)]
mod fixtures;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};
use nexus_bus::{Bus, BusError, JobStore};
use tokio_util::sync::CancellationToken;

pub use crate::crd::{TranscriptionJob, TranscriptionJobSpec, TranscriptionJobStatus};
pub use crate::metrics::Metrics;

/// Errors of a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a call.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The fleet's job store failed.
    #[error("job store: {0}")]
    Bus(#[from] BusError),
    /// The job queue is full; the job is submitted once there is room.
    #[error("the fleet's job queue is full ({0} waiting); submitting later")]
    QueueFull(usize),
    /// A field the API server always sets is missing.
    #[error("the resource has no {0}")]
    MissingField(&'static str),
    /// A finished run's transcript could not be read.
    #[error("transcript: {0}")]
    Result(String),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

/// The result of reconcile steps.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What every reconcile needs.
pub struct Context<B> {
    /// The Kubernetes API.
    pub client: Client,
    /// The fleet's job records.
    pub jobs: JobStore<B>,
    /// Counters the admin port serves.
    pub metrics: Arc<Metrics>,
    /// How often a running job's progress is mirrored.
    pub poll: Duration,
}

/// The operator's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Admin port: `/metrics` (Prometheus text) and `/healthz`.
    #[arg(long, env = "NEXUS_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,
    /// Namespace to watch; all namespaces when empty.
    #[arg(long, env = "NEXUS_WATCH_NAMESPACE", default_value = "")]
    pub namespace: String,
    /// How often running jobs' progress is copied into their status, in milliseconds.
    #[arg(long, env = "NEXUS_POLL_MS", default_value_t = 2000)]
    pub poll_ms: u64,
    /// How long the fleet keeps job records, in hours (as ingest's --job-ttl-h).
    #[arg(long, env = "NEXUS_JOB_TTL_H", default_value_t = 168)]
    pub job_ttl_h: u64,
    /// Jobs waiting in the fleet's queue at most (as ingest's --job-queue).
    #[arg(long, env = "NEXUS_JOB_QUEUE", default_value_t = 10_000)]
    pub job_queue: usize,
}

impl Args {
    /// The job store these settings describe.
    pub fn job_store<B: Bus>(&self, bus: B, keys: nexus_bus::Keys) -> JobStore<B> {
        JobStore::new(
            bus,
            keys,
            Duration::from_secs(self.job_ttl_h.max(1) * 3600),
            nexus_bus::StreamLimits {
                max_backlog: self.job_queue.max(1),
                max_deliveries: u32::MAX,
            },
        )
    }
}

/// Runs the controller until `shutdown`.
pub async fn run<B: Bus>(
    client: Client,
    args: Args,
    jobs: JobStore<B>,
    admin: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let (jobs_api, maps): (Api<TranscriptionJob>, Api<ConfigMap>) = if args.namespace.is_empty() {
        (Api::all(client.clone()), Api::all(client.clone()))
    } else {
        (
            Api::namespaced(client.clone(), &args.namespace),
            Api::namespaced(client.clone(), &args.namespace),
        )
    };
    // Fail early, with a clear message, when the CRD is not installed.
    jobs_api
        .list(&kube::api::ListParams::default().limit(1))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "listing TranscriptionJobs failed ({e}); is the CRD installed (`crdgen | kubectl apply -f -`) and may this service account list them?"
            )
        })?;
    let ctx = Arc::new(Context {
        client,
        jobs,
        metrics: metrics.clone(),
        poll: Duration::from_millis(args.poll_ms.max(100)),
    });
    let renders = nexus_core::admin::Renders::default();
    renders.add(Arc::new(move || metrics.render()));
    let admin_task = tokio::spawn(nexus_core::admin::serve(
        admin,
        renders,
        None,
        shutdown.clone(),
    ));
    tracing::info!(namespace = %args.namespace, "operator started");
    Controller::new(jobs_api, watcher::Config::default().any_semantic())
        .owns(
            maps,
            watcher::Config::default().labels(&format!(
                "app.kubernetes.io/managed-by={}",
                reconcile::MANAGER
            )),
        )
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile");
            }
        })
        .await;
    let _ = admin_task.await;
    Ok(())
}

/// The CustomResourceDefinition of [`TranscriptionJob`] as YAML, as `crdgen` prints it.
pub fn crd_yaml() -> anyhow::Result<String> {
    use kube::CustomResourceExt;
    Ok(format!(
        "# Generated by `nexus-operator`'s crdgen; do not edit.\n{}",
        serde_saphyr::to_string(&TranscriptionJob::crd())?
    ))
}
