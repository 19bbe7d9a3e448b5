//! One process of the fleet, whatever stages it runs: the stage binaries run
//! one, `nexus serve` runs several. Each stage's builder takes a [`Process`],
//! so what a process shares (its admin port, the fleet's metric families, the
//! drain, the models it loaded) is made once, in one place.

use std::path::PathBuf;
use std::sync::Arc;

use nexus_core::admin::Renders;
use nexus_core::telemetry::LogFilter;
use tokio_util::sync::CancellationToken;

use crate::metrics::{self, FleetMetrics};
use crate::{Fleet, FleetArgs, ModelSet};

/// The async runtime of a serving process, built after settling how
/// candle's CPU kernels use the cores ([`nexus_models::threads`]), which must
/// happen before any thread starts. Call it first thing in `main`.
pub fn serving_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    nexus_models::threads::settle_cpu_threads(nexus_models::threads::CpuUse::Serving);
    tokio::runtime::Runtime::new()
}

/// The models a process serves and where they run.
#[derive(Debug, Clone)]
pub struct ModelArgs {
    /// Registry names or folders; the first is the default.
    pub names: Vec<String>,
    /// Where weights are kept (the default store when `None`).
    pub home: Option<PathBuf>,
    /// The device every model of the process runs on.
    pub device: candle_core::Device,
    /// How Whisper's linear layers hold their weights.
    pub precision: nexus_models::Precision,
}

/// What the stages of one process share.
#[derive(Clone)]
pub struct Process {
    args: FleetArgs,
    /// The admin port's parts, when the process has one.
    pub admin: Option<Renders>,
    metrics: FleetMetrics,
    models: ModelArgs,
    loaded: Arc<tokio::sync::OnceCell<ModelSet>>,
    /// Cancelled on SIGTERM/SIGINT: every stage drains.
    pub shutdown: CancellationToken,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("models", &self.models.names)
            .field("admin", &self.admin.is_some())
            .finish_non_exhaustive()
    }
}

impl Process {
    /// Binds and serves `--admin-listen` until `shutdown` (with `log` as the
    /// filter `PUT /log` changes) and registers the fleet families on it once.
    pub async fn start(
        args: &FleetArgs,
        models: ModelArgs,
        log: Option<LogFilter>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        // The settings are checked before anything is bound.
        args.resolve("check")?;
        let admin = match args.admin_listen {
            None => None,
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("binding the admin port {addr}: {e}"))?;
                let renders = Renders::default();
                if let Some(filter) = log {
                    renders.set_log_filter(filter);
                }
                tokio::spawn(nexus_core::admin::serve(
                    l,
                    renders.clone(),
                    args.admin_token.clone(),
                    shutdown.clone(),
                ));
                Some(renders)
            }
        };
        let mut registry = prometheus_client::registry::Registry::with_prefix("nexus");
        let fleet_metrics = FleetMetrics::register(&mut registry);
        if let Some(renders) = &admin {
            let registry = Arc::new(registry);
            renders.add(Arc::new(move || metrics::render(&registry)));
        }
        Ok(Self {
            args: args.clone(),
            admin,
            metrics: fleet_metrics,
            models,
            loaded: Arc::default(),
            shutdown,
        })
    }

    /// The settings of the stage `role` (which names the replica when
    /// `--node` is empty).
    pub fn fleet(&self, role: &str) -> anyhow::Result<Fleet> {
        let mut f = self.args.resolve(role)?;
        f.admin = self.admin.clone();
        f.metrics = self.metrics.clone();
        Ok(f)
    }

    /// The models this process serves, loaded on first use and shared by
    /// every stage that asks (the encoder and decoder of `nexus serve` hold
    /// one copy).
    pub async fn models(&self) -> anyhow::Result<ModelSet> {
        self.loaded
            .get_or_try_init(|| async {
                let m = self.models.clone();
                let set = tokio::task::spawn_blocking(move || {
                    ModelSet::load_on(&m.names, m.home, &m.device, m.precision)
                })
                .await??;
                self.metrics.models_loaded(&set);
                anyhow::Ok(set)
            })
            .await
            .cloned()
    }

    /// The models, when a stage of this process has loaded them.
    pub fn loaded_models(&self) -> Option<&ModelSet> {
        self.loaded.get()
    }

    /// The names of the models the fleet serves; the first is the default.
    pub fn model_names(&self) -> &[String] {
        &self.models.names
    }

    /// Where weights are kept.
    pub fn home(&self) -> Option<PathBuf> {
        self.models.home.clone()
    }

    /// The device the process's models run on.
    pub fn device(&self) -> &candle_core::Device {
        &self.models.device
    }
}

/// Starts a process of one stage on Redis: its shutdown on signals, its
/// [`Process`] (admin port, log filter) and the connection to the streams.
pub async fn on_redis(
    redis: &str,
    fleet: &FleetArgs,
    models: ModelArgs,
    telemetry: &nexus_core::telemetry::Telemetry,
) -> anyhow::Result<(Process, nexus_bus::RedisBus)> {
    let shutdown = nexus_core::shutdown::on_signals();
    let process = Process::start(fleet, models, Some(telemetry.log_filter()), shutdown).await?;
    let bus = nexus_bus::RedisBus::connect(redis)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to {redis}: {e}"))?;
    Ok((process, bus))
}

impl crate::StageProcessArgs {
    /// Starts this process of one stage: [`on_redis`] with its models.
    pub async fn start(
        &self,
        fleet: &FleetArgs,
        telemetry: &nexus_core::telemetry::Telemetry,
    ) -> anyhow::Result<(Process, nexus_bus::RedisBus)> {
        let device = nexus_models::parse_device(&self.device)?;
        let precision = nexus_models::Precision::for_device(self.precision, &device)?;
        let models = ModelArgs {
            names: self.models.clone(),
            home: None,
            precision,
            device,
        };
        on_redis(&self.redis, fleet, models, telemetry).await
    }
}
