//! Memory stays bounded at the shipped defaults whatever arrives: each hostile shape is driven
//! against the release binary (many streams holding partial messages, more idle connections
//! than allowed, concurrent largest valid requests, concurrent huge upstream bodies), its peak
//! RSS is held to the README's bound, and afterwards RSS falls back near the idle level within
//! 30 s.
//!
//! The bound, at the shipped defaults (README "Memory", `memory::bound_bytes`):
//!   baseline + MAX_CONNECTIONS × per connection + MAX_CONCURRENT_CALLS × per call
//!   + USERNAME_RATE_LIMIT_MAX_KEYS × per bucket.

mod common;

use std::time::Duration;

use common::process::ServiceProcess;
use common::{CLIENT_ID, FakeCognito, Reply, default_number, forgot, metric, raw};
use password_recovery::proto::v1::password_recovery_client::PasswordRecoveryClient;
use tokio::time::Instant;
use tonic::transport::Channel;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Near the idle level: within 4 MiB of it, or at least two thirds of the load's rise
/// given back (live connections, such as the pool to Cognito, keep some buffers).
fn settled_margin(idle: u64, peak: u64) -> u64 {
    (4 * MIB).max(peak.saturating_sub(idle) / 3)
}

async fn start(cognito: &FakeCognito) -> (ServiceProcess, u64) {
    let service = ServiceProcess::start_release(&[
        ("COGNITO_CLIENT_ID", CLIENT_ID),
        ("COGNITO_CLIENT_SECRET", "memory-test-secret"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", cognito.url.as_str()),
        ("RUST_LOG", "warn,password_recovery::app=info"),
    ])
    .await;
    // Warm up one call so the idle level includes a connection pool to Cognito.
    service
        .client()
        .await
        .forgot_password(forgot("warm"))
        .await
        .unwrap();
    let (idle, _) = service.memory();
    (service, idle)
}

/// Asserts the peak against the bound, then waits (at most 30 s) for RSS to settle near idle.
async fn peak_within_bound_then_settles(service: ServiceProcess, idle: u64, shape: &str) {
    let (_, peak) = service.memory();
    let bound = common::shipped_memory_bound();
    println!(
        "{shape}: idle {} KiB, peak {} KiB, bound {} KiB",
        idle / KIB,
        peak / KIB,
        bound / KIB
    );
    assert!(peak < bound, "{shape}: peak {peak} over the bound {bound}");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (rss, _) = service.memory();
        if rss <= idle + settled_margin(idle, peak) {
            println!("{shape}: settled at {} KiB", rss / KIB);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{shape}: RSS {} KiB 30 s after the load, idle was {} KiB",
            rss / KIB,
            idle / KIB
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    service.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_holding_partial_messages() {
    let cognito = FakeCognito::start().await;
    let (service, idle) = start(&cognito).await;
    let max_request = default_number("MAX_REQUEST_BYTES");
    let mut held = Vec::new();

    // 32 connections × 32 streams, each announcing the largest message and sending half,
    // from four peers: together their shares of the calls fill MAX_CONCURRENT_CALLS.
    let target = service.target.parse().unwrap();
    for i in 0..32 {
        let tcp = common::connect_from(common::peer(i % 4), target)
            .await
            .unwrap();
        let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
        held.push(tokio::spawn(async move {
            let _ = connection.await;
        }));
        for _ in 0..32 {
            let request = raw::http2_request(&service.target, "ForgotPassword");
            let Ok(mut ready) = h2.clone().ready().await else {
                break;
            };
            let Ok((_response, mut stream)) = ready.send_request(request, false) else {
                break;
            };
            let mut partial = vec![0u8; 5 + max_request as usize / 2];
            partial[1..5].copy_from_slice(&(max_request as u32).to_be_bytes());
            let _ = stream.send_data(partial.into(), false);
            held.push(tokio::spawn(async move {
                let _keep = (stream, _response);
                std::future::pending::<()>().await
            }));
        }
    }
    service
        .wait_for_metric("grpc_server_in_flight", &[], |v| {
            v >= default_number("MAX_CONCURRENT_CALLS") as f64
        })
        .await;
    // Past its share, each peer's newest stalled message took the place of its oldest.
    service
        .wait_for_metric("grpc_calls_taken_back_total", &["peer_share"], |v| v >= 1.0)
        .await;

    for task in held {
        task.abort();
    }
    peak_within_bound_then_settles(service, idle, "partial messages").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_idle_connections_than_allowed() {
    let cognito = FakeCognito::start().await;
    let (service, idle) = start(&cognito).await;
    let max_connections = default_number("MAX_CONNECTIONS");
    let per_peer = default_number("MAX_CONNECTIONS_PER_PEER");
    let target = service.target.parse().unwrap();
    let mut held = Vec::new();

    // From enough peers that no one's share is reached: the cap is.
    for i in 0..max_connections + 100 {
        let peer = common::peer((i / (per_peer - 1)) as usize);
        let tcp = common::connect_from(peer, target).await.unwrap();
        if let Ok((client, connection)) = h2::client::handshake(tcp).await {
            held.push((client, tokio::spawn(connection)));
        }
    }
    // None has sent a request: each newcomer past the cap took the place of the oldest.
    service
        .wait_for_metric(
            "grpc_connections_taken_back_total",
            &["max_connections"],
            |v| v >= 100.0,
        )
        .await;
    let metrics = service.scrape().await;
    assert_eq!(
        metric(&metrics, "grpc_connections_open", &[]),
        Some(max_connections as f64),
        "{metrics}"
    );
    // The connections taken back were really closed: their drivers ended.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let closed = held.iter().filter(|(_, c)| c.is_finished()).count();
        if closed >= 100 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {closed} connections closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for (_, connection) in held {
        connection.abort();
    }
    peak_within_bound_then_settles(service, idle, "idle connections").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_largest_valid_requests() {
    let cognito = FakeCognito::start().await;
    let (service, idle) = start(&cognito).await;
    cognito.respond_with(|_| Reply::Held(Box::new(Reply::Ok(serde_json::json!({})))));
    let max_request = default_number("MAX_REQUEST_BYTES") as usize;
    // From eight peers, none past its share of the calls.
    let mut channels = Vec::new();
    for i in 0..8 {
        let channel = Channel::from_shared(format!("http://{}", service.target))
            .unwrap()
            .local_address(Some(common::peer(i)))
            .connect()
            .await
            .unwrap();
        channels.push(channel);
    }
    let mut request = forgot("largest@example.com");
    request
        .client_metadata
        .insert("k".into(), "v".repeat(max_request - 100));
    assert!(prost::Message::encoded_len(&request) <= max_request);

    let calls: Vec<_> = (0..200)
        .map(|i| {
            let mut client = PasswordRecoveryClient::new(channels[i % 8].clone());
            let mut request = request.clone();
            request.username = format!("largest-{i}@example.com");
            tokio::spawn(async move { client.forgot_password(request).await })
        })
        .collect();
    cognito.arrived(1 + 64).await;
    let (_, peak_while_held) = service.memory();

    cognito.release(1000);
    let mut answered = 0;
    for call in calls {
        if call.await.unwrap().is_ok() {
            answered += 1;
        }
    }
    assert!(answered >= 64, "{answered}");
    drop(channels);
    println!(
        "largest requests: peak while held {} KiB",
        peak_while_held / KIB
    );
    peak_within_bound_then_settles(service, idle, "largest requests").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_huge_upstream_bodies() {
    let cognito = FakeCognito::start().await;
    let (service, idle) = start(&cognito).await;
    let channel = Channel::from_shared(format!("http://{}", service.target))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // One call first, so the client has the server's SETTINGS (32 streams) before the burst:
    // streams opened beyond it before then are refused (REFUSED_STREAM) by HTTP/2 itself.
    PasswordRecoveryClient::new(channel.clone())
        .forgot_password(forgot("settings"))
        .await
        .unwrap();
    cognito.respond_with(|_| Reply::Huge(50 << 20));

    let calls: Vec<_> = (0..64)
        .map(|i| {
            let mut client = PasswordRecoveryClient::new(channel.clone());
            tokio::spawn(async move { client.forgot_password(forgot(&format!("h{i}"))).await })
        })
        .collect();
    for call in calls {
        let status = call.await.unwrap().unwrap_err();
        common::assert_error(
            &status,
            tonic::Code::Unavailable,
            "UPSTREAM_INVALID_RESPONSE",
        );
    }

    peak_within_bound_then_settles(service, idle, "huge upstream bodies").await;
}
