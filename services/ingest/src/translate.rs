//! `nexus.speech.v1.Translation`: text translation on the decoders that hold
//! the fleet's text translation model. A request goes to the `translate`
//! stream; the answer comes back on the request's own result log.

use std::time::{Duration, Instant};

use nexus_bus::{Bus, BusError, SessionId, encode};
use nexus_fleet::{now_unix_ms, retry, stages};
use nexus_proto::pipeline::{Envelope, TranslateDone, TranslateTask};
use nexus_proto::speech::translation_server::Translation;
use nexus_proto::speech::{TextTranslation, TranslateTextRequest, TranslateTextResponse};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{Ingest, invalid};

/// Texts one request may carry.
pub(crate) const MAX_TEXTS: usize = 64;
/// Characters one text may have.
pub(crate) const MAX_CHARS: usize = 4_000;
/// UTF-8 bytes one text may have: the model's byte-level tokens are at most
/// one per byte, so this bounds the prompt (4,000 Chinese characters fit;
/// 4,000 emoji do not).
pub(crate) const MAX_BYTES: usize = 12_000;

/// The Translation service of an ingest replica.
pub struct TranslationService<B: Bus>(pub(crate) Ingest<B>);

impl<B: Bus> Ingest<B> {
    async fn check_translate(&self, r: &mut TranslateTextRequest) -> Result<String, Status> {
        let Some(model) = self.text_translation_model().await else {
            return Err(Status::failed_precondition(
                "this fleet has no text translation model; start the decoders with --translation-model",
            ));
        };
        if !r.model.is_empty() && r.model != model {
            return Err(invalid(format!(
                "model {:?} is not served here; use {model:?} or leave it empty",
                r.model
            )));
        }
        if r.texts.is_empty() {
            return Err(invalid("texts is empty; send at least one text"));
        }
        if r.texts.len() > MAX_TEXTS {
            return Err(invalid(format!(
                "{} texts in one request; send at most {MAX_TEXTS}",
                r.texts.len()
            )));
        }
        if let Some((i, t)) = r
            .texts
            .iter()
            .enumerate()
            .find(|(_, t)| t.chars().count() > MAX_CHARS)
        {
            return Err(invalid(format!(
                "texts[{i}] has {} characters; split it into pieces of at most {MAX_CHARS}",
                t.chars().count()
            )));
        }
        if let Some((i, t)) = r
            .texts
            .iter()
            .enumerate()
            .find(|(_, t)| t.len() > MAX_BYTES)
        {
            return Err(invalid(format!(
                "texts[{i}] is {} bytes of UTF-8; split it into pieces of at most {MAX_BYTES} bytes",
                t.len()
            )));
        }
        let target = r.target_language.trim().to_owned();
        if target.is_empty() {
            return Err(invalid(
                "target_language is required (an ISO 639-1 code such as de)",
            ));
        }
        if nexus_models::qwen::language_name(&target).is_none() {
            return Err(invalid(format!(
                "target_language {target:?} is not supported; use an ISO 639-1 code such as de, fr, zh"
            )));
        }
        let source = r.source_language.trim();
        if !source.is_empty() && nexus_models::qwen::language_name(source).is_none() {
            return Err(invalid(format!(
                "source_language {source:?} is not supported; use an ISO 639-1 code or leave it empty"
            )));
        }
        r.target_language = target;
        r.source_language = source.to_owned();
        Ok(model)
    }

    async fn translate_texts(
        &self,
        mut r: TranslateTextRequest,
        tenant: String,
    ) -> Result<TranslateTextResponse, Status> {
        let model = self.check_translate(&mut r).await?;
        let inner = &self.inner;
        let id = SessionId::parse(&uuid::Uuid::new_v4().to_string())
            .map_err(|e| Status::internal(e.to_string()))?;
        let stop = CancellationToken::new();
        let _stop_follower = stop.clone().drop_guard();
        let (tx, mut rx) = mpsc::channel::<Result<(nexus_bus::EntryId, TranslateDone), String>>(4);
        tokio::spawn(crate::session::follow(
            inner.bus.clone(),
            inner.cfg.fleet.keys.results(&id),
            inner.cfg.bus_retry,
            tx,
            stop.clone(),
        ));
        let task = TranslateTask {
            envelope: Some(Envelope {
                session_id: id.to_string(),
                emitted_unix_ms: now_unix_ms(),
                tenant,
                ..Default::default()
            }),
            texts: r.texts.clone(),
            source_language: r.source_language.clone(),
            target_language: r.target_language.clone(),
        };
        let fields: nexus_bus::Fields = encode(&task)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let stream = stages::stream(&inner.cfg.fleet.keys, stages::TRANSLATE);
        let never = CancellationToken::new();
        match retry("queue translation", inner.cfg.bus_retry, &never, || {
            inner
                .bus
                .add(&stream, fields.clone(), inner.cfg.fleet.limits)
        })
        .await
        {
            Ok(_) => {}
            Err(BusError::Full { backlog, .. }) => {
                return Err(Status::resource_exhausted(format!(
                    "{backlog} translations are queued already; retry later"
                )));
            }
            Err(e) => {
                return Err(Status::unavailable(format!(
                    "the translation could not be queued: {e}; retry"
                )));
            }
        }
        // About a second per short text on two cores, plus the queue.
        let chars: usize = r.texts.iter().map(String::len).sum();
        let budget = inner.cfg.final_timeout + Duration::from_millis(50 * chars as u64);
        let deadline = Instant::now() + budget;
        let done = tokio::select! {
            m = rx.recv() => m,
            _ = tokio::time::sleep_until(deadline.into()) => {
                return Err(Status::deadline_exceeded(format!(
                    "no decoder translated the texts within {budget:?}; the translation decoders may be down or busy"
                )));
            }
        };
        let done = match done {
            Some(Ok((_, d))) => d,
            Some(Err(e)) => {
                return Err(Status::unavailable(format!(
                    "the translation could not be read: {e}; retry"
                )));
            }
            None => return Err(Status::internal("the result follower stopped")),
        };
        if !done.error.is_empty() {
            return Err(Status::internal(done.error));
        }
        if done.texts.len() != r.texts.len() {
            return Err(Status::internal(format!(
                "the decoder returned {} translations for {} texts",
                done.texts.len(),
                r.texts.len()
            )));
        }
        Ok(TranslateTextResponse {
            translations: done
                .texts
                .into_iter()
                .enumerate()
                .map(|(i, text)| TextTranslation {
                    text,
                    source_language: r.source_language.clone(),
                    failure: done.failures.get(i).cloned().unwrap_or_default(),
                })
                .collect(),
            model: if done.model.is_empty() {
                model
            } else {
                done.model
            },
        })
    }
}

#[tonic::async_trait]
impl<B: Bus> Translation for TranslationService<B> {
    async fn translate_text(
        &self,
        request: Request<TranslateTextRequest>,
    ) -> Result<Response<TranslateTextResponse>, Status> {
        let grant = self.0.inner.access.admit_grpc(request.metadata())?;
        let r = self
            .0
            .translate_texts(request.into_inner(), grant.tenant.clone())
            .await?;
        Ok(Response::new(r))
    }
}
