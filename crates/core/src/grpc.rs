//! Serving gRPC the same way in every service: the service's own routes plus
//! `grpc.health.v1` and `grpc.reflection.v1`, on a listener the caller bound
//! (port 0 in tests), with a graceful drain on shutdown.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::RoutesBuilder;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

/// Name of the health service, as reflection lists it.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
/// Name of the reflection service, as reflection lists it.
pub const REFLECTION_SERVICE: &str = "grpc.reflection.v1.ServerReflection";

/// Errors of [`GrpcServer::serve`].
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection descriptors are inconsistent (a build bug).
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The listener or an accepted connection failed.
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// How a server stops.
#[derive(Debug, Clone, Copy)]
pub struct DrainOptions {
    /// After shutdown is requested, keep serving this long while health says
    /// NOT_SERVING, so load balancers stop routing new calls here first.
    pub announce: Duration,
    /// Then stop accepting and give in-flight calls this long to finish.
    pub grace: Duration,
}

impl Default for DrainOptions {
    fn default() -> Self {
        Self {
            announce: Duration::ZERO,
            grace: Duration::from_secs(25),
        }
    }
}

/// Flips the health of a server and every service it hosts, e.g. once models
/// are loaded or while a stage drains.
#[derive(Clone)]
pub struct HealthHandle {
    health: HealthReporter,
    services: Vec<&'static str>,
}

impl std::fmt::Debug for HealthHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthHandle")
            .field("services", &self.services)
            .finish()
    }
}

impl HealthHandle {
    /// Marks everything serving or not.
    pub async fn set_serving(&self, serving: bool) {
        set_all(&self.health, &self.services, serving).await;
    }
}

/// A gRPC server with health and reflection for the services it hosts.
pub struct GrpcServer {
    health: HealthReporter,
    services: Vec<&'static str>,
    drain: DrainOptions,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

impl GrpcServer {
    /// A server for the named services (fully qualified proto names).
    /// Health starts as NOT_SERVING until the caller says otherwise.
    pub async fn new(services: &[&'static str], drain: DrainOptions) -> Self {
        let health = HealthReporter::new();
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        for s in services {
            health
                .set_service_status(*s, ServingStatus::NotServing)
                .await;
        }
        Self {
            health,
            services: services.to_vec(),
            drain,
            tls: None,
        }
    }

    /// Serves over TLS with this configuration.
    pub fn with_tls(mut self, tls: tonic::transport::ServerTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Handle to change health, e.g. from a model-loading watch channel.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// A handle that outlives [`serve`](Self::serve)'s taking of the server.
    pub fn health_handle(&self) -> HealthHandle {
        HealthHandle {
            health: self.health.clone(),
            services: self.services.clone(),
        }
    }

    /// Marks the server and every hosted service as serving or not.
    pub async fn set_serving(&self, serving: bool) {
        set_all(&self.health, &self.services, serving).await;
    }

    /// Serves `routes` plus health and reflection until `shutdown` is cancelled,
    /// then drains as [`DrainOptions`] says.
    pub async fn serve(
        self,
        mut routes: RoutesBuilder,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        let mut reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(nexus_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(HEALTH_SERVICE)
            .with_service_name(REFLECTION_SERVICE);
        for s in &self.services {
            reflection = reflection.with_service_name(*s);
        }
        routes
            .add_service(HealthServer::new(HealthService::from_health_reporter(
                self.health.clone(),
            )))
            .add_service(reflection.build_v1()?);

        let addr = listener.local_addr().ok();
        let stop = CancellationToken::new();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = self.tls.clone() {
            builder = builder.tls_config(tls)?;
        }
        let server = builder
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_routes(routes.routes())
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        let mut server = std::pin::pin!(server);
        tracing::info!(?addr, services = ?self.services, "grpc serving");

        tokio::select! {
            r = &mut server => return Ok(r?),
            _ = shutdown.cancelled() => {}
        }
        set_all(&self.health, &self.services, false).await;
        tokio::select! {
            r = &mut server => return Ok(r?),
            _ = tokio::time::sleep(self.drain.announce) => {}
        }
        stop.cancel();
        match tokio::time::timeout(self.drain.grace, server).await {
            Ok(r) => Ok(r?),
            Err(_) => {
                tracing::warn!(grace = ?self.drain.grace, "drain grace elapsed with calls in flight");
                Ok(())
            }
        }
    }
}

async fn set_all(health: &HealthReporter, services: &[&'static str], serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status("", status).await;
    for s in services {
        health.set_service_status(*s, status).await;
    }
}
