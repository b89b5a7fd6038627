//! A real gRPC inference server (tonic) for the tests, and a client for it: the service
//! `inference.GRPCInferenceService`, written out by hand the way tonic-build would generate it
//! (prost-derived messages: no protobuf compiler needed), with a unary, a server-streaming and a bidirectional method.
//! The server reports what the gateway forwarded (tenant header, whether an API key leaked),
//! and does what the request asks: fail with a status, stream N replies, sleep.

use std::net::SocketAddr;
use std::time::Duration;

use tonic::codegen::{http, BoxFuture, BoxStream, Service};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

pub const SERVICE: &str = "inference.GRPCInferenceService";

#[derive(Clone, PartialEq, prost::Message)]
pub struct InferRequest {
    #[prost(string, tag = "1")]
    pub model: String,
    /// Non-zero: answer with this gRPC status (after the replies, for the streaming methods).
    #[prost(int32, tag = "2")]
    pub fail_with: i32,
    /// Server streaming: how many replies.
    #[prost(uint32, tag = "3")]
    pub replies: u32,
    #[prost(uint64, tag = "4")]
    pub sleep_ms: u64,
    #[prost(bytes = "vec", tag = "5")]
    pub payload: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct InferReply {
    #[prost(string, tag = "1")]
    pub model: String,
    #[prost(uint32, tag = "2")]
    pub seq: u32,
    /// The `x-turnstile-tenant` the gateway added.
    #[prost(string, tag = "3")]
    pub tenant: String,
    /// True when an API key (`x-api-key` or `authorization`) reached the server.
    #[prost(bool, tag = "4")]
    pub saw_api_key: bool,
    /// The `te` header the server received.
    #[prost(string, tag = "5")]
    pub te: String,
}

fn seen(md: &tonic::metadata::MetadataMap) -> (String, bool, String) {
    let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    (get("x-turnstile-tenant"), md.contains_key("x-api-key") || md.contains_key("authorization"), get("te"))
}

fn reply(req: &InferRequest, seq: u32, seen: &(String, bool, String)) -> InferReply {
    InferReply { model: req.model.clone(), seq, tenant: seen.0.clone(), saw_api_key: seen.1, te: seen.2.clone() }
}

fn status(code: i32) -> Status {
    Status::new(tonic::Code::from_i32(code), format!("asked to fail with {code}"))
}

#[derive(Clone)]
struct Unary;
impl Service<Request<InferRequest>> for Unary {
    type Response = Response<InferReply>;
    type Error = Status;
    type Future = BoxFuture<Self::Response, Status>;
    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Status>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<InferRequest>) -> Self::Future {
        Box::pin(async move {
            let s = seen(req.metadata());
            let m = req.into_inner();
            tokio::time::sleep(Duration::from_millis(m.sleep_ms)).await;
            if m.fail_with != 0 {
                return Err(status(m.fail_with));
            }
            Ok(Response::new(reply(&m, 0, &s)))
        })
    }
}

#[derive(Clone)]
struct ServerStream;
impl Service<Request<InferRequest>> for ServerStream {
    type Response = Response<BoxStream<InferReply>>;
    type Error = Status;
    type Future = BoxFuture<Self::Response, Status>;
    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Status>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<InferRequest>) -> Self::Future {
        Box::pin(async move {
            let s = seen(req.metadata());
            let m = req.into_inner();
            let mut items: Vec<Result<InferReply, Status>> = (0..m.replies).map(|i| Ok(reply(&m, i, &s))).collect();
            if m.fail_with != 0 {
                items.push(Err(status(m.fail_with)));
            }
            let stream: BoxStream<InferReply> = Box::pin(tokio_stream::iter(items));
            Ok(Response::new(stream))
        })
    }
}

#[derive(Clone)]
struct Bidi;
impl Service<Request<Streaming<InferRequest>>> for Bidi {
    type Response = Response<BoxStream<InferReply>>;
    type Error = Status;
    type Future = BoxFuture<Self::Response, Status>;
    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Status>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Streaming<InferRequest>>) -> Self::Future {
        Box::pin(async move {
            let s = seen(req.metadata());
            let mut incoming = req.into_inner();
            // Echo each message as it comes: the answer streams while the request still does.
            let stream = async_stream(move |tx| async move {
                let mut seq = 0;
                while let Some(m) = incoming.message().await.transpose() {
                    let item = m.map(|m| reply(&m, seq, &s));
                    seq += 1;
                    if tx.send(item).await.is_err() {
                        return;
                    }
                }
            });
            Ok(Response::new(stream))
        })
    }
}

/// A stream fed by a task through a channel (what `async-stream` would give).
fn async_stream<F, Fut>(f: F) -> BoxStream<InferReply>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<InferReply, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// The service as tonic-build would generate it: dispatch on the path.
#[derive(Clone)]
pub struct Inference;

impl tonic::server::NamedService for Inference {
    const NAME: &'static str = SERVICE;
}

impl<B> Service<http::Request<B>> for Inference
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;
    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<InferReply, InferRequest>::default());
            // By method name: the gateway's routes put the same service under several packages.
            Ok(match path.rsplit('/').next() {
                Some("ModelInfer") => grpc.unary(Unary, req).await,
                Some("ModelStreamInfer") => grpc.server_streaming(ServerStream, req).await,
                Some("ModelBidiInfer") => grpc.streaming(Bidi, req).await,
                _ => Status::unimplemented(path).into_http(),
            })
        })
    }
}

/// Starts the server on a free loopback port (HTTP/2 cleartext, prior knowledge); it runs
/// until the test's runtime ends.
pub async fn start_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder().serve_with_incoming(Inference, incoming).await;
    });
    addr
}

/// A gRPC client over HTTP/2 prior knowledge to `addr` (the gateway).
pub struct Client {
    grpc: tonic::client::Grpc<tonic::transport::Channel>,
    key: Option<&'static str>,
}

pub fn path(method: &str) -> http::uri::PathAndQuery {
    format!("/{SERVICE}/{method}").parse().expect("path")
}

impl Client {
    pub async fn connect(addr: SocketAddr, key: Option<&'static str>) -> Client {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        Client { grpc: tonic::client::Grpc::new(channel), key }
    }

    fn request<T>(&self, m: T) -> Request<T> {
        let mut r = Request::new(m);
        r.set_timeout(Duration::from_secs(20));
        if let Some(k) = self.key {
            r.metadata_mut().insert("x-api-key", k.parse().expect("key"));
        }
        r
    }

    /// A unary call to `path` (normally [`path`]`("ModelInfer")`).
    pub async fn unary_at(
        &mut self,
        at: http::uri::PathAndQuery,
        m: InferRequest,
    ) -> Result<Response<InferReply>, Status> {
        self.grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
        let req = self.request(m);
        self.grpc.unary(req, at, ProstCodec::default()).await
    }

    pub async fn unary(&mut self, m: InferRequest) -> Result<Response<InferReply>, Status> {
        self.unary_at(path("ModelInfer"), m).await
    }

    /// A server-streaming call: every reply, then the final status.
    pub async fn server_stream(&mut self, m: InferRequest) -> (Vec<InferReply>, Result<(), Status>) {
        self.server_stream_at(path("ModelStreamInfer"), m).await
    }

    /// A server-streaming call to `at`: every reply, then the final status.
    pub async fn server_stream_at(
        &mut self,
        at: http::uri::PathAndQuery,
        m: InferRequest,
    ) -> (Vec<InferReply>, Result<(), Status>) {
        if let Err(e) = self.grpc.ready().await {
            return (Vec::new(), Err(Status::unavailable(e.to_string())));
        }
        let req = self.request(m);
        collect(self.grpc.server_streaming(req, at, ProstCodec::default()).await).await
    }

    /// A bidirectional call: `messages` sent one by one, each only after the previous one's
    /// echo arrived (so the two directions really interleave); every reply, then the status.
    pub async fn bidi(&mut self, messages: Vec<InferRequest>) -> (Vec<InferReply>, Result<(), Status>) {
        if let Err(e) = self.grpc.ready().await {
            return (Vec::new(), Err(Status::unavailable(e.to_string())));
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<InferRequest>(1);
        let req = self.request(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut pending = messages.into_iter();
        let Some(first) = pending.next() else { return (Vec::new(), Ok(())) };
        tx.send(first).await.expect("send");
        let mut stream = match self.grpc.streaming(req, path("ModelBidiInfer"), ProstCodec::default()).await {
            Ok(r) => r.into_inner(),
            Err(s) => return (Vec::new(), Err(s)),
        };
        let mut tx = Some(tx);
        let mut got = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(r)) => {
                    got.push(r);
                    match (pending.next(), tx.as_ref()) {
                        (Some(m), Some(t)) => t.send(m).await.expect("send"),
                        _ => tx = None, // end of the request stream
                    }
                }
                Ok(None) => return (got, Ok(())),
                Err(s) => return (got, Err(s)),
            }
        }
    }
}

async fn collect(r: Result<Response<Streaming<InferReply>>, Status>) -> (Vec<InferReply>, Result<(), Status>) {
    let mut stream = match r {
        Ok(r) => r.into_inner(),
        Err(s) => return (Vec::new(), Err(s)),
    };
    let mut got = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(m)) => got.push(m),
            Ok(None) => return (got, Ok(())),
            Err(s) => return (got, Err(s)),
        }
    }
}
