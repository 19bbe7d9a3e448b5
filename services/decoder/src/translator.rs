//! The decoder's text translation model on a thread of its own.
//!
//! Two queues share it. Live captions (finals of sessions that translate)
//! come first, each job whole and in arrival order. Texts (TranslateText)
//! go piece by piece: a text is cut into lines and sentences
//! ([`nexus_models::qwen::pieces`]), each piece translated with the ones
//! before it as context, and the thread looks for live captions between
//! two pieces, so a long text delays a live caption by one piece at most.
//! Every caption and piece is bounded in reply tokens and in time
//! ([`Translator::with_time_budget`]). A live caption that has waited
//! longer than the live wait when its turn comes is not translated: it
//! comes back marked [`BEHIND`], so a translator slower than its live
//! sessions drops stale captions and stays current with the new ones
//! (the viewer sees the source caption marked untranslated) instead of
//! delaying every caption after it without bound.
//!
//! Live captions of different sessions waiting together are translated as
//! one batch ([`Translator::translate_live`]): each continues its session's
//! conversation with the model (the session's earlier captions and their
//! translations kept as keys and values, so a caption runs only its own
//! tokens), and the replies decode together, one batched step per token.
//! Up to [`MAX_LIVE_BATCH`] sessions at once; a session's captions go one
//! job after another, in order.
//!
//! The thread's matrix products split over a rayon pool of its own (as
//! many threads as the global pool), not the global pool the Whisper
//! stages' products use: in one pool a translation step's dozens of small
//! products each queued behind whatever encoder product was running, while
//! with two pools the kernel shares the cores between them. Measured with
//! `loadtest/scenarios/live-tiny-translate.toml` on 2 cores, one run each:
//! four translated sessions' German finals 5734 / 9004 ms (p50 / p95, 4 of
//! 20 untranslated) on the shared pool, 4566 / 7368 ms (3 of 20) on their
//! own; eight 8215 / 12725 ms (26 of 40) against 7590 / 10914 ms (19 of 40).

use std::collections::{HashSet, VecDeque};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nexus_models::qwen::pieces::LongText;
use nexus_models::qwen::prompt::Spec;
use nexus_models::qwen::{LiveFirst, Translated, Translator};
use tokio::sync::oneshot;

/// A caption to translate, owned so it can cross to the model's thread.
#[derive(Debug, Clone)]
pub struct Caption {
    /// The live session it belongs to; empty for texts, which keep no
    /// conversation.
    pub session: String,
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

impl Caption {
    fn spec(&self) -> Spec<'_> {
        Spec {
            text: &self.text,
            source: (!self.source.is_empty()).then_some(self.source.as_str()),
            target: &self.target,
            context: &self.context,
            glossary: &self.glossary,
        }
    }
}

/// Which queue a job waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Captions of live sessions: translated whole, before any text.
    Live,
    /// Texts: translated piece by piece, live captions taken in between.
    Text,
}

type Reply = oneshot::Sender<Result<Vec<Translated>, String>>;

/// The failure of a live caption skipped because it waited longer than the
/// live wait: the translator is behind its live sessions.
pub const BEHIND: &str = "behind";

struct Job {
    captions: Vec<Caption>,
    priority: Priority,
    reply: Reply,
    queued: Instant,
}

/// Sessions whose live captions translate in one batch at most.
pub const MAX_LIVE_BATCH: usize = 16;

/// Language pairs a worker is asked to warm at most (see
/// [`TranslationWorker::warm`]); later pairs are computed with their first
/// caption.
const MAX_WARM_PAIRS: usize = 64;

enum Message {
    Job(Job),
    /// Compute the live prompt's prefix of (source, target) when idle.
    Warm(Option<String>, String),
}

/// A handle to the translation thread; cloning shares it.
#[derive(Clone)]
pub struct TranslationWorker {
    tx: mpsc::Sender<Message>,
    /// Pairs asked to warm so far.
    warmed: std::sync::Arc<std::sync::Mutex<HashSet<(String, String)>>>,
}

impl std::fmt::Debug for TranslationWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TranslationWorker")
    }
}

impl TranslationWorker {
    /// Starts the thread that owns `model`; it ends when every handle is
    /// dropped. Live captions that wait longer than `live_wait` for it are
    /// answered [`BEHIND`].
    pub fn start(mut model: Translator, live_wait: Duration) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Message>();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("translator-{i}"))
            .build()
            .map_err(std::io::Error::other)?;
        std::thread::Builder::new()
            .name("decoder-translator".into())
            .spawn(move || {
                pool.install(move || {
                    let mut live: VecDeque<Job> = VecDeque::new();
                    let mut texts: VecDeque<TextJob> = VecDeque::new();
                    let mut warm: VecDeque<(Option<String>, String)> = VecDeque::new();
                    loop {
                        if live.is_empty() && texts.is_empty() && warm.is_empty() {
                            match rx.recv() {
                                Ok(m) => queue(m, &mut live, &mut texts, &mut warm),
                                Err(_) => break,
                            }
                        }
                        while let Ok(m) = rx.try_recv() {
                            queue(m, &mut live, &mut texts, &mut warm);
                        }
                        if !live.is_empty() {
                            let batch = take_live(&mut live, live_wait);
                            answer_live(&mut model, batch);
                        } else if let Some(t) = texts.front_mut()
                            && t.step(&mut model)
                            && let Some(t) = texts.pop_front()
                        {
                            t.finish();
                        } else if texts.is_empty()
                            && let Some((source, target)) = warm.pop_front()
                            && let Err(e) = model.warm(source.as_deref(), &target)
                        {
                            tracing::warn!(error = %e, "translation prefix not warmed");
                        }
                    }
                })
            })?;
        Ok(Self {
            tx,
            warmed: Default::default(),
        })
    }

    /// Asks the thread to compute the live prompt's prefix from `source`
    /// (ISO 639-1; empty when not known) into `target` when it has nothing
    /// else to do, so the first caption of a new pair does not wait for it
    /// (the decoder asks at a translating session's first interim). True
    /// when this call queued it: each pair is asked once, the first
    /// [`MAX_WARM_PAIRS`] pairs only.
    pub fn warm(&self, source: &str, target: &str) -> bool {
        let pair = (source.to_owned(), target.to_owned());
        {
            let Ok(mut warmed) = self.warmed.lock() else {
                return false;
            };
            if warmed.len() >= MAX_WARM_PAIRS || !warmed.insert(pair) {
                return false;
            }
        }
        let source = (!source.is_empty()).then(|| source.to_owned());
        self.tx
            .send(Message::Warm(source, target.to_owned()))
            .is_ok()
    }

    /// Translates `captions`: live ones after the live captions queued
    /// before them; texts after the texts queued before them, with live
    /// captions going first between their pieces.
    pub async fn translate(
        &self,
        captions: Vec<Caption>,
        priority: Priority,
    ) -> Result<Vec<Translated>, String> {
        self.submit(captions, priority)?
            .await
            .map_err(|_| "the translation thread stopped".to_owned())?
    }

    /// Queues `captions` now; the answer comes on the receiver.
    pub fn submit(
        &self,
        captions: Vec<Caption>,
        priority: Priority,
    ) -> Result<oneshot::Receiver<Result<Vec<Translated>, String>>, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Message::Job(Job {
                captions,
                priority,
                reply,
                queued: Instant::now(),
            }))
            .map_err(|_| "the translation thread stopped".to_owned())?;
        Ok(rx)
    }
}

fn queue(
    m: Message,
    live: &mut VecDeque<Job>,
    texts: &mut VecDeque<TextJob>,
    warm: &mut VecDeque<(Option<String>, String)>,
) {
    match m {
        Message::Job(job) if job.priority == Priority::Live => live.push_back(job),
        Message::Job(job) => texts.push_back(TextJob::new(job)),
        Message::Warm(source, target) => warm.push_back((source, target)),
    }
}

/// The live jobs to translate now: the first waiting job of each session,
/// oldest first, up to [`MAX_LIVE_BATCH`] sessions. Jobs that waited
/// longer than `live_wait` are answered [`BEHIND`] on the way; the other
/// sessions' later jobs stay queued, in order.
fn take_live(live: &mut VecDeque<Job>, live_wait: Duration) -> Vec<Job> {
    let mut batch = Vec::new();
    let mut sessions = HashSet::new();
    let mut rest = VecDeque::with_capacity(live.len());
    while let Some(job) = live.pop_front() {
        let session = job
            .captions
            .first()
            .map(|c| c.session.clone())
            .unwrap_or_default();
        let taken = !session.is_empty() && sessions.contains(&session);
        if taken || batch.len() >= MAX_LIVE_BATCH {
            rest.push_back(job);
        } else if job.queued.elapsed() > live_wait {
            skip(job);
        } else if !job.reply.is_closed() {
            sessions.insert(session);
            batch.push(job);
        }
    }
    *live = rest;
    batch
}

/// Answers live jobs of different sessions: their first captions as one
/// batch, then their second ones, and so on. A caption whose first output
/// fails its checks is retried after the jobs the round finished are
/// answered, so one caption's retries do not hold back the others.
fn answer_live(model: &mut Translator, jobs: Vec<Job>) {
    let mut results: Vec<Result<Vec<Translated>, String>> =
        jobs.iter().map(|_| Ok(Vec::new())).collect();
    let rounds = jobs.iter().map(|j| j.captions.len()).max().unwrap_or(0);
    let (captions, mut replies): (Vec<Vec<Caption>>, Vec<Option<Reply>>) = jobs
        .into_iter()
        .map(|j| (j.captions, Some(j.reply)))
        .unzip();
    let record = |slot: &mut Result<Vec<Translated>, String>,
                  r: nexus_models::Result<Translated>| {
        match (r, slot) {
            (Ok(t), Ok(done)) => done.push(t),
            (Err(e), slot) => *slot = Err(e.to_string()),
            (Ok(_), Err(_)) => {}
        }
    };
    for round in 0..rounds {
        let members: Vec<usize> = (0..captions.len())
            .filter(|&j| round < captions[j].len() && results[j].is_ok() && replies[j].is_some())
            .collect();
        let items: Vec<_> = members
            .iter()
            .map(|&j| {
                let c = &captions[j][round];
                (c.session.as_str(), c.spec())
            })
            .collect();
        let mut retries = Vec::new();
        match model.live_first(&items) {
            Ok(firsts) => {
                for (&j, f) in members.iter().zip(firsts) {
                    match f {
                        LiveFirst::Done(r) => record(&mut results[j], r),
                        LiveFirst::Retry(r) => retries.push((j, r)),
                    }
                }
            }
            Err(e) => {
                for &j in &members {
                    results[j] = Err(e.to_string());
                }
            }
        }
        // Jobs with nothing left are answered before any retry runs.
        for j in 0..captions.len() {
            let finished = results[j].is_err() || captions[j].len() <= round + 1;
            if finished && !retries.iter().any(|(r, _)| *r == j) {
                send(&mut replies[j], &mut results[j]);
            }
        }
        for (j, r) in retries {
            let out = model.live_retry(r, &captions[j][round].spec());
            record(&mut results[j], out);
            if captions[j].len() <= round + 1 {
                send(&mut replies[j], &mut results[j]);
            }
        }
    }
    for (reply, result) in replies.iter_mut().zip(&mut results) {
        send(reply, result);
    }
}

/// Sends `result` on `reply` unless it was sent before.
fn send(reply: &mut Option<Reply>, result: &mut Result<Vec<Translated>, String>) {
    if let Some(reply) = reply.take() {
        let _ = reply.send(std::mem::replace(result, Ok(Vec::new())));
    }
}

/// Answers a live job that waited too long: its captions untranslated,
/// marked [`BEHIND`].
fn skip(job: Job) {
    tracing::debug!(
        captions = job.captions.len(),
        waited_ms = job.queued.elapsed().as_millis() as u64,
        "live captions skipped: the translator is behind"
    );
    let r = job
        .captions
        .iter()
        .map(|_| Translated::skipped(BEHIND))
        .collect();
    let _ = job.reply.send(Ok(r));
}

/// A text job in progress: its texts one after another, each in pieces.
struct TextJob {
    captions: Vec<Caption>,
    reply: Reply,
    done: Vec<Translated>,
    current: Option<LongText>,
    error: Option<String>,
}

impl TextJob {
    fn new(job: Job) -> Self {
        Self {
            captions: job.captions,
            reply: job.reply,
            done: Vec::new(),
            current: None,
            error: None,
        }
    }

    /// Translates the next piece; true when the job is done, failed, or
    /// abandoned because nobody waits for its answer.
    fn step(&mut self, model: &mut Translator) -> bool {
        if self.error.is_some() || self.reply.is_closed() {
            return true;
        }
        let Some(caption) = self.captions.get(self.done.len()) else {
            return true;
        };
        let long = self
            .current
            .get_or_insert_with(|| LongText::new(&caption.spec()));
        match long.step(model) {
            Ok(Some(t)) => {
                self.done.push(t);
                self.current = None;
            }
            Ok(None) => {}
            Err(e) => self.error = Some(e.to_string()),
        }
        self.error.is_some() || self.done.len() == self.captions.len()
    }

    fn finish(self) {
        let r = match self.error {
            Some(e) => Err(e),
            None => Ok(self.done),
        };
        let _ = self.reply.send(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caption(text: &str) -> Caption {
        Caption {
            session: String::new(),
            text: text.to_owned(),
            source: "en".into(),
            target: "de".into(),
            context: Vec::new(),
            glossary: Vec::new(),
        }
    }

    /// The default translation model, with no time budget: the tests check
    /// what is translated and in which order, not how fast.
    fn model() -> Translator {
        let gguf = nexus_fleet::models::resolve_gguf("qwen2.5-0.5b-instruct", None)
            .expect("nexus models pull qwen2.5-0.5b-instruct");
        Translator::load(&gguf, &candle_core::Device::Cpu)
            .expect("nexus models pull qwen2.5-0.5b-instruct")
            .with_time_budget(std::time::Duration::from_secs(3_600))
    }

    /// A text of several lines and sentences is translated piece by piece,
    /// its lines kept, and a live caption sent after it is answered before
    /// the text is done.
    #[tokio::test]
    #[ignore = "needs the qwen2.5-0.5b-instruct GGUF"]
    async fn a_live_caption_goes_between_the_pieces_of_a_long_text() {
        let worker = TranslationWorker::start(model(), Duration::from_secs(3_600)).unwrap();
        let long = "The meeting starts at nine. The room is on the second floor.\n\nWe will talk about the budget.\nLunch is at noon.";
        let mut text = worker
            .submit(vec![caption(long), caption("")], Priority::Text)
            .unwrap();
        let live = worker
            .translate(vec![caption("Can you hear me?")], Priority::Live)
            .await
            .unwrap();
        assert!(
            matches!(text.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "the text was done before the live caption"
        );
        assert_eq!(live.len(), 1);
        assert!(live[0].text.ends_with('?'), "{:?}", live[0].text);
        let out = text.await.unwrap().unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].failure, None, "{out:?}");
        // Every line translated, the blank one kept.
        let lines: Vec<&str> = out[0].text.split('\n').collect();
        let sources: Vec<&str> = long.split('\n').collect();
        assert_eq!(lines.len(), sources.len(), "{:?}", out[0].text);
        assert!(lines[1].is_empty(), "{:?}", out[0].text);
        for (l, s) in lines.iter().zip(&sources).filter(|(_, s)| !s.is_empty()) {
            assert!(!l.is_empty() && l != s, "{l:?} for {s:?}");
        }
        assert_eq!(
            nexus_eval::langid::identify(&out[0].text),
            Some("de"),
            "{:?}",
            out[0].text
        );
        assert_eq!((out[1].text.as_str(), out[1].failure), ("", None));
    }

    /// Live captions of several sessions waiting together are answered
    /// as one batch, each session's in order, after the pair's prefix was
    /// asked to warm (once): every session's second
    /// caption continues its conversation (the translator keeps one per
    /// session), and all come back German.
    #[tokio::test]
    #[ignore = "needs the qwen2.5-0.5b-instruct GGUF"]
    async fn live_captions_of_several_sessions_are_answered_each_in_order() {
        let worker = TranslationWorker::start(model(), Duration::from_secs(3_600)).unwrap();
        // The pair's prefix is asked for once, computed while nothing waits.
        assert!(worker.warm("en", "de"));
        assert!(!worker.warm("en", "de"));
        assert!(
            !worker.clone().warm("en", "de"),
            "clones share what was asked"
        );
        let firsts = [
            "Good morning.",
            "The train is late.",
            "Where is the station?",
        ];
        let seconds = ["Thank you for coming.", "It was due at nine.", "Is it far?"];
        let mut pending = Vec::new();
        for (i, (a, b)) in firsts.iter().zip(&seconds).enumerate() {
            let session = format!("s{i}");
            let first = Caption {
                session: session.clone(),
                ..caption(a)
            };
            let second = Caption {
                session,
                context: vec![a.to_string()],
                ..caption(b)
            };
            pending.push(worker.submit(vec![first], Priority::Live).unwrap());
            pending.push(worker.submit(vec![second], Priority::Live).unwrap());
        }
        let sources: Vec<&str> = firsts
            .iter()
            .zip(&seconds)
            .flat_map(|(a, b)| [*a, *b])
            .collect();
        for (rx, src) in pending.into_iter().zip(sources) {
            let out = rx.await.unwrap().unwrap();
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].failure, None, "{src:?}: {out:?}");
            assert_eq!(
                nexus_eval::translation::check(src, &out[0].text, "en", "de"),
                None,
                "{src:?} → {:?}",
                out[0].text
            );
        }
    }

    /// A caption whose first output fails its checks is retried after the
    /// others of its batch are answered: here "Let's look at the sales
    /// figures first.", which the model copies in English after "Good
    /// morning, everyone." in its conversation (as in
    /// `qwen_real::live_captions_continue_their_sessions_conversations`),
    /// beside another session's caption that passes at once.
    #[tokio::test]
    #[ignore = "needs the qwen2.5-0.5b-instruct GGUF"]
    async fn a_retried_caption_does_not_hold_back_its_batch() {
        let worker = TranslationWorker::start(model(), Duration::from_secs(3_600)).unwrap();
        let busy = "The meeting starts at nine. The room is on the second floor. We will talk about the budget. Lunch is at noon.";
        let live = |session: &str, text: &str, context: &[&str]| Caption {
            session: session.to_owned(),
            context: context.iter().map(|c| c.to_string()).collect(),
            ..caption(text)
        };
        // Each round's live captions wait while a text is translated, so
        // they are taken as one batch, as the thread takes a busy decoder's.
        let round = |a: Caption, b: Caption| {
            let text = worker.submit(vec![caption(busy)], Priority::Text).unwrap();
            let a = worker.submit(vec![a], Priority::Live).unwrap();
            let b = worker.submit(vec![b], Priority::Live).unwrap();
            (text, a, b)
        };
        let (text, a, b) = round(
            live("a", "Good morning, everyone.", &[]),
            live("b", "The match starts at eight tonight.", &[]),
        );
        for rx in [a, b, text] {
            assert_eq!(rx.await.unwrap().unwrap()[0].failure, None);
        }
        let (text, mut a, b) = round(
            live(
                "a",
                "Let's look at the sales figures first.",
                &["Good morning, everyone."],
            ),
            live(
                "b",
                "Both teams lost their last game.",
                &["The match starts at eight tonight."],
            ),
        );
        let b = b.await.unwrap().unwrap();
        assert_eq!((b[0].attempts, b[0].failure), (1, None), "{b:?}");
        assert!(
            matches!(a.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "the retried caption was answered with the batch (its first output passed?)"
        );
        let a = a.await.unwrap().unwrap();
        assert!(a[0].attempts > 1, "{a:?}");
        assert_eq!(a[0].failure, None, "{a:?}");
        assert_eq!(
            nexus_eval::langid::identify(&a[0].text),
            Some("de"),
            "{:?}",
            a[0].text
        );
        text.await.unwrap().unwrap();
    }

    /// A live caption that waited longer than the live wait comes back
    /// untranslated and marked behind; texts are not skipped.
    #[tokio::test]
    #[ignore = "needs the qwen2.5-0.5b-instruct GGUF"]
    async fn live_captions_that_waited_too_long_come_back_marked_behind() {
        // No wait is short enough: every live caption has waited longer.
        let worker = TranslationWorker::start(model(), Duration::ZERO).unwrap();
        let live = worker
            .translate(
                vec![caption("Good morning."), caption("Thank you.")],
                Priority::Live,
            )
            .await
            .unwrap();
        assert_eq!(live.len(), 2);
        for t in &live {
            assert_eq!(
                (t.text.as_str(), t.failure, t.tokens),
                ("", Some(BEHIND), 0)
            );
        }
        let text = worker
            .translate(vec![caption("Good morning.")], Priority::Text)
            .await
            .unwrap();
        assert_eq!(text[0].failure, None, "{text:?}");
        assert!(!text[0].text.is_empty());
    }
}
