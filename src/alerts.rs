//! Low-balance alerts (SPEC §6): when one fires, and its delivery to the webhook.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rust_decimal::Decimal;

use crate::config::Dec;

/// A low-balance alert, as logged and POSTed to the webhook.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Alert {
    pub tenant: String,
    pub package: String,
    pub points: Dec,
    pub remaining: Dec,
    pub ratio: Dec,
    pub at: String,
}

/// Whether a package's balance is low: `remaining` at or below `ratio` of its `points`. The
/// alert fires the first time this holds (the store's `mark_alerted` makes it once).
pub fn crossed(points: Decimal, remaining: Decimal, ratio: Decimal) -> bool {
    remaining <= points * ratio
}

/// A channel of fired alerts to [`deliver`], counting those not yet through their delivery
/// (delivered, given up, or no webhook set): what SIGTERM waits for.
pub fn channel() -> (Outbox, Inbox) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let pending = Arc::new(AtomicUsize::new(0));
    (Outbox { tx, pending: pending.clone() }, Inbox { rx, pending })
}

/// Where the billing engine sends the alerts it fires.
pub struct Outbox {
    tx: tokio::sync::mpsc::UnboundedSender<Alert>,
    pending: Arc<AtomicUsize>,
}

impl Outbox {
    pub fn send(&self, alert: Alert) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(alert).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Alerts sent and not yet through their delivery.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }
}

/// What [`deliver`] (or a test) takes the alerts from.
pub struct Inbox {
    rx: tokio::sync::mpsc::UnboundedReceiver<Alert>,
    pending: Arc<AtomicUsize>,
}

impl Inbox {
    /// The next alert, taken as handled.
    pub fn try_recv(&mut self) -> Result<Alert, tokio::sync::mpsc::error::TryRecvError> {
        let a = self.rx.try_recv()?;
        self.pending.fetch_sub(1, Ordering::SeqCst);
        Ok(a)
    }
}

/// Webhook deliveries under way at once: a dead or slow endpoint holds at most this many.
const IN_FLIGHT: usize = 16;

/// POSTs each low-balance alert to `[billing].alert_webhook` (read at send time), off the
/// request path, retrying with exponential backoff. Each alert is delivered by a task of its own
/// (at most [`IN_FLIGHT`] at once), so one alert's retries do not hold back the others; an
/// alert counts as pending until its delivery is through.
pub async fn deliver(webhook: impl Fn() -> Option<http::Uri>, mut inbox: Inbox) {
    use http_body_util::Full;
    let client: Client<HttpConnector, Full<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    while let Some(alert) = inbox.rx.recv().await {
        // Never closed, so this waits only for a free slot.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            inbox.pending.fetch_sub(1, Ordering::SeqCst);
            continue;
        };
        let Some(url) = webhook() else {
            inbox.pending.fetch_sub(1, Ordering::SeqCst);
            continue;
        };
        let (client, pending) = (client.clone(), inbox.pending.clone());
        tokio::spawn(async move {
            post(&client, &url, &alert).await;
            drop(slot);
            pending.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// What the webhook made of one try.
enum Answer {
    Delivered,
    /// A 4xx other than 408 and 429: the request itself is refused, and a retry sends the same.
    Refused(http::StatusCode),
    /// A 5xx, 408, 429, another status, a timeout or no connection: worth another try.
    Failed,
}

async fn post(client: &Client<HttpConnector, http_body_util::Full<bytes::Bytes>>, url: &http::Uri, alert: &Alert) {
    let body = bytes::Bytes::from(serde_json::to_vec(alert).unwrap_or_default());
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=6 {
        let req = http::Request::post(url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(body.clone()));
        let answer = match req {
            Ok(req) => match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                Ok(Ok(r)) if r.status().is_success() => Answer::Delivered,
                Ok(Ok(r))
                    if r.status().is_client_error()
                        && !matches!(
                            r.status(),
                            http::StatusCode::REQUEST_TIMEOUT | http::StatusCode::TOO_MANY_REQUESTS
                        ) =>
                {
                    Answer::Refused(r.status())
                }
                _ => Answer::Failed,
            },
            Err(_) => Answer::Failed,
        };
        match answer {
            Answer::Delivered => return,
            Answer::Refused(status) => {
                tracing::error!(tenant = %alert.tenant, package = %alert.package, %url, status = status.as_u16(), attempt, "low-balance webhook refused the alert; giving up (a 4xx is not retried)");
                return;
            }
            Answer::Failed if attempt == 6 => {
                tracing::error!(tenant = %alert.tenant, package = %alert.package, %url, "low-balance webhook failed 6 times; giving up");
                return;
            }
            Answer::Failed => {}
        }
        tracing::warn!(tenant = %alert.tenant, package = %alert.package, attempt, "low-balance webhook failed; retrying");
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Mutex;
    use std::time::Instant;

    use http::StatusCode;
    use http_body_util::BodyExt;

    /// The calls a loopback webhook received: the alert's package, in order.
    type Calls = Arc<Mutex<Vec<String>>>;

    /// A loopback webhook answering each call with `answer(package, nth call for it from 0)`.
    async fn webhook(answer: fn(&str, usize) -> StatusCode) -> (http::Uri, Calls) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let calls: Calls = Arc::default();
        let seen = calls.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = seen.clone();
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                        let package = v["package"].as_str().unwrap_or_default().to_string();
                        let nth = {
                            let mut seen = seen.lock().expect("lock");
                            seen.push(package.clone());
                            seen.iter().filter(|p| **p == package).count() - 1
                        };
                        let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                        *resp.status_mut() = answer(&package, nth);
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
                );
            }
        });
        (format!("http://{addr}/alerts").parse().expect("uri"), calls)
    }

    fn alert(package: &str) -> Alert {
        let d = Dec(Decimal::ONE);
        Alert { tenant: "acme".into(), package: package.into(), points: d, remaining: d, ratio: d, at: String::new() }
    }

    /// The deliverer for `url`, and the outbox to send it alerts.
    fn start(url: http::Uri) -> Outbox {
        let (outbox, inbox) = channel();
        tokio::spawn(deliver(move || Some(url.clone()), inbox));
        outbox
    }

    /// Waits (10 s at most) until no alert is pending: each delivered or given up.
    async fn settled(outbox: &Outbox) {
        let until = Instant::now() + Duration::from_secs(10);
        while outbox.pending() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(outbox.pending(), 0, "not through its delivery within 10 s");
    }

    fn count(calls: &Calls) -> usize {
        calls.lock().expect("lock").len()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_4xx_other_than_408_or_429_is_tried_once() {
        let answers: [fn(&str, usize) -> StatusCode; 3] =
            [|_, _| StatusCode::BAD_REQUEST, |_, _| StatusCode::NOT_FOUND, |_, _| StatusCode::UNPROCESSABLE_ENTITY];
        for answer in answers {
            let (url, calls) = webhook(answer).await;
            let outbox = start(url);
            outbox.send(alert("p1"));
            settled(&outbox).await;
            let refused = answer("p1", 0);
            assert_eq!(count(&calls), 1, "{refused}: the request itself is wrong; retrying will not change it");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_5xx_408_or_429_is_retried_until_delivered() {
        let answers: [fn(&str, usize) -> StatusCode; 3] = [
            |_, n| if n == 0 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK },
            |_, n| if n == 0 { StatusCode::REQUEST_TIMEOUT } else { StatusCode::OK },
            |_, n| if n == 0 { StatusCode::TOO_MANY_REQUESTS } else { StatusCode::OK },
        ];
        for answer in answers {
            let (url, calls) = webhook(answer).await;
            let outbox = start(url);
            outbox.send(alert("p1"));
            settled(&outbox).await;
            assert_eq!(count(&calls), 2, "{:?}: refused once, then delivered", answer("p1", 0));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_alert_the_webhook_keeps_failing_does_not_hold_back_the_next() {
        // p1 is refused with 503 at every try (6 tries over 6.2 s); p2 is taken at once.
        let (url, calls) =
            webhook(|package, _| if package == "p1" { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK }).await;
        let outbox = start(url);
        outbox.send(alert("p1"));
        outbox.send(alert("p2"));
        let sent = Instant::now();
        while !calls.lock().expect("lock").iter().any(|p| p == "p2") {
            assert!(sent.elapsed() < Duration::from_secs(2), "p2 waited for p1's retries: {calls:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // p2's delivery is through while p1 is still backing off.
        while outbox.pending() != 1 {
            assert!(sent.elapsed() < Duration::from_secs(2), "pending: {}", outbox.pending());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn low_at_or_below_the_ratio() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        assert!(crossed(d("0.5"), d("0.1"), d("0.2")), "0.1 of 0.5 is exactly 20%");
        assert!(!crossed(d("0.5"), d("0.100001"), d("0.2")));
        assert!(crossed(d("5000"), d("0"), d("0.2")));
    }
}
