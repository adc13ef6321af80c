//! A gRPC client that sends any bytes as a request message, for requests no generated client
//! would build: undecodable, oversized, fuzzed.

use bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Status, client::Grpc};

/// Sends and receives messages as raw bytes.
#[derive(Debug, Clone, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

/// The headers of a gRPC call of `method` to `target`, for a raw HTTP/2 client that sends the
/// message (or part of it) itself.
pub fn http2_request(target: &str, method: &str) -> http::Request<()> {
    http::Request::post(format!(
        "http://{target}/passwordrecovery.v1.PasswordRecovery/{method}"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap()
}

/// Calls `/passwordrecovery.v1.PasswordRecovery/{method}` with `message` as the request bytes.
pub async fn call(channel: Channel, method: &str, message: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    let path = format!("/passwordrecovery.v1.PasswordRecovery/{method}")
        .parse()
        .unwrap();
    grpc.unary(tonic::Request::new(message), path, RawCodec)
        .await
        .map(tonic::Response::into_inner)
}
