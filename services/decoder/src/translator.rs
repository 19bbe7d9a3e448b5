//! The decoder's text translation model on a thread of its own. Captions
//! are translated one after another, in arrival order: decoding several as
//! one batch (`Translator::translate_batch`) measured slower on CPU than one
//! by one (candle's quantised matrix product takes a different, slower
//! kernel for several rows; see BENCHMARKS.md, "Text translation"), so the
//! thread does not batch.

use std::sync::mpsc;

use nexus_models::qwen::prompt::Spec;
use nexus_models::qwen::{Translated, Translator};
use tokio::sync::oneshot;

/// A caption to translate, owned so it can cross to the model's thread.
#[derive(Debug, Clone)]
pub struct Caption {
    /// The caption.
    pub text: String,
    /// ISO 639-1; empty when not known.
    pub source: String,
    /// ISO 639-1 of the language to translate into.
    pub target: String,
    /// The session's earlier captions, oldest first.
    pub context: Vec<String>,
    /// Terms to keep as written.
    pub glossary: Vec<String>,
}

struct Job {
    captions: Vec<Caption>,
    reply: oneshot::Sender<Result<Vec<Translated>, String>>,
}

/// A handle to the translation thread; cloning shares it.
#[derive(Clone)]
pub struct TranslationWorker {
    tx: mpsc::Sender<Job>,
}

impl std::fmt::Debug for TranslationWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TranslationWorker")
    }
}

impl TranslationWorker {
    /// Starts the thread that owns `model`; it ends when every handle is dropped.
    pub fn start(mut model: Translator) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("decoder-translator".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    answer(&mut model, job);
                }
            })?;
        Ok(Self { tx })
    }

    /// Translates `captions`, after the captions queued before them.
    pub async fn translate(&self, captions: Vec<Caption>) -> Result<Vec<Translated>, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { captions, reply })
            .map_err(|_| "the translation thread stopped".to_owned())?;
        rx.await
            .map_err(|_| "the translation thread stopped".to_owned())?
    }
}

/// Answers a job with its captions translated one after another.
fn answer(model: &mut Translator, job: Job) {
    let r = job
        .captions
        .iter()
        .map(|c| {
            model.translate(&Spec {
                text: &c.text,
                source: (!c.source.is_empty()).then_some(c.source.as_str()),
                target: &c.target,
                context: &c.context,
                glossary: &c.glossary,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string());
    let _ = job.reply.send(r);
}
