//! HTTP/2 and gRPC through the gateway (SPEC §4), black-box: a real tonic client calls a real
//! tonic server through the `turnstile` binary, HTTP/2 cleartext on both sides
//! (`upstream_protocol = "h2c"`). Unary, server-streaming and bidirectional calls pass; every
//! refusal is a trailers-only gRPC status with the rate-limit fields as headers; a call is
//! charged only when its trailers say OK, and a stream that breaks is not charged.

mod common;
#[path = "common/grpc.rs"]
mod grpc_support;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use grpc_support::{path, start_server, Client, InferRequest};
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use tonic::Code;

const FEATURE: &str = "license-plate-recognition";

/// Payg license plates for gRPC inference; object detection (packages only: 402 without one)
/// and face comparison (a 1 QPS plan: 429 on the second call) for the refusals.
fn catalog() -> String {
    small_catalog(r#"["prepaid_qps"]"#, r#"["payg"]"#, r#"["single_package"]"#, "").replace(
        "[features.license-plate-recognition]\nfamily = \"face_body\"\nbilling = [\"payg\"]",
        "[features.license-plate-recognition]\nfamily = \"face_body\"\nbilling = [\"payg\"]\npayg_tiers = [{ price = \"0.10\" }]",
    )
}

fn tenants() -> String {
    format!(
        r#"{{"tenants": {{
  "acme": {{"api_keys": ["{acme}"], "services": ["face_body"],
    "qps_plans": [{{"feature": "face-comparison-1-1", "qps": 1, "effective_at": "{from}", "expires_at": "{until}"}}]}},
  "globex": {{"api_keys": ["{globex}"], "services": []}}
}}}}"#,
        acme = key_hash("key-acme"),
        globex = key_hash("key-globex"),
        from = at(-3600),
        until = at(86400),
    )
}

const ROUTES: &str = r#"
[admission]
default_qps = 1000
burst_seconds = 1.0

[[routes]]
path = "/inference.GRPCInferenceService/*"
feature = "license-plate-recognition"

[[routes]]
path = "/paid.GRPCInferenceService/*"
feature = "object-detection"

[[routes]]
path = "/limited.GRPCInferenceService/*"
feature = "face-comparison-1-1"
"#;

fn config(upstream: &str, server_extra: &str) -> ConfigDir {
    let server = format!("upstream_protocol = \"h2c\"\nupstream_timeout_ms = 1500\n{server_extra}");
    ConfigDir::new(&main_toml(upstream, &server, ROUTES), &catalog(), &tenants())
}

fn billed(metrics: &str) -> u64 {
    let series = format!(r#"turnstile_billed_units_total{{feature="{FEATURE}",payer="payg",tenant="acme"}} "#);
    metrics.lines().find_map(|l| l.strip_prefix(series.as_str())).map_or(0, |v| v.trim().parse().expect("number"))
}

fn infer(model: &str) -> InferRequest {
    InferRequest { model: model.into(), ..Default::default() }
}

fn header<'a>(s: &'a tonic::Status, name: &str) -> Option<&'a str> {
    s.metadata().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_pass_both_ways_over_h2c_and_are_charged_only_on_ok() {
    let up = start_server().await;
    let cfg = config(&format!("http://{up}"), "");
    let gw = Gateway::start(&cfg);
    let c = client();
    let mut g = Client::connect(gw.addr, Some("key-acme")).await;

    // Unary OK: charged once each; the key is not forwarded, the tenant and `te: trailers` are.
    for i in 0..3 {
        let r = g.unary(infer("plates")).await.expect("unary OK");
        let md = r.metadata();
        assert_eq!(md.get("x-turnstile-payer").and_then(|v| v.to_str().ok()), Some("payg"));
        assert!(md.get("ratelimit").is_some() && md.get("ratelimit-policy").is_some());
        let r = r.into_inner();
        assert_eq!(
            (r.model.as_str(), r.tenant.as_str(), r.saw_api_key, r.te.as_str()),
            ("plates", "acme", false, "trailers")
        );
        assert_eq!(billed(&gw.metrics(&c).await), i + 1, "charged when the OK trailers came");
    }

    // Unary error status (tonic answers it trailers-only, HTTP 200): not charged.
    let e = g.unary(InferRequest { fail_with: Code::Internal as i32, ..infer("x") }).await.expect_err("INTERNAL");
    assert_eq!(e.code(), Code::Internal);
    assert_eq!(billed(&gw.metrics(&c).await), 3);

    // Server streaming: every reply passes, then OK: charged once.
    let (replies, end) = g.server_stream(InferRequest { replies: 5, ..infer("video") }).await;
    assert_eq!(replies.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
    end.expect("OK");
    assert_eq!(billed(&gw.metrics(&c).await), 4);

    // Replies, then an error status in the trailers: HTTP 200 and data were not success.
    let (replies, end) =
        g.server_stream(InferRequest { replies: 3, fail_with: Code::Unavailable as i32, ..infer("video") }).await;
    assert_eq!((replies.len(), end.expect_err("error trailers").code()), (3, Code::Unavailable));
    assert_eq!(billed(&gw.metrics(&c).await), 4);

    // Bidirectional: each message is sent only after the previous echo came back.
    let (replies, end) = g.bidi((0..4).map(|i| infer(&format!("m{i}"))).collect()).await;
    end.expect("OK");
    let models: Vec<_> = replies.iter().map(|r| r.model.as_str()).collect();
    assert_eq!(models, ["m0", "m1", "m2", "m3"]);
    assert_eq!(billed(&gw.metrics(&c).await), 5);

    // The usage report agrees with the metric: units == OK calls.
    let text = gw.metrics(&c).await;
    let admitted = format!(r#"turnstile_requests_total{{feature="{FEATURE}",outcome="admitted",tenant="acme"}} 7"#);
    assert!(text.contains(&admitted), "{admitted}\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_of_a_grpc_call_is_a_trailers_only_grpc_status() {
    let up = start_server().await;
    let cfg = config(&format!("http://{up}"), "max_request_body_bytes = 1024");
    let gw = Gateway::start(&cfg);
    let c = client();
    let mut acme = Client::connect(gw.addr, Some("key-acme")).await;

    let mut anonymous = Client::connect(gw.addr, None).await;
    let e = anonymous.unary(infer("x")).await.expect_err("no key");
    assert_eq!((e.code(), header(&e, "x-turnstile-error")), (Code::Unauthenticated, Some("missing_api_key")));
    assert!(e.message().contains("x-api-key"), "says what to do: {}", e.message());
    let mut stranger = Client::connect(gw.addr, Some("key-nobody")).await;
    assert_eq!(stranger.unary(infer("x")).await.expect_err("bad key").code(), Code::Unauthenticated);

    let mut globex = Client::connect(gw.addr, Some("key-globex")).await;
    let e = globex.unary(infer("x")).await.expect_err("not activated");
    assert_eq!((e.code(), header(&e, "x-turnstile-error")), (Code::PermissionDenied, Some("service_not_activated")));
    assert!(header(&e, "ratelimit").is_some(), "rate-limit fields kept as headers");

    let e = acme.unary_at("/other.Service/Call".parse().unwrap(), infer("x")).await.expect_err("no route");
    assert_eq!(e.code(), Code::Unimplemented);
    let e = acme.unary_at("/inference.GRPCInferenceService%2FModelInfer".parse().unwrap(), infer("x")).await;
    assert_eq!(e.expect_err("bad path").code(), Code::InvalidArgument);

    let e = acme.unary_at("/paid.GRPCInferenceService/ModelInfer".parse().unwrap(), infer("x")).await;
    let e = e.expect_err("nothing can pay");
    assert_eq!((e.code(), header(&e, "x-turnstile-error")), (Code::FailedPrecondition, Some("payment_required")));

    let limited = || path("ModelInfer").as_str().replace("inference.", "limited.").parse().unwrap();
    acme.unary_at(limited(), infer("x")).await.expect("the first call is within 1 QPS");
    let e = acme.unary_at(limited(), infer("x")).await.expect_err("over 1 QPS");
    assert_eq!((e.code(), header(&e, "x-turnstile-error")), (Code::ResourceExhausted, Some("qps_exceeded")));
    assert_eq!(header(&e, "ratelimit-policy"), Some("\"qps\";q=1;w=1"));
    assert!(header(&e, "ratelimit").is_some_and(|v| v.starts_with("\"qps\";r=0;")));
    assert_eq!(header(&e, "retry-after"), Some("1"));
    assert_eq!(header(&e, "x-turnstile-payer"), None, "a 429 reserves no payer");

    // 4 KB in a message over a 1 KB limit: the body has no declared length over HTTP/2, so it
    // is cut off while streaming; still a gRPC status.
    let big = InferRequest { payload: vec![7; 4096], ..infer("x") };
    let e = acme.unary(big).await.expect_err("too large");
    assert_eq!((e.code(), header(&e, "x-turnstile-error")), (Code::ResourceExhausted, Some("body_too_large")));

    // The upstream takes longer than upstream_timeout_ms (1.5 s): DEADLINE_EXCEEDED.
    let e = acme.unary(InferRequest { sleep_ms: 3000, ..infer("slow") }).await.expect_err("timeout");
    assert_eq!((e.code(), header(&e, "x-turnstile-error")), (Code::DeadlineExceeded, Some("upstream_timeout")));

    assert_eq!(billed(&gw.metrics(&c).await), 0, "no refusal is charged");

    // The upstream is not there: UNAVAILABLE.
    let cfg = config(&format!("http://{}", dead_addr()), "");
    let gw = Gateway::start(&cfg);
    let mut acme = Client::connect(gw.addr, Some("key-acme")).await;
    let e = acme.unary(infer("x")).await.expect_err("no upstream");
    assert_eq!((e.code(), header(&e, "x-turnstile-error")), (Code::Unavailable, Some("upstream_unavailable")));
}

/// An HTTP/2 (prior knowledge) upstream on a free loopback port that answers every request
/// with `answer`.
async fn h2_upstream<F, Fut, B>(answer: F) -> std::net::SocketAddr
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<http::Response<B>, std::convert::Infallible>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let svc = hyper::service::service_fn(answer.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// An HTTP/2 upstream that answers a gRPC call with headers and one message, then resets the
/// stream (no trailers): the call broke, and is not charged.
async fn breaking_upstream() -> std::net::SocketAddr {
    h2_upstream(|_req: http::Request<hyper::body::Incoming>| async {
        // One length-prefixed (empty) message, then an error: hyper resets the stream.
        let frames: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = vec![
            Ok(http_body::Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
            Err(std::io::Error::other("the model crashed")),
        ];
        let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
        let resp = http::Response::builder().header("content-type", "application/grpc").body(body).expect("response");
        Ok::<_, std::convert::Infallible>(resp)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_stream_that_breaks_is_not_charged() {
    let up = breaking_upstream().await;
    let cfg = config(&format!("http://{up}"), "");
    let gw = Gateway::start(&cfg);
    let c = client();
    let mut g = Client::connect(gw.addr, Some("key-acme")).await;
    for _ in 0..3 {
        let (_, end) = g.server_stream(InferRequest { replies: 1, ..infer("x") }).await;
        assert_ne!(end.expect_err("the stream broke").code(), Code::Ok);
    }
    let text = gw.metrics(&c).await;
    assert_eq!(billed(&text), 0, "{text}");
}

/// HTTP/1.1 and HTTP/2 (prior knowledge) share the tenant port, for plain HTTP calls too: the
/// same answers, JSON errors and rate-limit fields; an `Upgrade: h2c` request is answered
/// over HTTP/1.1, as RFC 9113 lets a server do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_share_the_tenant_port() {
    let up = Upstream::start().await;
    let rest = "[admission]\ndefault_qps = 2\nburst_seconds = 1.0\n";
    let cfg = ConfigDir::new(&main_toml(&up.url(), "", rest), &catalog(), &tenants());
    let gw = Gateway::start(&cfg);
    let h2: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http();
    let send = |uri: String, key: &'static str| {
        let req = http::Request::post(uri).header("x-api-key", key).body(Full::new(Bytes::from_static(b"{}")));
        let h2 = h2.clone();
        async move {
            let resp = h2.request(req.expect("request")).await.expect("HTTP/2 response");
            assert_eq!(resp.version(), http::Version::HTTP_2);
            let (parts, body) = resp.into_parts();
            (parts, body.collect().await.expect("body").to_bytes())
        }
    };
    let (parts, body) = send(gw.url("/v1/ocr/license-plate"), "key-acme").await;
    assert_eq!(parts.status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(parts.headers["x-turnstile-payer"], "payg");
    let seen: serde_json::Value = serde_json::from_slice(&body).expect("stand-in JSON");
    assert_eq!(seen["headers"]["x-turnstile-tenant"], "acme");
    assert_eq!(seen["path"], "/v1/ocr/license-plate");

    // The same bucket whichever protocol: 2 QPS, depth 2, so a third call at once is a 429.
    let r = post(&client(), &gw.url("/v1/ocr/license-plate"), &[("x-api-key", "key-acme")], b"{}").await;
    assert_eq!(r.status, StatusCode::OK);
    let (parts, body) = send(gw.url("/v1/ocr/license-plate"), "key-acme").await;
    assert_eq!(parts.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(parts.headers["content-type"], "application/json");
    assert!(parts.headers.get("connection").is_none(), "no connection-specific header in HTTP/2");
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON error");
    assert_eq!(v["error"]["code"], "qps_exceeded");
    let (parts, _) = send(gw.url("/v1/ocr/license-plate"), "key-nobody").await;
    assert_eq!(parts.status, StatusCode::UNAUTHORIZED);

    // `Upgrade: h2c` (RFC 7540 §3.2, deprecated by RFC 9113): answered over HTTP/1.1.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(
        b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
          HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nx-api-key: key-acme\r\n\r\n",
    )
    .await
    .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("answer").expect("read");
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

/// An HTTP/2 upstream that answers each request with the names of the request trailers it
/// received, comma-separated, as its body.
async fn trailer_reporting_upstream() -> std::net::SocketAddr {
    h2_upstream(|req: http::Request<hyper::body::Incoming>| async {
        let trailers = req.into_body().collect().await.ok().and_then(|c| c.trailers().cloned());
        let mut names: Vec<String> = trailers.map_or(Vec::new(), |t| t.keys().map(|k| k.to_string()).collect());
        names.sort();
        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(names.join(",")))))
    })
    .await
}

/// A client's request trailers do not reach an HTTP/2 upstream, as they never reach an
/// HTTP/1.1 one: they could carry what the gateway removes from the head (SPEC §4: the API key,
/// `x-turnstile-*`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_do_not_reach_an_h2c_upstream() {
    type Frames = std::vec::IntoIter<Result<http_body::Frame<Bytes>, std::io::Error>>;
    type Streamed = http_body_util::StreamBody<tokio_stream::Iter<Frames>>;
    let up = trailer_reporting_upstream().await;
    let cfg = ConfigDir::new(
        &main_toml(&format!("http://{up}"), "upstream_protocol = \"h2c\"\n", "[admission]\ndefault_qps = 100\n"),
        &catalog(),
        &tenants(),
    );
    let gw = Gateway::start(&cfg);
    let h2: hyper_util::client::legacy::Client<_, Streamed> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-turnstile-tenant", http::HeaderValue::from_static("globex"));
    trailers.insert("x-api-key", http::HeaderValue::from_static("key-acme"));
    trailers.insert("x-note", http::HeaderValue::from_static("kept?"));
    let frames = vec![Ok(http_body::Frame::data(Bytes::from_static(b"{}"))), Ok(http_body::Frame::trailers(trailers))];
    let req = http::Request::post(gw.url("/v1/ocr/license-plate"))
        .header("x-api-key", "key-acme")
        .body(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
        .expect("request");
    let resp = h2.request(req).await.expect("HTTP/2 response");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(String::from_utf8_lossy(&body), "", "request trailers reached the upstream");
}

// ---------------------------------------------------------------------------------------------
// How a gRPC answer is judged.

/// An HTTP/2 upstream answering every gRPC call by its method name (the last path segment):
/// - `HeadOkTrailerInternal`: `grpc-status: 0` in the response head (not a trailers-only
///   answer: a message and trailers follow), then trailers `grpc-status: 13`;
/// - `TrailerZeroSpace`: one message, then trailers `grpc-status: "0 "` (malformed: RFC 9113
///   §8.2.1; tonic, grpc-go and grpc-java all read it as not OK);
/// - `TrailerPlusZero`: one message, then trailers `grpc-status: "+0"`;
/// - `TrailerOk`: one message, then trailers `grpc-status: 0` (the control: charged);
/// - `TrailerOkWithGatewayFields`: the same, its trailers also carrying the gateway's own
///   fields (`x-turnstile-payer`, spelt with `_` too, `x-turnstile-error`, `ratelimit`), a
///   usage report and one of its own (`x-kept`).
async fn judging_upstream() -> std::net::SocketAddr {
    h2_upstream(|req: http::Request<hyper::body::Incoming>| async move {
        let method = req.uri().path().rsplit('/').next().unwrap_or_default().to_string();
        let _ = req.into_body().collect().await;
        // `a|b`: the field twice.
        let trailer = |v: &'static str| {
            let mut t = http::HeaderMap::new();
            for one in v.split('|') {
                t.append("grpc-status", http::HeaderValue::from_static(one));
            }
            t
        };
        let mut head = http::Response::builder().header("content-type", "application/grpc");
        let status = match method.as_str() {
            "HeadOkTrailerInternal" => {
                head = head.header("grpc-status", "0");
                "13"
            }
            "TrailerZeroSpace" => "0 ",
            "TrailerPlusZero" => "+0",
            "TrailerZeroThenInternal" => "0|13",
            _ => "0",
        };
        let mut trailers = trailer(status);
        if method == "TrailerOkWithGatewayFields" {
            for (n, v) in [
                ("x-turnstile-payer", "upstream"),
                ("x-turnstile_payer", "upstream"),
                ("x-turnstile-error", "fake"),
                ("ratelimit", "fake"),
                ("x-usage-image-count", "5"),
                ("x-kept", "yes"),
            ] {
                trailers.insert(n, http::HeaderValue::from_static(v));
            }
        }
        // One empty message (an empty InferReply), then the trailers.
        let frames: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = vec![
            Ok(http_body::Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
        Ok::<_, std::convert::Infallible>(head.body(body).expect("response"))
    })
    .await
}

/// SPEC §4: "A gRPC call is charged only when its trailers carry `grpc-status: 0`." A
/// `grpc-status: 0` in a response head that is not trailers-only (a body and trailers follow)
/// is not the call's status (gRPC's HTTP/2 protocol: Response-Headers carry no status): its
/// trailers say INTERNAL. Nor is a malformed `"0 "` or `"+0"` in the trailers an OK: tonic
/// (this client) reads both as UNKNOWN, grpc-java both as UNKNOWN, grpc-go `"0 "` as malformed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_charged_only_when_the_trailers_say_ok() {
    let up = judging_upstream().await;
    let cfg = config(&format!("http://{up}"), "");
    let gw = Gateway::start(&cfg);
    let c = client();
    let mut g = Client::connect(gw.addr, Some("key-acme")).await;
    let at = |m: &str| format!("/{}/{m}", grpc_support::SERVICE).parse().unwrap();

    // The control: OK trailers, charged.
    g.unary_at(at("TrailerOk"), infer("x")).await.expect("OK");
    assert_eq!(billed(&gw.metrics(&c).await), 1);

    let mut wrongly_charged = Vec::new();
    for method in ["HeadOkTrailerInternal", "TrailerZeroSpace", "TrailerPlusZero", "TrailerZeroThenInternal"] {
        let before = billed(&gw.metrics(&c).await);
        let r = g.unary_at(at(method), infer("x")).await;
        // (tonic reads a `grpc-status` in the head as final and ignores the trailers; grpc-go
        // and the gRPC protocol take the trailers' INTERNAL.)
        let code = r.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
        if billed(&gw.metrics(&c).await) != before {
            wrongly_charged.push(format!("{method} (client saw {code:?})"));
        }
        if method == "TrailerZeroThenInternal" {
            assert_eq!(code, Code::Internal, "grpc-status twice: one error status reaches the client");
        }
    }
    assert!(wrongly_charged.is_empty(), "charged though the trailers do not say OK: {wrongly_charged:?}");
}

/// The trailers of a streamed gRPC answer reach the client as its head does: without the
/// gateway's own fields, so that no tenant reads an upstream's `x-turnstile-payer` trailer as
/// the gateway's statement of who paid (the gateway states it in the head). `grpc-status`,
/// the usage report and the upstream's own fields go on, and the OK is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_fields_of_grpc_trailers_do_not_reach_the_client() {
    let up = judging_upstream().await;
    let cfg = config(&format!("http://{up}"), "");
    let gw = Gateway::start(&cfg);
    let h2: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http();
    let req = http::Request::post(gw.url(&format!("/{}/TrailerOkWithGatewayFields", grpc_support::SERVICE)))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-api-key", "key-acme")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .expect("request");
    let resp = h2.request(req).await.expect("HTTP/2 response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-turnstile-payer"], "payg", "the gateway's statement, in the head");
    let trailers = resp.into_body().collect().await.expect("body").trailers().cloned().expect("trailers");
    for gone in ["x-turnstile-payer", "x-turnstile_payer", "x-turnstile-error", "ratelimit"] {
        assert!(!trailers.contains_key(gone), "the upstream's {gone} trailer reached the client: {trailers:?}");
    }
    for (kept, value) in [("grpc-status", "0"), ("x-usage-image-count", "5"), ("x-kept", "yes")] {
        assert_eq!(trailers.get(kept).and_then(|v| v.to_str().ok()), Some(value), "{trailers:?}");
    }
    assert_eq!(billed(&gw.metrics(&client()).await), 1, "charged on the OK");
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 clients and an h2c upstream; the request's authority across protocols.

/// An HTTP/2-only (prior knowledge) upstream that answers every request 200 with JSON saying
/// what it received: its `:authority`, every `host` field, and the header names.
async fn h2_reporting_upstream() -> std::net::SocketAddr {
    h2_upstream(|req: http::Request<hyper::body::Incoming>| async move {
        let authority = req.uri().authority().map(|a| a.to_string());
        let hosts: Vec<String> =
            req.headers().get_all("host").iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect();
        let names: Vec<String> = req.headers().keys().map(|k| k.to_string()).collect();
        let _ = req.into_body().collect().await;
        let v = serde_json::json!({"authority": authority, "host": hosts, "names": names});
        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(v.to_string()))))
    })
    .await
}

fn h2c_config(up: std::net::SocketAddr) -> ConfigDir {
    ConfigDir::new(
        &main_toml(&format!("http://{up}"), "upstream_protocol = \"h2c\"\n", "[admission]\ndefault_qps = 100\n"),
        &catalog(),
        &tenants(),
    )
}

/// SPEC §3.1/§4: `upstream_protocol = "h2c"` is how the gateway talks to the upstream, whatever
/// the client speaks. A plain HTTP/1.1 request (a small body with its head: the HTTP/1.1 fast
/// path's kind) must reach an HTTP/2-only upstream like the same request with `TE: trailers`
/// (which the fast path hands to hyper) does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_reaches_an_h2c_upstream() {
    let up = h2_reporting_upstream().await;
    let cfg = h2c_config(up);
    let gw = Gateway::start(&cfg);
    let url = gw.url("/v1/ocr/license-plate");
    // Handed to hyper (a `TE` field): forwarded over HTTP/2.
    let r = post(&client(), &url, &[("x-api-key", "key-acme"), ("te", "trailers")], b"{}").await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    // The plain request, on a connection of its own (a connection handed to hyper stays there).
    let r = post(&client(), &url, &[("x-api-key", "key-acme")], b"{}").await;
    assert_eq!(r.status, StatusCode::OK, "plain HTTP/1.1 request: {}", String::from_utf8_lossy(&r.body));
}

/// RFC 9113 §8.3.1: a client MUST NOT send an HTTP/2 request whose `Host` differs from its
/// `:authority`; an intermediary forwarding over HTTP/2 builds `:authority` from the original
/// request's authority. An HTTP/1.1 client's `Host: tenant.example` goes to an h2c upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_authority_agree_towards_an_h2c_upstream() {
    let up = h2_reporting_upstream().await;
    let cfg = h2c_config(up);
    let gw = Gateway::start(&cfg);
    let c = client();
    // `TE: trailers` so the request takes the hyper path (see the test above).
    let r = post(
        &c,
        &gw.url("/v1/ocr/license-plate"),
        &[("x-api-key", "key-acme"), ("host", "tenant.example"), ("te", "trailers")],
        b"{}",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let seen = r.json();
    let authority = seen["authority"].as_str().unwrap_or_default().to_string();
    for host in seen["host"].as_array().expect("hosts") {
        assert_eq!(host.as_str(), Some(authority.as_str()), "host differs from :authority: {seen}");
    }
}

/// The same request judged and forwarded the same over HTTP/1.1 and HTTP/2 (SPEC §4; RFC 9113
/// §8.3.1: an intermediary that builds `Host` for HTTP/1.1 takes it from `:authority`): the
/// authority the client addressed reaches an HTTP/1.1 upstream as `Host` in both cases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_authority_reaches_an_http1_upstream_as_host() {
    let up = Upstream::start().await;
    let rest = "[admission]\ndefault_qps = 100\n";
    let cfg = ConfigDir::new(&main_toml(&up.url(), "", rest), &catalog(), &tenants());
    let gw = Gateway::start(&cfg);
    // HTTP/1.1, Host: tenant.example.
    let r = post(
        &client(),
        &gw.url("/v1/ocr/license-plate"),
        &[("x-api-key", "key-acme"), ("host", "tenant.example")],
        b"{}",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["headers"]["host"], "tenant.example", "HTTP/1.1: the client's Host");
    // HTTP/2, :authority tenant.example (on a connection to the gateway's address).
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let req = http::Request::post("http://tenant.example/v1/ocr/license-plate")
        .header("x-api-key", "key-acme")
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("request");
    let resp = tx.send_request(req).await.expect("HTTP/2 response");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(seen["headers"]["host"], "tenant.example", "HTTP/2: the client's :authority: {seen}");
    // A `host` field beside `:authority` does not override it (RFC 9113 §8.3.1: the Host built
    // from `:authority` replaces any existing one).
    let req = http::Request::post("http://tenant.example/v1/ocr/license-plate")
        .header("x-api-key", "key-acme")
        .header("host", "other.example")
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("request");
    let resp = tx.send_request(req).await.expect("HTTP/2 response");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(seen["headers"]["host"], "tenant.example", "HTTP/2 with a differing host field: {seen}");
}

/// `name{labels} value` of the scrape; 0 when the series is absent.
fn series(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels).and_then(|v| v.strip_prefix(' ')))
        .map_or(0, |v| v.trim().parse().unwrap_or_else(|_| panic!("not a number: {v}")))
}

/// Shadow mode (SPEC §5.5) for gRPC calls: what enforce mode refuses with RESOURCE_EXHAUSTED
/// (429) or FAILED_PRECONDITION (402) reaches the upstream; a would-be 429 is charged as usual
/// when its trailers say OK, a would-be 402 is recorded unpaid; an error status charges and
/// records nothing, as for any gRPC call (SPEC §4). Every other refusal is still a gRPC status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_forwards_grpc_calls_enforce_mode_would_refuse() {
    let up = start_server().await;
    let server = "upstream_protocol = \"h2c\"\nupstream_timeout_ms = 1500\n";
    let rest = ROUTES.replace("burst_seconds = 1.0\n", "burst_seconds = 1.0\nmode = \"shadow\"\n");
    assert_ne!(rest, ROUTES);
    let cfg = ConfigDir::new(&main_toml(&format!("http://{up}"), server, &rest), &catalog(), &tenants());
    let gw = Gateway::start(&cfg);
    let c = client();
    let mut acme = Client::connect(gw.addr, Some("key-acme")).await;
    let at = |pkg: &str| path("ModelInfer").as_str().replace("inference.", pkg).parse().expect("path");

    // Nothing can pay for object detection: forwarded, no payer, recorded unpaid on OK.
    for i in 0..2 {
        let r = acme.unary_at(at("paid."), infer("od")).await.unwrap_or_else(|e| panic!("call {i}: {e:?}"));
        let payer = r.metadata().get("x-turnstile-payer").and_then(|v| v.to_str().ok());
        assert_eq!(payer, Some("unpaid"), "call {i}");
        assert_eq!(r.into_inner().tenant, "acme");
    }
    // An error status: forwarded, but recorded as nothing.
    let e = acme.unary_at(at("paid."), InferRequest { fail_with: Code::Internal as i32, ..infer("od") }).await;
    assert_eq!(e.expect_err("the upstream's INTERNAL").code(), Code::Internal);

    // Over face comparison's 1 QPS: forwarded and paid by the plan, as an admitted call.
    let started = std::time::Instant::now();
    for i in 0..3 {
        let r = acme.unary_at(at("limited."), infer("fc")).await.unwrap_or_else(|e| panic!("call {i}: {e:?}"));
        let payer = r.metadata().get("x-turnstile-payer").and_then(|v| v.to_str().ok());
        assert_eq!(payer, Some("prepaid_qps"), "call {i}");
    }
    let took = started.elapsed();

    // Not a 429 or 402: still refused the gRPC way.
    let mut globex = Client::connect(gw.addr, Some("key-globex")).await;
    let e = globex.unary(infer("x")).await.expect_err("not activated");
    assert_eq!((e.code(), header(&e, "x-turnstile-error")), (Code::PermissionDenied, Some("service_not_activated")));

    let m = gw.metrics(&c).await;
    let requests = |f: &str, outcome: &str| {
        series(&m, &format!(r#"turnstile_requests_total{{feature="{f}",outcome="{outcome}",tenant="acme"}}"#))
    };
    assert_eq!(requests("object-detection", "shadow_payment_required"), 3, "{m}");
    assert_eq!(requests("object-detection", "payment_required"), 0, "{m}");
    let unpaid = r#"turnstile_unpaid_units_total{feature="object-detection",tenant="acme"}"#;
    assert_eq!(series(&m, unpaid), 2, "the two OK calls, not the INTERNAL one: {m}");
    assert!(!m.contains(r#"turnstile_billed_units_total{feature="object-detection""#), "nothing charged: {m}");
    let shadowed = requests("face-comparison-1-1", "shadow_throttled");
    assert_eq!(shadowed + requests("face-comparison-1-1", "admitted"), 3, "{m}");
    assert_eq!(requests("face-comparison-1-1", "throttled"), 0, "{m}");
    if took < Duration::from_secs(1) {
        assert_eq!(shadowed, 2, "{m}");
    }
    let prepaid = r#"turnstile_billed_units_total{feature="face-comparison-1-1",payer="prepaid_qps",tenant="acme"}"#;
    assert_eq!(series(&m, prepaid), 3, "metered as usual: {m}");
}

// ---------------------------------------------------------------------------------------------
// SIGTERM with gRPC calls in flight.

/// An HTTP/2 gRPC upstream whose answers span a SIGTERM, by method (one empty message each
/// time, OK trailers at the end):
/// - `SlowHead`: the whole answer 800 ms after the call (a unary call answered in the drain);
/// - `SlowTrailers`: a message at once, another and the trailers 800 ms later (a server stream
///   open across the signal);
/// - `Late`: a message at once, the trailers 4 s later (past the drain deadline);
/// - `Quick`: a message and the trailers at once;
/// - anything else: a message at once, the trailers 8 s later (past the drain deadline).
async fn timed_upstream() -> std::net::SocketAddr {
    h2_upstream(|req: http::Request<hyper::body::Incoming>| async move {
        let method = req.uri().path().rsplit('/').next().unwrap_or_default().to_string();
        let _ = req.into_body().collect().await;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(4);
        let message = || Ok(http_body::Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0])));
        let ok = || {
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", http::HeaderValue::from_static("0"));
            Ok(http_body::Frame::trailers(t))
        };
        let (first, last) = match method.as_str() {
            "SlowHead" => (800, 0),
            "SlowTrailers" => (0, 800),
            "Late" => (0, 4000),
            "Quick" => (0, 0),
            _ => (0, 8000),
        };
        tokio::time::sleep(Duration::from_millis(first)).await;
        tokio::spawn(async move {
            let _ = tx.send(message()).await;
            tokio::time::sleep(Duration::from_millis(last)).await;
            if last > 0 {
                let _ = tx.send(message()).await;
            }
            let _ = tx.send(ok()).await;
        });
        let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let resp = http::Response::builder().header("content-type", "application/grpc").body(body).expect("response");
        Ok::<_, std::convert::Infallible>(resp)
    })
    .await
}

/// SPEC §7 ("SIGTERM drains in-flight requests and flushes, losing nothing") for gRPC: a unary
/// call and a server stream whose OK trailers come after the SIGTERM are answered OK and
/// charged once each, in the ledger at exit (a 60 s flush window: only the exit's flush puts
/// them there); a stream still open at the drain deadline (`upstream_timeout_ms` + 1 s) is
/// not charged, and its client gets an error, not an OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_in_flight_at_sigterm_are_charged_once_and_a_stream_past_the_drain_is_not() {
    let up = timed_upstream().await;
    let server = "upstream_protocol = \"h2c\"\nupstream_timeout_ms = 1500";
    let rest = format!("[ledger]\ndurability = \"batched\"\nflush_interval_ms = 60000\n{ROUTES}");
    let cfg = ConfigDir::new(&main_toml(&format!("http://{up}"), server, &rest), &catalog(), &tenants());
    let token = [("TURNSTILE_ADMIN_TOKEN", "t")];
    let gw = Gateway::start_env(&cfg, &token);
    let at = |m: &str| format!("/{}/{m}", grpc_support::SERVICE).parse().expect("path");
    let (mut a, mut b, mut c) = (
        Client::connect(gw.addr, Some("key-acme")).await,
        Client::connect(gw.addr, Some("key-acme")).await,
        Client::connect(gw.addr, Some("key-acme")).await,
    );
    let unary = tokio::spawn(async move { a.unary_at(at("SlowHead"), infer("x")).await.map(drop) });
    let stream = tokio::spawn(async move { b.server_stream_at(at("SlowTrailers"), infer("x")).await });
    let endless = tokio::spawn(async move { c.server_stream_at(at("Endless"), infer("x")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = std::time::Instant::now();
    let status = std::process::Command::new("kill").args(["-TERM", &gw.pid().to_string()]).status().expect("kill");
    assert!(status.success());
    unary.await.expect("join").expect("the unary call answered after the signal is OK");
    let (replies, end) = stream.await.expect("join");
    end.expect("the stream whose trailers came after the signal is OK");
    assert_eq!(replies.len(), 2);
    let (replies, end) = endless.await.expect("join");
    let code = end.map_or_else(|s| s.code(), |()| Code::Ok);
    assert_ne!(code, Code::Ok, "a stream cut off at the drain deadline is no OK");
    assert_eq!(replies.len(), 1);
    assert!(signalled.elapsed() >= Duration::from_millis(2400), "cut off at the drain deadline, not before");
    let mut gw = gw;
    let exit = tokio::task::spawn_blocking(move || (gw.wait_exit(Duration::from_secs(5)), gw)).await.expect("join");
    assert!(exit.0.is_some(), "exits: {}", exit.1.logs());
    drop(exit);
    let gw = Gateway::start_env(&cfg, &token);
    let r = get(&client(), &gw.admin_url("/admin/v1/tenants/acme/usage"), &[("authorization", "Bearer t")]).await;
    assert_eq!(r.status, StatusCode::OK);
    let u = r.json();
    assert_eq!(u["features"][FEATURE]["units"]["payg"], "2", "the two OK calls, once each: {}", u["features"]);
}

/// The drain deadline closes the connections still open, as the log says: a stream the upstream
/// ends OK after it must not reach its client as an OK, nor be charged after the ledger's last
/// flush (lost at exit). The exit is held past the deadline here by a low-balance alert that
/// the webhook never takes (up to 3 s, README "Shutdown" step 4): before, the connection went on
/// in that time, the OK trailers were charged in memory after the flush and reached the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_stream_cut_off_at_the_drain_deadline_gets_no_ok_even_while_the_exit_waits() {
    // A webhook that takes connections and never answers.
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hook_url = format!("http://{}/alerts", hook.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hook.accept().await {
            held.push(s);
        }
    });
    let up = timed_upstream().await;
    let server = "upstream_protocol = \"h2c\"\nupstream_timeout_ms = 1500";
    let rest = format!(
        "[ledger]\ndurability = \"batched\"\nflush_interval_ms = 60000\n\n\
         [billing]\nlow_balance_ratio = \"0.2\"\nalert_webhook = \"{hook_url}\"\n{ROUTES}"
    );
    let tenants = format!(
        r#"{{"tenants": {{"acme": {{"api_keys": ["{key}"], "services": ["face_body"],
    "packages": [{{"id": "od-1", "feature": "object-detection", "points": "5", "ordered_at": "{from}", "expires_at": "{until}"}}]}}}}}}"#,
        key = key_hash("key-acme"),
        from = at(-3600),
        until = at(86400),
    );
    let cfg = ConfigDir::new(&main_toml(&format!("http://{up}"), server, &rest), &catalog(), &tenants);
    let token = [("TURNSTILE_ADMIN_TOKEN", "t")];
    let gw = Gateway::start_env(&cfg, &token);
    let at = |m: &str| format!("/{}/{m}", grpc_support::SERVICE).parse().expect("path");
    // Four calls on od-1 (5 points): 1 point left, its low-balance alert fires.
    let mut g = Client::connect(gw.addr, Some("key-acme")).await;
    for _ in 0..4 {
        g.unary_at("/paid.GRPCInferenceService/Quick".parse().expect("path"), infer("x")).await.expect("OK");
    }
    let c = client();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !gw
        .metrics(&c)
        .await
        .contains("turnstile_package_low_balance_alerts_total{package=\"od-1\",tenant=\"acme\"} 1")
    {
        assert!(std::time::Instant::now() < deadline, "the alert did not fire: {}", gw.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A stream whose OK trailers come 4 s after the call: past the drain deadline (1.5 s + 1 s
    // after the signal), while the exit waits for the webhook.
    let late = tokio::spawn(async move { g.server_stream_at(at("Late"), infer("x")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = std::process::Command::new("kill").args(["-TERM", &gw.pid().to_string()]).status().expect("kill");
    assert!(status.success());
    let (_, end) = late.await.expect("join");
    let code = end.map_or_else(|s| s.code(), |()| Code::Ok);
    let mut gw = gw;
    let exit = tokio::task::spawn_blocking(move || (gw.wait_exit(Duration::from_secs(8)), gw)).await.expect("join");
    assert!(exit.0.is_some(), "exits: {}", exit.1.logs());
    drop(exit);
    let gw = Gateway::start_env(&cfg, &token);
    let r = get(&client(), &gw.admin_url("/admin/v1/tenants/acme/usage"), &[("authorization", "Bearer t")]).await;
    let units = r.json()["features"][FEATURE]["units"]["payg"].clone();
    assert!(
        code != Code::Ok && (units.is_null() || units == "0"),
        "a stream still open at the drain deadline: the client saw {code:?}, the ledger charged {units}"
    );
}
