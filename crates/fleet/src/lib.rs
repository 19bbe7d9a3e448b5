//! What every fleet stage shares.
//!
//! The names of the stage streams and consumer groups ([`stages`]), the loop
//! that reads a stage's work with redelivery of what crashed peers left behind
//! ([`StageReader`]), retrying a bus call through an outage ([`retry`]), the
//! command-line settings every stage takes ([`FleetArgs`]), and loading the
//! models a stage serves by name ([`models`]).

pub mod metrics;
pub mod models;
pub mod process;
pub mod reader;
pub mod stages;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use models::ModelSet;
pub use process::{ModelArgs, Process, serving_runtime};
pub use reader::{Acker, StageReader, retry};

use nexus_bus::{Keys, StreamLimits};

/// What a stage binary run against Redis needs besides its stage settings.
#[derive(Debug, Clone, clap::Args)]
pub struct StageProcessArgs {
    /// Redis holding the fleet's streams.
    #[arg(long, env = "NEXUS_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// Whisper models the fleet serves (registry names or folders); the first is the default.
    #[arg(
        long = "model",
        env = "NEXUS_MODELS",
        value_delimiter = ',',
        default_value = "base"
    )]
    pub models: Vec<String>,
    /// Device the models run on: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, env = "NEXUS_DEVICE", default_value = "cpu")]
    pub device: String,
    /// How Whisper's linear layers hold their weights: f32, f16 (GPUs only)
    /// or int8 (Q8_0 blocks, CPU only). Default: int8 on CPU, f16 on GPUs.
    /// NEXUS-O models run as stored.
    #[arg(long, env = "NEXUS_PRECISION")]
    pub precision: Option<nexus_models::Precision>,
}

/// Settings every stage of one fleet shares.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// Prefix of every Redis key, so several fleets can share one Redis.
    #[arg(long, env = "NEXUS_KEY_PREFIX", default_value = "nexus")]
    pub key_prefix: String,
    /// Name of this replica in consumer groups; a random one when empty.
    #[arg(long, env = "NEXUS_NODE", default_value = "")]
    pub node: String,
    /// Work left unacknowledged this long by a replica is taken over by another
    /// (the replica crashed or hung).
    #[arg(long, env = "NEXUS_CLAIM_IDLE_MS", default_value_t = 10_000)]
    pub claim_idle_ms: u64,
    /// Entries a stage may have waiting before producers are pushed back.
    #[arg(long, env = "NEXUS_MAX_BACKLOG", default_value_t = 2_000)]
    pub max_backlog: usize,
    /// Deliveries after which an entry is dead-lettered.
    #[arg(long, env = "NEXUS_MAX_DELIVERIES", default_value_t = 4)]
    pub max_deliveries: u32,
    /// Interim windows older than this are skipped by encoders and decoders: a
    /// newer window of the utterance is on its way.
    #[arg(long, env = "NEXUS_INTERIM_MAX_AGE_MS", default_value_t = 2_000)]
    pub interim_max_age_ms: u64,
    /// Admin port of this process: `/metrics` (Prometheus text) and
    /// `/healthz`; off when unset.
    #[arg(long, env = "NEXUS_ADMIN_LISTEN")]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Token that `PUT /log` on the admin port needs (`authorization: Bearer
    /// TOKEN`, at least 16 characters); without one the log filter is fixed.
    #[arg(long, env = "NEXUS_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<nexus_core::admin::Secret>,
    /// Seconds in-flight work gets to finish on SIGTERM.
    #[arg(long, env = "NEXUS_DRAIN_GRACE_S", default_value_t = 25)]
    pub drain_grace_s: u64,
}

impl Default for FleetArgs {
    fn default() -> Self {
        Self {
            key_prefix: "nexus".into(),
            node: String::new(),
            claim_idle_ms: 10_000,
            max_backlog: 2_000,
            max_deliveries: 4,
            interim_max_age_ms: 2_000,
            admin_listen: None,
            admin_token: None,
            drain_grace_s: 25,
        }
    }
}

/// [`FleetArgs`] checked and resolved.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// Key names.
    pub keys: Keys,
    /// This replica's name.
    pub node: String,
    /// Idle time after which another replica takes work over.
    pub claim_idle: Duration,
    /// Limits of every work stream.
    pub limits: StreamLimits,
    /// Age after which interim windows are skipped.
    pub interim_max_age: Duration,
    /// Where the stage registers its metrics, when the process has an admin port.
    pub admin: Option<nexus_core::admin::Renders>,
    /// The process's stream, bus and model-load families, shared by its stages.
    pub metrics: metrics::FleetMetrics,
    /// How health and the drain on SIGTERM behave.
    pub drain: nexus_core::grpc::DrainOptions,
}

impl FleetArgs {
    /// Checks the settings; `role` names the replica when `--node` is empty.
    pub(crate) fn resolve(&self, role: &str) -> anyhow::Result<Fleet> {
        let keys = Keys::new(&self.key_prefix)?;
        let node = if self.node.is_empty() {
            format!("{role}-{}", uuid::Uuid::new_v4().simple())
        } else {
            self.node.clone()
        };
        anyhow::ensure!(self.max_backlog > 0, "--max-backlog must be at least 1");
        anyhow::ensure!(
            self.max_deliveries > 0,
            "--max-deliveries must be at least 1"
        );
        Ok(Fleet {
            keys,
            node,
            claim_idle: Duration::from_millis(self.claim_idle_ms.max(100)),
            limits: StreamLimits {
                max_backlog: self.max_backlog,
                max_deliveries: self.max_deliveries,
            },
            interim_max_age: Duration::from_millis(self.interim_max_age_ms),
            admin: None,
            metrics: metrics::FleetMetrics::default(),
            drain: nexus_core::grpc::DrainOptions {
                grace: Duration::from_secs(self.drain_grace_s),
                ..nexus_core::grpc::DrainOptions::default()
            },
        })
    }
}

/// Wall-clock time in Unix milliseconds, as envelopes carry it.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
