//! Models by name: registry names resolve to folders in the weights store
//! (`nexus models pull NAME`), names `nexus models import` stored resolve to
//! theirs, and a path is taken as it is.

use std::path::{Path, PathBuf};

use crate::{Registry, Result, Store, WeightsError};

/// The folder of a Whisper or NEXUS-O model given by registry name, by the
/// name `nexus models import` stored it under, or by path.
pub fn resolve_model(spec: &str, home: Option<PathBuf>) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_owned());
    }
    let store = Store::new(home.unwrap_or_else(Store::default_root));
    let registry = Registry::builtin();
    let imported = store.model_dir(spec);
    if registry.get(spec).is_err()
        && !spec.contains('/')
        && imported.join("model.safetensors").is_file()
    {
        return Ok(imported);
    }
    let entry = registry.get(spec)?;
    let dir = store.model_dir(&entry.name);
    if !dir.join("model.safetensors").is_file() {
        return Err(WeightsError::NotPulled {
            what: format!("model {}", entry.name),
            name: entry.name.clone(),
        });
    }
    Ok(dir)
}

/// The file of a GGUF language model given by registry name or path.
pub fn resolve_gguf(spec: &str, home: Option<PathBuf>) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(path.to_owned());
    }
    let store = Store::new(home.unwrap_or_else(Store::default_root));
    let registry = Registry::builtin();
    let entry = registry.get(spec)?;
    if entry.format != "gguf" {
        return Err(WeightsError::Unsupported(format!(
            "{} is a {} model, not a GGUF language model",
            entry.name, entry.family
        )));
    }
    let file = store.source_dir(&entry.name).join("model.gguf");
    if !store.is_pulled(entry) {
        return Err(WeightsError::NotPulled {
            what: format!("model {}", entry.name),
            name: entry.name.clone(),
        });
    }
    Ok(file)
}

/// The GE2E speaker encoder's folder, when `nexus models pull ge2e` has run.
pub fn resolve_speaker_encoder(home: Option<PathBuf>) -> Option<PathBuf> {
    let dir = Store::new(home.unwrap_or_else(Store::default_root)).model_dir("ge2e");
    dir.join("model.safetensors").is_file().then_some(dir)
}

/// The Silero VAD weights file.
pub fn resolve_vad(home: Option<PathBuf>) -> Result<PathBuf> {
    let store = Store::new(home.unwrap_or_else(Store::default_root));
    let file = store.source_dir("silero-vad").join("model.safetensors");
    if !file.is_file() {
        return Err(WeightsError::NotPulled {
            what: "the Silero VAD".into(),
            name: "silero-vad".into(),
        });
    }
    Ok(file)
}
