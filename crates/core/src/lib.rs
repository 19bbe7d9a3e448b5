//! Shared foundation of every Nexus fleet process.
//!
//! Owns the error taxonomy and its single mapping to gRPC codes and HTTP
//! statuses ([`Error`]), process lifecycle ([`shutdown`], [`spawn`]), logging
//! ([`telemetry`]), thread priorities ([`priority`]) and gRPC serving with
//! health and reflection ([`grpc`]).
//! Nothing here knows about models or audio.

pub mod admin;
pub mod error;
pub mod grpc;
pub mod priority;
pub mod shutdown;
pub mod task;
pub mod telemetry;
pub mod trace;

pub use error::{Error, Result, ResultExt};
pub use task::spawn;
pub use tokio_util::sync::CancellationToken;
