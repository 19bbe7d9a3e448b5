//! Errors of data synthesis and training.

/// What went wrong, said so that the user can act on it.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A setting is out of its bounds or inconsistent; names the field.
    #[error("{0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// An output folder holds something else than what was asked.
    #[error("{0}")]
    Mismatch(String),
    /// A synthesiser or external program failed.
    #[error("{0}")]
    Synthesis(String),
    /// A model failed.
    #[error(transparent)]
    Model(#[from] nexus_models::ModelError),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// Audio resampling failed.
    #[error(transparent)]
    Audio(#[from] nexus_audio::AudioError),
    /// A manifest or record did not parse.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: String,
        /// The cause.
        source: serde_json::Error,
    },
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;

/// An I/O error naming its path.
pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads a JSON file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|source| TrainError::Json {
        path: path.display().to_string(),
        source,
    })
}

/// Writes a JSON file (pretty), through a temporary file and a rename.
pub(crate) fn write_json<T: serde::Serialize>(path: &std::path::Path, value: &T) -> Result<()> {
    let json = serde_json::to_string_pretty(value).map_err(|source| TrainError::Json {
        path: path.display().to_string(),
        source,
    })?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}
