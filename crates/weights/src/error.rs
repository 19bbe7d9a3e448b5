//! Weight errors: each says which file and what is wrong with it.

use std::path::PathBuf;

/// Result with [`WeightsError`].
pub type Result<T, E = WeightsError> = std::result::Result<T, E>;

/// Why weights could not be fetched, verified or converted.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The registry file is malformed.
    #[error("model registry: {0}")]
    Registry(String),
    /// No model by that name.
    #[error("unknown model {name:?}; known: {known}")]
    UnknownModel {
        /// Requested name.
        name: String,
        /// Comma-separated known names.
        known: String,
    },
    /// A file's SHA-256 is not the pinned one.
    #[error(
        "{path}: SHA-256 is {actual}, expected {expected}; the file is corrupt or not the pinned release"
    )]
    HashMismatch {
        /// The file.
        path: PathBuf,
        /// Pinned hash.
        expected: String,
        /// Hash of the bytes on disk.
        actual: String,
    },
    /// The package client failed.
    #[error("fetching {package}: {message}")]
    Fetch {
        /// `name==version`.
        package: String,
        /// What the client said.
        message: String,
    },
    /// A package archive is unreadable or lacks a member.
    #[error("archive {path}: {message}")]
    Archive {
        /// The archive.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A checkpoint file is not what it claims to be.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        message: String,
    },
    /// The model exists but this operation does not apply to it.
    #[error("{0}")]
    Unsupported(String),
    /// A known model that has not been pulled onto this machine.
    #[error("{what} is not on this machine; run `nexus models pull {name}`")]
    NotPulled {
        /// What is missing (`model base`, `the Silero VAD`).
        what: String,
        /// The registry name to pull.
        name: String,
    },
}

impl WeightsError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| WeightsError::Io { path, source }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        WeightsError::Format {
            path: path.into(),
            message: message.into(),
        }
    }
}
