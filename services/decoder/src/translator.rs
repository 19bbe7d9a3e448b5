//! The decoder's text translation model on a thread of its own. Captions
//! are translated one after another, in arrival order: decoding several as
//! one batch ([`Translator::translate_batch`]) measured slower on CPU than
//! one by one (candle's quantised matrix product takes a different, slower
//! kernel for several rows; see BENCHMARKS.md), so the thread takes the
//! batch size [`MAX_BATCH`] of 1 until a backend batches faster.

use std::sync::mpsc;

use nexus_models::qwen::prompt::Spec;
use nexus_models::qwen::{Translated, Translator};
use tokio::sync::oneshot;

/// Captions one decode takes at most.
pub const MAX_BATCH: usize = 1;

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
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    let mut n = jobs[0].captions.len();
                    while MAX_BATCH > 1 && n < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(j) => {
                                n += j.captions.len();
                                jobs.push(j);
                            }
                            Err(_) => break,
                        }
                    }
                    run_batch(&mut model, jobs);
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

fn spec(c: &Caption) -> Spec<'_> {
    Spec {
        text: &c.text,
        source: (!c.source.is_empty()).then_some(c.source.as_str()),
        target: &c.target,
        context: &c.context,
        glossary: &c.glossary,
    }
}

/// Answers each job with its captions translated one after another.
fn one_by_one(model: &mut Translator, jobs: Vec<Job>) {
    for j in jobs {
        let r = j
            .captions
            .iter()
            .map(|c| model.translate(&spec(c)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string());
        let _ = j.reply.send(r);
    }
}

fn run_batch(model: &mut Translator, jobs: Vec<Job>) {
    if MAX_BATCH == 1 {
        one_by_one(model, jobs);
        return;
    }
    let all: Vec<&Caption> = jobs.iter().flat_map(|j| &j.captions).collect();
    let specs: Vec<Spec<'_>> = all.iter().map(|c| spec(c)).collect();
    let t0 = std::time::Instant::now();
    let out = model.translate_batch(&specs);
    tracing::debug!(
        captions = specs.len(),
        requests = jobs.len(),
        took_ms = t0.elapsed().as_millis() as u64,
        "translated a batch"
    );
    match out {
        Ok(out) => {
            let mut out = out.into_iter();
            for j in jobs {
                let mine: Vec<Translated> = out.by_ref().take(j.captions.len()).collect();
                let _ = j.reply.send(Ok(mine));
            }
        }
        Err(e) => {
            // One bad caption (an unsupported target) must not fail the
            // others batched with it: each request runs again on its own.
            drop(specs);
            one_by_one(model, jobs);
            tracing::debug!(error = %e, "a batch failed; its requests ran one by one");
        }
    }
}
