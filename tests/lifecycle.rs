//! Black-box tests of what operators and tools rely on: gRPC health, server reflection (v1 and
//! v1alpha) and graceful shutdown with a call in flight.

mod common;

use std::time::Duration;

use common::{Reply, TestApp, forgot};
use password_recovery::app::AppError;
use prost::Message;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const SERVICE: &str = "passwordrecovery.v1.PasswordRecovery";

async fn health(channel: Channel, service: &str) -> ServingStatus {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check answers")
        .into_inner()
        .status()
}

#[tokio::test]
async fn health_is_serving_for_the_server_and_the_service() {
    let app = TestApp::spawn().await;
    let channel = app.channel().await;
    assert_eq!(health(channel.clone(), "").await, ServingStatus::Serving);
    assert_eq!(
        health(channel.clone(), SERVICE).await,
        ServingStatus::Serving
    );

    let unknown = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

mod reflection_v1 {
    pub use tonic_reflection::pb::v1::ServerReflectionRequest;
    pub use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    pub use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    pub use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
}

mod reflection_v1alpha {
    pub use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    pub use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    pub use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    pub use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
}

async fn reflect_v1(
    channel: Channel,
    request: reflection_v1::MessageRequest,
) -> reflection_v1::MessageResponse {
    use reflection_v1::*;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection answers")
        .into_inner();
    answers
        .message()
        .await
        .expect("one answer")
        .expect("one answer")
        .message_response
        .expect("a response")
}

#[tokio::test]
async fn reflection_v1_lists_every_service() {
    let app = TestApp::spawn().await;
    let response = reflect_v1(
        app.channel().await,
        reflection_v1::MessageRequest::ListServices(String::new()),
    )
    .await;
    let reflection_v1::MessageResponse::ListServicesResponse(list) = response else {
        panic!("unexpected answer {response:?}");
    };
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            SERVICE,
        ]
    );
}

#[tokio::test]
async fn reflection_describes_the_api_with_its_comments_and_the_error_details() {
    let app = TestApp::spawn().await;
    let channel = app.channel().await;

    for symbol in [SERVICE, "google.rpc.ErrorInfo", "grpc.health.v1.Health"] {
        let response = reflect_v1(
            channel.clone(),
            reflection_v1::MessageRequest::FileContainingSymbol(symbol.into()),
        )
        .await;
        let reflection_v1::MessageResponse::FileDescriptorResponse(files) = response else {
            panic!("{symbol}: unexpected answer {response:?}");
        };
        assert!(!files.file_descriptor_proto.is_empty(), "{symbol}");
        if symbol == SERVICE {
            let file =
                prost_types::FileDescriptorProto::decode(&files.file_descriptor_proto[0][..])
                    .unwrap();
            assert_eq!(file.package(), "passwordrecovery.v1");
            let comments: Vec<_> = file
                .source_code_info
                .expect("source info, for grpcurl describe")
                .location
                .into_iter()
                .filter_map(|l| l.leading_comments)
                .collect();
            assert!(
                comments
                    .iter()
                    .any(|c| c.contains("sends the user a confirmation code")),
                "{comments:?}"
            );
        }
    }
}

#[tokio::test]
async fn reflection_v1alpha_answers_for_grpcurl() {
    use reflection_v1alpha::*;
    let app = TestApp::spawn().await;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let answer = ServerReflectionClient::new(app.channel().await)
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected answer");
    };
    assert!(list.service.iter().any(|s| s.name == SERVICE));
}

#[tokio::test]
async fn shutdown_turns_health_not_serving_and_drains_the_call_in_flight() {
    // Arrange: a call whose answer Cognito holds, and 300 ms of NOT_SERVING before closing.
    let mut app = TestApp::spawn_with(&[("SHUTDOWN_DELAY", "300ms")]).await;
    let channel = app.channel().await;
    app.cognito
        .script([Reply::Held(Box::new(Reply::Ok(serde_json::json!({}))))]);
    let mut client =
        password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient::new(
            channel.clone(),
        );
    let in_flight = tokio::spawn(async move { client.forgot_password(forgot("rita")).await });
    app.cognito.arrived(1).await;

    // Act
    app.request_stop();

    // Assert: probes see NOT_SERVING during the delay; then the listener closes while the
    // call is still held; released, the call completes, and the app exits.
    let not_serving = async {
        while health(channel.clone(), "").await != ServingStatus::NotServing {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), not_serving)
        .await
        .expect("health turned NOT_SERVING");
    assert_eq!(
        health(channel.clone(), SERVICE).await,
        ServingStatus::NotServing
    );
    let addr = app.addr;
    let closed = async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("the listener closed after the delay");
    assert!(!in_flight.is_finished(), "the held call ended early");
    app.cognito.release(1);
    let answer = in_flight.await.unwrap();
    assert!(answer.is_ok(), "the in-flight call was dropped: {answer:?}");
    tokio::time::timeout(Duration::from_secs(5), app.stop())
        .await
        .expect("drained in time")
        .expect("clean exit");
    let reconnect = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    assert!(reconnect.is_err(), "still accepting after shutdown");
}

#[tokio::test]
async fn calls_that_outlast_the_grace_period_are_abandoned_and_counted() {
    let mut app = TestApp::spawn_with(&[("SHUTDOWN_GRACE_PERIOD", "200ms")]).await;
    app.cognito
        .script([Reply::Held(Box::new(Reply::Ok(serde_json::json!({}))))]);
    let mut client = app.client().await;
    let hung = tokio::spawn(async move { client.forgot_password(forgot("sam")).await });
    app.cognito.arrived(1).await;

    app.request_stop();
    let stopped = tokio::time::timeout(Duration::from_secs(10), app.stop()).await;

    assert!(
        matches!(stopped, Ok(Err(AppError::Abandoned(1)))),
        "{stopped:?}"
    );
    let answer = hung.await.unwrap();
    assert!(answer.is_err(), "{answer:?}");
}
