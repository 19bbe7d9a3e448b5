//! `nexus.speech.v1.Models`: what this fleet serves, and whether the decoder
//! pool can take work for it now.

use nexus_bus::Bus;
use nexus_fleet::stages;
use nexus_models::whisper::tokenizer::LANGUAGES;
use nexus_proto::speech::models_server::Models;
use nexus_proto::speech::{Capability, ListModelsRequest, ListModelsResponse, ModelInfo, Task};
use tonic::{Request, Response, Status};

use crate::Ingest;

fn codes(filter: impl Fn(&str) -> bool) -> Vec<String> {
    LANGUAGES
        .iter()
        .filter(|c| filter(c))
        .map(|c| (*c).to_owned())
        .collect()
}

impl<B: Bus> Ingest<B> {
    /// The served models, described for clients; `ready` says whether the
    /// decoder pool advertises capacity.
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
        let text_targets = |from_en_only: bool| {
            codes(|c| {
                nexus_models::qwen::language_name(c).is_some() && !(from_en_only && c == "en")
            })
        };
        let mut out = Vec::new();
        for (i, name) in cfg.models.iter().enumerate() {
            let english_only = cfg.english_only.contains(name);
            let mut targets = Vec::new();
            if !english_only {
                targets.push("en".to_owned());
            }
            if cfg.translation_model.is_some() || cfg.self_translating.contains(name) {
                for t in text_targets(false) {
                    if !targets.contains(&t) {
                        targets.push(t);
                    }
                }
            }
            let mut capabilities = vec![Capability::SpeechRecognition as i32];
            let mut tasks = vec![Task::Transcribe as i32];
            if !targets.is_empty() {
                capabilities.push(Capability::SpeechTranslation as i32);
                tasks.push(Task::Translate as i32);
            }
            // NEXUS-O checkpoints are the models that translate through their own prompt.
            let nexus = cfg.self_translating.contains(name);
            out.push(ModelInfo {
                name: name.clone(),
                family: if nexus { "nexus-o" } else { "whisper" }.into(),
                capabilities,
                languages: if english_only {
                    vec!["en".into()]
                } else {
                    codes(|_| true)
                },
                translation_targets: targets,
                tasks,
                ready,
                is_default: i == 0,
                sample_rate_hz: nexus_audio::MODEL_SAMPLE_RATE,
            });
        }
        if let Some(name) = &cfg.translation_model {
            out.push(ModelInfo {
                name: name.clone(),
                family: "qwen2".into(),
                capabilities: vec![Capability::TextTranslation as i32],
                languages: text_targets(false),
                translation_targets: text_targets(false),
                tasks: Vec::new(),
                ready,
                is_default: true,
                sample_rate_hz: 0,
            });
        }
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
