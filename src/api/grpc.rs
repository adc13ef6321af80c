//! The gRPC door: tonic's generated `PasswordRecovery` server, each handler taking the call
//! the intake started for it, passing it and the decoded request to the service core, and
//! rendering the reply as a gRPC answer (the request id in a header on success, a trailer on
//! error; an error's details in `grpc-status-details-bin`).

use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use super::call::{Call, Refusal, Reply};
use super::intake::Unclaimed;
use super::service::Service;
use crate::error::Classified;
use crate::proto::v1 as pb;
use crate::proto::v1::password_recovery_server::PasswordRecovery;
use crate::telemetry::{REPLAYED_HEADER, REQUEST_ID_HEADER};

/// The PasswordRecovery RPCs by gRPC.
#[derive(Debug, Clone)]
pub struct Grpc {
    service: Service,
}

impl Grpc {
    /// The gRPC door to `service`.
    pub(crate) fn new(service: Service) -> Self {
        Self { service }
    }
}

/// The call the intake started for `request`. Every gRPC request of this service passes the
/// intake first, so a missing call is a wiring bug: it panics in debug builds (and so in
/// tests), and is answered `INTERNAL` otherwise.
fn claim<T>(request: &mut Request<T>) -> Result<Call, Status> {
    let call = request
        .extensions_mut()
        .remove::<Unclaimed>()
        .and_then(|slot| slot.claim());
    debug_assert!(
        call.is_some(),
        "a gRPC call reached its handler without passing the intake"
    );
    call.ok_or_else(|| {
        tracing::error!("a gRPC call reached its handler without passing the intake");
        Status::internal("the password-recovery service failed; its operators have been told")
    })
}

/// A reply as gRPC answers it.
pub(crate) fn render<T>(reply: Reply<T>) -> Result<Response<T>, Status> {
    match reply.result {
        Ok(message) => {
            let mut response = Response::new(message);
            if let Ok(id) = MetadataValue::try_from(reply.request_id.as_str()) {
                response.metadata_mut().insert(REQUEST_ID_HEADER, id);
            }
            if reply.replayed {
                response
                    .metadata_mut()
                    .insert(REPLAYED_HEADER, MetadataValue::from_static("true"));
            }
            Ok(response)
        }
        Err(error) => {
            let mut status = status(&reply.request_id, *error);
            if reply.replayed {
                status
                    .metadata_mut()
                    .insert(REPLAYED_HEADER, MetadataValue::from_static("true"));
            }
            Err(status)
        }
    }
}

/// A refusal as gRPC answers it.
pub(crate) fn refusal(refused: Refusal) -> Status {
    match refused.result {
        Ok(never) => match never {},
        Err(error) => status(&refused.request_id, *error),
    }
}

/// An error as a gRPC status, the request id in its trailers.
fn status(request_id: &str, error: Classified) -> Status {
    let mut status = error.into_status();
    if let Ok(id) = MetadataValue::try_from(request_id) {
        status.metadata_mut().insert(REQUEST_ID_HEADER, id);
    }
    status
}

#[tonic::async_trait]
impl PasswordRecovery for Grpc {
    async fn forgot_password(
        &self,
        mut request: Request<pb::ForgotPasswordRequest>,
    ) -> Result<Response<pb::ForgotPasswordResponse>, Status> {
        let call = claim(&mut request)?;
        let reply = self
            .service
            .forgot_password(call, request.into_inner())
            .await;
        render(reply.map(pb::ForgotPasswordResponse::from))
    }

    async fn confirm_forgot_password(
        &self,
        mut request: Request<pb::ConfirmForgotPasswordRequest>,
    ) -> Result<Response<pb::ConfirmForgotPasswordResponse>, Status> {
        let call = claim(&mut request)?;
        let reply = self
            .service
            .confirm_forgot_password(call, request.into_inner())
            .await;
        render(reply.map(|()| pb::ConfirmForgotPasswordResponse {}))
    }
}
