//! password-recovery: a gRPC service that starts and finishes password resets for users of an
//! AWS Cognito user pool, for internal callers.
//!
//! A call flows one way: gRPC request (`api`) → validated request (`domain`) → Cognito
//! (`cognito`) → answer, or an `error::Error` that becomes a `tonic::Status`. `app` builds and
//! serves everything, with health, reflection and graceful shutdown.

pub(crate) mod api;
pub mod app;
pub mod cognito;
pub mod config;
pub(crate) mod connections;
pub mod domain;
pub mod error;
pub mod limits;
pub(crate) mod masking;
pub mod memory;
pub(crate) mod metrics;
pub mod places;
pub(crate) mod privacy;
pub mod proto;
pub(crate) mod reload;
pub mod settings;
pub mod telemetry;
pub mod tls;
