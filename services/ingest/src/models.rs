//! `nexus.speech.v1.Models`: what this fleet serves, and whether the decoder
//! pool can take work for it now.

use nexus_bus::Bus;
use nexus_fleet::stages;
use nexus_proto::speech::models_server::Models;
use nexus_proto::speech::{Capability, ListModelsRequest, ListModelsResponse, ModelInfo, Task};
use tonic::{Request, Response, Status};

use crate::Ingest;

impl<B: Bus> Ingest<B> {
    /// The served models, described for clients as the decoders advertise
    /// them (`catalog`); `ready` says whether the decoder pool advertises
    /// capacity. A model this fleet is set to serve that no decoder has
    /// advertised yet is listed by name only, not ready.
    pub(crate) async fn model_list(&self) -> Vec<ModelInfo> {
        let cfg = &self.inner.cfg;
        let pool = cfg.fleet.keys.pool(stages::DECODER_POOL);
        let ready = match self.inner.bus.pool_usage(&pool).await {
            Ok((_, capacity)) => capacity > 0,
            Err(e) => {
                tracing::warn!(error = %e, "reading the decoder pool failed");
                false
            }
        };
        let advertised = self
            .inner
            .catalog
            .models(&self.inner.bus, &cfg.fleet.keys.catalog())
            .await;
        let mut out = Vec::new();
        for (i, name) in cfg.models.iter().enumerate() {
            let info = match advertised.iter().find(|m| &m.name == name) {
                Some(m) => ModelInfo { ready, ..m.clone() },
                None => ModelInfo {
                    name: name.clone(),
                    capabilities: vec![Capability::SpeechRecognition as i32],
                    tasks: vec![Task::Transcribe as i32],
                    sample_rate_hz: nexus_audio::MODEL_SAMPLE_RATE,
                    ..ModelInfo::default()
                },
            };
            out.push(ModelInfo {
                is_default: i == 0,
                ..info
            });
        }
        out.extend(
            advertised
                .iter()
                .filter(|m| m.capabilities == [Capability::TextTranslation as i32])
                .map(|m| ModelInfo { ready, ..m.clone() }),
        );
        out.push(ModelInfo {
            name: "silero-vad".into(),
            family: "silero".into(),
            capabilities: vec![Capability::VoiceActivity as i32],
            languages: Vec::new(),
            translation_targets: Vec::new(),
            tasks: Vec::new(),
            // The VAD runs inside this ingest replica.
            ready: true,
            is_default: true,
            sample_rate_hz: nexus_audio::MODEL_SAMPLE_RATE,
        });
        out
    }

    /// The text translation model the decoders advertise, if any.
    pub(crate) async fn text_translation_model(&self) -> Option<String> {
        let cfg = &self.inner.cfg;
        self.inner
            .catalog
            .models(&self.inner.bus, &cfg.fleet.keys.catalog())
            .await
            .iter()
            .find(|m| {
                m.capabilities
                    .contains(&(Capability::TextTranslation as i32))
            })
            .map(|m| m.name.clone())
    }
}

/// The Models service of an ingest replica.
pub struct ModelsService<B: Bus>(pub(crate) Ingest<B>);

#[tonic::async_trait]
impl<B: Bus> Models for ModelsService<B> {
    async fn list_models(
        &self,
        request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let want = request.into_inner().capability;
        let mut models = self.0.model_list().await;
        if want != Capability::Unspecified as i32 {
            models.retain(|m| m.capabilities.contains(&want));
        }
        Ok(Response::new(ListModelsResponse { models }))
    }
}
