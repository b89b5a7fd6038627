//! HTTP/1.1 on raw sockets, for tests about bytes on the wire (an HTTP client hides them).

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 response read off a raw socket.
#[derive(Debug)]
pub struct RawReply {
    /// Everything before the final response's head: interim (1xx) responses, if any.
    pub interim: String,
    pub status: u16,
    pub head: String,
    /// The body, decoded from its framing (`Content-Length`, chunked, or until the close).
    pub body: Vec<u8>,
    /// A chunked body's trailer section, as sent (its field lines; empty without trailers).
    pub trailers: String,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn error_code(&self) -> String {
        assert_eq!(self.header("content-type"), Some("application/json"), "{}", self.head);
        let v = self.json();
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "error message: {v}");
        v["error"]["code"].as_str().unwrap_or_default().to_string()
    }
}

/// A client connection that keeps what it read beyond one response (pipelined answers).
pub struct Wire<S = TcpStream> {
    pub s: S,
    buf: Vec<u8>,
}

impl Wire<TcpStream> {
    pub async fn connect(addr: std::net::SocketAddr) -> Wire {
        Wire { s: TcpStream::connect(addr).await.expect("connect"), buf: Vec::new() }
    }
}

impl<S: AsyncRead + Unpin> Wire<S> {
    pub fn new(s: S) -> Wire<S> {
        Wire { s, buf: Vec::new() }
    }

    /// Reads one complete response within `limit` (a response to HEAD when `head_request`:
    /// no body, whatever its fields say); an error says what went wrong (reset, EOF, timeout).
    pub async fn reply_to(&mut self, head_request: bool, limit: Duration) -> Result<RawReply, String> {
        let deadline = Instant::now() + limit;
        let mut interim = String::new();
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let status: u16 = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| format!("no status line in {head:?}"))?;
                if (100..200).contains(&status) {
                    interim.push_str(&head);
                    interim.push_str("\r\n\r\n");
                    self.buf.drain(..end + 4);
                    continue;
                }
                let field = |name: &str| {
                    head.lines().skip(1).find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                    })
                };
                let rest = &self.buf[end + 4..];
                let framed = if head_request || status == 204 || status == 304 {
                    Some((Vec::new(), 0, String::new()))
                } else if field("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
                    dechunk(rest)?
                } else if let Some(len) = field("content-length") {
                    let len: usize = len.parse().map_err(|_| format!("bad content-length in {head:?}"))?;
                    (rest.len() >= len).then(|| (rest[..len].to_vec(), len, String::new()))
                } else {
                    None // until the close, below
                };
                if let Some((body, used, trailers)) = framed {
                    self.buf.drain(..end + 4 + used);
                    return Ok(RawReply { interim, status, head, body, trailers });
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.s.read(&mut chunk)).await {
                Err(_) => {
                    return Err(format!(
                        "no complete response within {limit:?}; got {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ))
                }
                Ok(Err(e)) => return Err(format!("read failed: {e}; got {:?}", String::from_utf8_lossy(&self.buf))),
                Ok(Ok(0)) => {
                    // A body that ends with the connection.
                    if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                        let no_length = !head.to_ascii_lowercase().contains("\r\ncontent-length:")
                            && !head.to_ascii_lowercase().contains("\r\ntransfer-encoding:");
                        if no_length {
                            let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                            let body = self.buf[end + 4..].to_vec();
                            self.buf.clear();
                            return Ok(RawReply { interim, status, head, body, trailers: String::new() });
                        }
                    }
                    return Err(format!("EOF; got {:?}", String::from_utf8_lossy(&self.buf)));
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    pub async fn reply(&mut self, limit: Duration) -> Result<RawReply, String> {
        self.reply_to(false, limit).await
    }

    /// True when the peer closed the connection (EOF) within `limit`, with nothing more sent.
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        let mut b = [0u8; 1];
        matches!(tokio::time::timeout(limit, self.s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
    }
}

/// Reads one complete response off `s` (see [`Wire::reply`]); bytes beyond it are lost.
pub async fn read_reply(s: &mut TcpStream, limit: Duration) -> Result<RawReply, String> {
    Wire::new(s).reply(limit).await
}

/// A chunked body decoded: `Some((body, bytes used, trailer section))` once its last chunk and
/// trailers are in.
fn dechunk(data: &[u8]) -> Result<Option<(Vec<u8>, usize, String)>, String> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(eol) = data[at..].windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
        let line = String::from_utf8_lossy(&data[at..at + eol]);
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {line:?}"))?;
        at += eol + 2;
        if size == 0 {
            // Trailers, up to an empty line.
            let start = at;
            loop {
                let Some(eol) = data[at..].windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
                at += eol + 2;
                if eol == 0 {
                    let trailers = String::from_utf8_lossy(&data[start..at - 2]).into_owned();
                    return Ok(Some((body, at, trailers)));
                }
            }
        }
        if data.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&data[at..at + size]);
        at += size + 2;
    }
}
