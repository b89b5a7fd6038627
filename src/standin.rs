//! A stand-in inference upstream for `serve --demo`, tests and load tests.
//!
//! It answers every request with `200` and a JSON echo of what it received:
//! `{"ok": true, "method": ..., "path": ..., "headers": {...}, "body_bytes": N}`.
//! Query parameters steer it: `status=NNN` (answer with that status), `sleep_ms=N` (wait before
//! answering), `video_ms=`, `video_fps=`, `video_lines=`, `image_count=` (echoed back as the
//! `x-usage-*` headers of SPEC §4, a field for each value: `image_count=1&image_count=2` gives
//! the field twice). `/ok` answers a bare `ok` (for load tests).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/ok" {
        return Ok(Response::new(Full::new(Bytes::from_static(b"ok\n"))));
    }
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let q = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if let Some(ms) = q("sleep_ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms.min(600_000))).await;
    }
    let status = q("status").and_then(|v| v.parse::<u16>().ok()).and_then(|s| StatusCode::from_u16(s).ok());
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let mut headers = serde_json::Map::new();
    for (name, value) in req.headers() {
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            Some(serde_json::Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&v);
            }
            _ => {
                headers.insert(name.as_str().to_string(), serde_json::Value::String(v));
            }
        }
    }
    let body_bytes = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => 0,
    };
    let body = serde_json::json!({
        "ok": true, "method": method, "path": path, "headers": headers, "body_bytes": body_bytes,
    });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status.unwrap_or(StatusCode::OK);
    let h = resp.headers_mut();
    h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    for (param, header) in [
        ("video_ms", "x-usage-video-ms"),
        ("video_fps", "x-usage-video-fps"),
        ("video_lines", "x-usage-video-lines"),
        ("image_count", "x-usage-image-count"),
    ] {
        for v in query.iter().filter(|(n, _)| n == param).filter_map(|(_, v)| http::HeaderValue::from_str(v).ok()) {
            h.append(header, v);
        }
    }
    Ok(resp)
}

/// Serves the stand-in on `listener` until `stop` changes.
pub async fn serve(listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
            _ = stop.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}

/// Binds the stand-in on `addr` (port 0 for an ephemeral port) and runs it in the background.
pub async fn spawn(addr: SocketAddr) -> std::io::Result<(SocketAddr, watch::Sender<bool>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(serve(listener, rx));
    Ok((local, tx))
}
