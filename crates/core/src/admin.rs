//! A service's admin port: `/metrics` (Prometheus text, rendered on each
//! scrape) and `/healthz`.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Renders the metrics exposition on each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Content type of the OpenMetrics text format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves the admin routes on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, render: Render, shutdown: CancellationToken) {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let render = render.clone();
                async move { ([("content-type", OPENMETRICS)], render()) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "admin port failed");
    }
}
