//! A process's admin port: `/metrics` (Prometheus text, rendered on each
//! scrape from every part of the process that registered), `/healthz`, and
//! `PUT /log` (only with the admin token).

use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A secret given on the command line or in the environment: its value never
/// shows in `Debug` output (logged configuration).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl std::str::FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().len() < 16 {
            return Err("a token needs at least 16 characters".into());
        }
        Ok(Self(s.trim().to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl Secret {
    /// Whether `given` is this secret, in time independent of where they differ.
    pub fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), given.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
    }
}

/// Renders one part's metrics exposition on each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Content type of the Prometheus text format (0.0.4), which every scraper
/// and `promtool check metrics` read.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The parts of a process whose metrics one admin port serves (the stages
/// of `nexus serve` share one port).
#[derive(Clone, Default)]
pub struct Renders(
    Arc<Mutex<Vec<Render>>>,
    Arc<Mutex<Option<crate::telemetry::LogFilter>>>,
);

impl std::fmt::Debug for Renders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Renders")
    }
}

impl Renders {
    /// Lets `PUT /log` change the process's log filter.
    pub fn set_log_filter(&self, filter: crate::telemetry::LogFilter) {
        *self.1.lock().unwrap_or_else(|p| p.into_inner()) = Some(filter);
    }

    fn log_filter(&self) -> Option<crate::telemetry::LogFilter> {
        self.1.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Adds a part.
    pub fn add(&self, render: Render) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(render);
    }

    /// Every part's exposition as one document in the Prometheus text format.
    /// Parts may write OpenMetrics (as prometheus-client does): its `# EOF`
    /// and `# UNIT` lines go, and a counter's metadata takes the `_total`
    /// name its samples carry.
    pub fn render(&self) -> String {
        let parts: Vec<Render> = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let text: String = parts.iter().map(|r| r()).collect::<Vec<_>>().join("\n");
        to_prometheus_text(&text)
    }
}

fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .filter(|name| !name.ends_with("_total"))
        .collect();
    let mut out = String::new();
    for line in openmetrics.lines() {
        if line.is_empty() || line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{p}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Serves the admin routes on `listener` until `shutdown`: `GET /metrics`,
/// `GET /healthz`, and `PUT /log` whose body (env-filter syntax, e.g.
/// `info,nexus_decoder=debug`) becomes the log filter; that one needs
/// `authorization: Bearer TOKEN` with `token`, and is refused without one.
pub async fn serve(
    listener: TcpListener,
    renders: Renders,
    token: Option<Secret>,
    shutdown: CancellationToken,
) {
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{get, put};
    let log = renders.clone();
    let app = axum::Router::new()
        .route(
            "/log",
            put(move |headers: HeaderMap, body: String| {
                let log = log.log_filter();
                let token = token.clone();
                async move {
                    let Some(token) = token else {
                        return (
                            StatusCode::FORBIDDEN,
                            "changing the log filter needs an admin token: start the process with --admin-token (NEXUS_ADMIN_TOKEN)\n".to_owned(),
                        );
                    };
                    let given = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .unwrap_or("");
                    if !token.matches(given.trim()) {
                        return (
                            StatusCode::UNAUTHORIZED,
                            "send the admin token as \"authorization: Bearer TOKEN\"\n".to_owned(),
                        );
                    }
                    let Some(log) = log else {
                        return (
                            StatusCode::NOT_FOUND,
                            "this process cannot change its log filter".to_owned(),
                        );
                    };
                    match log.set(body.trim()) {
                        Ok(()) => {
                            tracing::info!(filter = body.trim(), "log filter changed");
                            (
                                StatusCode::OK,
                                format!("log filter is now {:?}\n", body.trim()),
                            )
                        }
                        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let renders = renders.clone();
                async move { ([("content-type", PROMETHEUS_TEXT)], renders.render()) }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_become_one_prometheus_text_document() {
        let r = Renders::default();
        r.add(Arc::new(|| {
            "# HELP a_seconds A.\n# TYPE a_seconds gauge\n# UNIT a_seconds seconds\na_seconds 1\n# EOF\n".to_owned()
        }));
        r.add(Arc::new(|| {
            "# HELP b B things.\n# TYPE b counter\nb_total 2\n# EOF\n".to_owned()
        }));
        assert_eq!(
            r.render(),
            "# HELP a_seconds A.\n# TYPE a_seconds gauge\na_seconds 1\n# HELP b_total B things.\n# TYPE b_total counter\nb_total 2\n"
        );
    }
}
