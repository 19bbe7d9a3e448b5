//! The decoders' model catalog (`ModelCatalog` under the fleet's `catalog`
//! key): what each served model can do, as the replicas that loaded it
//! advertise. Requests are checked against it and ListModels answers from
//! it; nothing here guesses a model's abilities from its name.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_bus::Bus;
use nexus_proto::pipeline::ModelCatalog;
use nexus_proto::speech::ModelInfo;

/// How long a read of the catalog is used before it is read again.
const FRESH: Duration = Duration::from_secs(1);
/// A model missing from the catalog is looked for again after this long (a
/// decoder that has just started writes it).
const MISS_RETRY: Duration = Duration::from_millis(100);

/// The catalog as last read, shared by the replica's requests.
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    read: tokio::sync::Mutex<Option<(Instant, Arc<Vec<ModelInfo>>)>>,
}

impl Catalog {
    /// Every model the decoders advertise, the default first.
    pub(crate) async fn models<B: Bus>(&self, bus: &B, key: &str) -> Arc<Vec<ModelInfo>> {
        self.read_within(bus, key, FRESH).await
    }

    /// What the decoders advertise for `name`; `None` when no decoder has
    /// (none has started since the catalog was last written, or the fleet
    /// does not serve it).
    pub(crate) async fn model<B: Bus>(&self, bus: &B, key: &str, name: &str) -> Option<ModelInfo> {
        let find = |all: &[ModelInfo]| all.iter().find(|m| m.name == name).cloned();
        if let Some(m) = find(&self.models(bus, key).await) {
            return Some(m);
        }
        find(&self.read_within(bus, key, MISS_RETRY).await)
    }

    /// The catalog, read from the bus when the last read is older than
    /// `age`. One read at a time; the others wait for it. A failed read keeps
    /// what was read before.
    async fn read_within<B: Bus>(&self, bus: &B, key: &str, age: Duration) -> Arc<Vec<ModelInfo>> {
        let mut read = self.read.lock().await;
        if let Some((at, models)) = read.as_ref()
            && at.elapsed() < age
        {
            return models.clone();
        }
        let models = match bus.get(key).await {
            Ok(Some(bytes)) => match <ModelCatalog as prost::Message>::decode(bytes.as_slice()) {
                Ok(c) => Arc::new(c.models),
                Err(e) => {
                    tracing::warn!(error = %e, "the model catalog does not decode; keeping the last one");
                    read.as_ref().map(|(_, m)| m.clone()).unwrap_or_default()
                }
            },
            Ok(None) => Arc::default(),
            Err(e) => {
                tracing::warn!(error = %e, "reading the model catalog failed; keeping the last one");
                read.as_ref().map(|(_, m)| m.clone()).unwrap_or_default()
            }
        };
        *read = Some((Instant::now(), models.clone()));
        models
    }
}
