//! password-recovery: a gRPC service that starts and finishes password resets for users of an
//! AWS Cognito user pool, for internal callers.
//!
//! A call flows one way: a door (gRPC or Connect, `api`) starts it and reads its message → the
//! transport-free service core validates it (`domain`), applies the limits (`limits`), calls
//! Cognito (`cognito`) and enumeration protection (`masking`), and finishes the call with its
//! reply: the answer, or an `error::Error` decided (`error::Classified`) → the door renders the
//! reply in its own protocol. `app` builds and serves everything, with health, reflection and
//! graceful shutdown; `config` reads the settings, parsed with `settings`.

pub(crate) mod api;
pub mod app;
pub mod callers;
pub mod cognito;
pub mod config;
pub(crate) mod connections;
pub mod domain;
pub mod error;
pub mod fleet;
pub(crate) mod idempotency;
pub mod limits;
pub(crate) mod masking;
pub mod memory;
pub(crate) mod metrics;
pub mod places;
pub(crate) mod privacy;
pub mod proofs;
pub mod proto;
pub(crate) mod reload;
pub mod settings;
pub mod telemetry;
pub mod tls;
