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

/// POSTs each low-balance alert to `[billing].alert_webhook` (read at send time), off the
/// request path, retrying with exponential backoff.
pub async fn deliver(webhook: impl Fn() -> Option<http::Uri>, mut inbox: Inbox) {
    use http_body_util::Full;
    let client: Client<HttpConnector, Full<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    while let Some(alert) = inbox.rx.recv().await {
        if let Some(url) = webhook() {
            post(&client, &url, &alert).await;
        }
        inbox.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn post(client: &Client<HttpConnector, http_body_util::Full<bytes::Bytes>>, url: &http::Uri, alert: &Alert) {
    let body = bytes::Bytes::from(serde_json::to_vec(alert).unwrap_or_default());
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=6 {
        let req = http::Request::post(url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(body.clone()));
        let ok = match req {
            Ok(req) => matches!(
                tokio::time::timeout(Duration::from_secs(10), client.request(req)).await,
                Ok(Ok(r)) if r.status().is_success()
            ),
            Err(_) => false,
        };
        if ok {
            return;
        }
        if attempt == 6 {
            tracing::error!(tenant = %alert.tenant, package = %alert.package, %url, "low-balance webhook failed 6 times; giving up");
            return;
        }
        tracing::warn!(tenant = %alert.tenant, package = %alert.package, attempt, "low-balance webhook failed; retrying");
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_at_or_below_the_ratio() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        assert!(crossed(d("0.5"), d("0.1"), d("0.2")), "0.1 of 0.5 is exactly 20%");
        assert!(!crossed(d("0.5"), d("0.100001"), d("0.2")));
        assert!(crossed(d("5000"), d("0"), d("0.2")));
    }
}
