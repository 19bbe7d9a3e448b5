//! Model errors.

/// Result with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Why a model could not load or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    /// Weights or configuration could not be loaded.
    #[error("loading model: {0}")]
    Load(String),
    /// The input cannot be processed by this model.
    #[error("invalid input: {0}")]
    Input(String),
}
