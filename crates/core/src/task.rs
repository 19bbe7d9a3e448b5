//! Named background tasks whose failures are logged, never silently lost.

use std::fmt::Display;
use std::future::Future;

use tracing::Instrument;

/// Spawns a background loop under a name. An `Err` it returns is logged with the
/// name; a panic is caught by tokio and reported through the join handle.
pub fn spawn<F, E>(name: &'static str, fut: F) -> tokio::task::JoinHandle<()>
where
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: Display + Send + 'static,
{
    let span = tracing::info_span!("task", name);
    tokio::spawn(
        async move {
            match fut.await {
                Ok(()) => tracing::debug!("task finished"),
                Err(e) => tracing::error!(error = %e, "task failed"),
            }
        }
        .instrument(span),
    )
}
