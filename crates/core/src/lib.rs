//! Shared foundation of every Nexus fleet process.
//!
//! Owns the error taxonomy and its single mapping to gRPC codes and HTTP
//! statuses ([`Error`]), process lifecycle ([`shutdown`], [`spawn`]), logging
//! ([`telemetry`]), thread priorities ([`priority`]) and gRPC serving with
//! health and reflection ([`grpc`]).
//! Nothing here knows about models or audio.
//!
//! The serving parts (gRPC, the admin port, trace context, OTLP export) are
//! the `fleet` feature; without it the crate is what a command-line tool
//! needs: errors, logging, shutdown and thread priorities.

#[cfg(feature = "fleet")]
pub mod admin;
pub mod error;
#[cfg(feature = "fleet")]
pub mod grpc;
pub mod priority;
pub mod shutdown;
pub mod task;
pub mod telemetry;
#[cfg(feature = "fleet")]
pub mod trace;

pub use error::{Error, Result, ResultExt};
pub use task::spawn;
pub use tokio_util::sync::CancellationToken;
