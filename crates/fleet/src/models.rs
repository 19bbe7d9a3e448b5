//! The models a stage serves, loaded by name (names resolve through
//! [`nexus_weights::resolve`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use candle_core::Device;
use nexus_models::Precision;
use nexus_models::nexus::NexusModel;
use nexus_models::whisper::WhisperEngine;

pub use nexus_weights::resolve::{
    resolve_gguf, resolve_model, resolve_speaker_encoder, resolve_vad,
};

/// The Whisper models a stage serves, by the name clients ask for. The first
/// is the default for requests that name none.
#[derive(Clone)]
pub struct ModelSet {
    load_seconds: Arc<BTreeMap<String, f64>>,
    engines: Arc<BTreeMap<String, Arc<WhisperEngine>>>,
    nexus: Arc<BTreeMap<String, Arc<NexusModel>>>,
    default: String,
}

impl std::fmt::Debug for ModelSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSet")
            .field("models", &self.names())
            .finish()
    }
}

impl ModelSet {
    /// Loads every named model on the CPU, in the CPU's default precision.
    pub fn load(names: &[String], home: Option<PathBuf>) -> anyhow::Result<Self> {
        Self::load_on(
            names,
            home,
            &Device::Cpu,
            Precision::default_for(&Device::Cpu),
        )
    }

    /// Loads every named model on `device`, Whisper's linear layers in
    /// `precision` (NEXUS-O models run as stored).
    pub fn load_on(
        names: &[String],
        home: Option<PathBuf>,
        device: &Device,
        precision: Precision,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!names.is_empty(), "name at least one model to serve");
        let mut engines = BTreeMap::new();
        let mut nexus = BTreeMap::new();
        let mut load_seconds = BTreeMap::new();
        for name in names {
            let dir = resolve_model(name, home.clone())?;
            let t0 = std::time::Instant::now();
            let runs_in = if NexusModel::is_checkpoint(&dir) {
                let model = NexusModel::load(&dir, device)
                    .with_context(|| format!("loading {name} from {}", dir.display()))?;
                nexus.insert(name.clone(), Arc::new(model));
                "as stored"
            } else {
                let engine = WhisperEngine::load_with(&dir, device, precision)
                    .with_context(|| format!("loading {name} from {}", dir.display()))?;
                engines.insert(name.clone(), Arc::new(engine));
                precision.as_str()
            };
            tracing::info!(model = %name, precision = runs_in, load_ms = t0.elapsed().as_millis() as u64, "model loaded");
            load_seconds.insert(name.clone(), t0.elapsed().as_secs_f64());
        }
        Ok(Self {
            load_seconds: Arc::new(load_seconds),
            engines: Arc::new(engines),
            nexus: Arc::new(nexus),
            default: names[0].clone(),
        })
    }

    /// The Whisper model a request names, or the default for an empty name.
    pub fn get(&self, name: &str) -> Option<(&str, &Arc<WhisperEngine>)> {
        let key = if name.is_empty() { &self.default } else { name };
        self.engines
            .get_key_value(key)
            .map(|(k, v)| (k.as_str(), v))
    }

    /// The NEXUS-O model a request names, or the default for an empty name.
    pub fn nexus(&self, name: &str) -> Option<(&str, &Arc<NexusModel>)> {
        let key = if name.is_empty() { &self.default } else { name };
        self.nexus.get_key_value(key).map(|(k, v)| (k.as_str(), v))
    }

    /// Seconds each model took to load.
    pub fn load_seconds(&self) -> Vec<(String, f64)> {
        self.load_seconds
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Names served, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self
            .engines
            .keys()
            .chain(self.nexus.keys())
            .cloned()
            .collect();
        n.sort();
        n
    }

    /// The default model's name.
    pub fn default_name(&self) -> &str {
        &self.default
    }
}
