//! What this replica's models can do, as ingest needs to know it: each
//! served model's languages, tasks, translation targets and family, read
//! from the loaded models themselves (a Whisper tokenizer says whether the
//! model is multilingual; a NEXUS-O checkpoint translates by prompt; the
//! text translation model adds its target languages). Written to the
//! fleet's `catalog` key ([`nexus_bus::Keys::catalog`]) while the replica runs.

use nexus_fleet::ModelSet;
use nexus_models::whisper::tokenizer::LANGUAGES;
use nexus_proto::pipeline::ModelCatalog;
use nexus_proto::speech::{Capability, ModelInfo, Task};

/// Whisper's language codes that `keep` accepts, in Whisper's order.
fn codes(keep: impl Fn(&str) -> bool) -> Vec<String> {
    LANGUAGES
        .iter()
        .filter(|c| keep(c))
        .map(|c| (*c).to_owned())
        .collect()
}

/// The languages the text translation model is prompted to write.
fn text_targets() -> Vec<String> {
    codes(|c| nexus_models::qwen::language_name(c).is_some())
}

/// The catalog of `models`, the default first, with the text translation
/// model `translation` (its name) when the replica loaded one.
pub fn catalog(models: &ModelSet, translation: Option<&str>) -> ModelCatalog {
    let text = text_targets();
    let mut names = models.names();
    names.sort_by_key(|n| n != models.default_name());
    let mut out = Vec::with_capacity(names.len() + 1);
    for name in names {
        let speaks = models
            .nexus(&name)
            .is_some_and(|(_, m)| m.audio_decoder().is_some());
        let (family, english_only, by_prompt) = if models.nexus(&name).is_some() {
            ("nexus-o", false, true)
        } else if let Some((_, e)) = models.get(&name) {
            ("whisper", !e.tokenizer.multilingual, false)
        } else {
            continue;
        };
        let mut targets = Vec::new();
        if !english_only {
            targets.push("en".to_owned());
        }
        if by_prompt || translation.is_some() {
            for t in &text {
                if !targets.contains(t) {
                    targets.push(t.clone());
                }
            }
        }
        let mut capabilities = vec![Capability::SpeechRecognition as i32];
        let mut tasks = vec![Task::Transcribe as i32];
        if !targets.is_empty() {
            capabilities.push(Capability::SpeechTranslation as i32);
            tasks.push(Task::Translate as i32);
        }
        if speaks {
            capabilities.push(Capability::SpeechSynthesis as i32);
        }
        out.push(ModelInfo {
            is_default: name == models.default_name(),
            name,
            family: family.into(),
            capabilities,
            languages: if english_only {
                vec!["en".into()]
            } else {
                codes(|_| true)
            },
            translation_targets: targets,
            tasks,
            ready: false,
            sample_rate_hz: nexus_models::mel::SAMPLE_RATE,
        });
    }
    if let Some(name) = translation {
        out.push(ModelInfo {
            name: name.to_owned(),
            family: "qwen2".into(),
            capabilities: vec![Capability::TextTranslation as i32],
            languages: text.clone(),
            translation_targets: text,
            tasks: Vec::new(),
            ready: false,
            is_default: true,
            sample_rate_hz: 0,
        });
    }
    ModelCatalog { models: out }
}
