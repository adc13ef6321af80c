//! The `passwordrecovery.v1.PasswordRecovery` service and its two doors. A call flows one way:
//! a door starts it and reads its message → the transport-free [`service`] core validates it,
//! calls Cognito and finishes the call (log line, audit event, metrics) → the door renders the
//! [`call::Reply`] in its own protocol.
//!
//! - `call`: the life of one call: span, request id, caller, budget, places, and its one log
//!   line, audit event and metrics; the `Reply` a door renders.
//! - `service`: the core, the same for both doors.
//! - `intake`: where every call starts (the places among the calls in progress, shared by both
//!   doors), and the tower layer in front of tonic that answers the gRPC calls whose message
//!   could not be read.
//! - `grpc`: the gRPC door (tonic's generated server).
//! - `connect`: the Connect door (JSON or binary proto over HTTP/1.1 and HTTP/2) on the same
//!   port, in front of tonic's routes.
//! - `parse`: proto → validated domain types, and back.

mod call;
mod connect;
mod grpc;
mod intake;
mod parse;
mod service;

use std::future::Future;

pub(crate) use connect::{Connect, ProtocolsLayer};
pub use grpc::Grpc;
pub(crate) use intake::Gate;
pub use intake::{Intake, IntakeSettings};
pub use service::InFlightCalls;
pub(crate) use service::{Service, Shared as ServiceState};

/// The service's full name, as health, metrics and reflection show it (the generated one).
pub use crate::proto::v1::password_recovery_server::SERVICE_NAME;

/// An HTTP response of the layers in front of tonic's routes (`intake`, `connect`).
type HttpResponse = http::Response<tonic::body::Body>;
/// What those layers' services return.
type HttpFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<HttpResponse, std::convert::Infallible>> + Send>>;
