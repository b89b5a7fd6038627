//! The admin listener (SPEC §8): health, readiness, metrics without auth; `/admin/v1/*` behind
//! `Authorization: Bearer $TURNSTILE_ADMIN_TOKEN` (constant-time compared).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::admission::{self, LimitSource};
use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::http_util::{bearer_token, error_response, ProxyBody};
use crate::time::format_rfc3339;

pub const TOKEN_ENV: &str = "TURNSTILE_ADMIN_TOKEN";

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut r = Response::new(Either::Left(Full::new(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<ProxyBody> {
    respond(status, "application/json", v.to_string())
}

fn error(e: &ApiError) -> Response<ProxyBody> {
    error_response(e, &[])
}

/// 405 with the methods the endpoint takes in `Allow` (RFC 9110 §15.5.6: a 405 must list them).
fn not_allowed(allow: &'static str) -> Response<ProxyBody> {
    let e = ApiError::MethodNotAllowed(format!("use {}", allow.split(", ").next().unwrap_or(allow)));
    error_response(&e, &[(header::ALLOW, HeaderValue::from_static(allow))])
}

/// Checks the bearer token against the environment. Both sides are hashed first, so the
/// comparison takes the same time whatever the lengths.
fn authorize(req: &Request<Incoming>) -> Result<(), ApiError> {
    // Trimmed like the caller's token (a Secret file's trailing newline is no part of it); a
    // blank token is no token.
    let Some(expected) = std::env::var(TOKEN_ENV).ok().map(|t| t.trim_ascii().to_string()).filter(|t| !t.is_empty())
    else {
        return Err(ApiError::AdminDisabled);
    };
    let given = bearer_token(req.headers()).unwrap_or(b"");
    let a: [u8; 32] = Sha256::digest(expected.as_bytes()).into();
    let b: [u8; 32] = Sha256::digest(given).into();
    if bool::from(a.ct_eq(&b)) && !given.is_empty() {
        Ok(())
    } else {
        Err(ApiError::AdminUnauthorized)
    }
}

pub async fn handle(conn: Arc<crate::server::Conn>, req: Request<Incoming>) -> Response<ProxyBody> {
    let gw = &conn.gw;
    let path = req.uri().path().to_string();
    // HEAD is GET without the body (RFC 9110 §9.3.2): hyper sends the head only.
    let method = if req.method() == Method::HEAD { Method::GET } else { req.method().clone() };
    match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => respond(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => {
            // Not ready while ledger commits fail (SPEC §7), ready again once one succeeds.
            if gw.ready.load(Ordering::SeqCst) && gw.billing.healthy() {
                respond(StatusCode::OK, "text/plain", "ready\n")
            } else {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            // Balances and image counts as the store holds them (SPEC §10 agrees with §9).
            gw.billing.refresh_gauges(&gw.snapshot.load());
            respond(StatusCode::OK, "text/plain; version=0.0.4", gw.metrics.render())
        }
        (_, "/healthz" | "/readyz" | "/metrics") => not_allowed("GET, HEAD"),
        (_, p) if p.starts_with("/admin/v1/") => {
            if let Err(e) = authorize(&req) {
                return error(&e);
            }
            admin_v1(gw, req, method, &path["/admin/v1/".len()..]).await
        }
        _ => error(&ApiError::NotFound(format!("no admin endpoint at {path}"))),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UpgradeBody {
    qps: u32,
    until: Option<String>,
}

async fn json_body(req: Request<Incoming>) -> Result<UpgradeBody, ApiError> {
    use http_body_util::BodyExt;
    const LIMIT: usize = 64 * 1024;
    let body = http_body_util::Limited::new(req.into_body(), LIMIT)
        .collect()
        .await
        .map_err(|e| match e.downcast_ref::<http_body_util::LengthLimitError>() {
            Some(_) => ApiError::BodyTooLarge { limit: LIMIT as u64 },
            None => ApiError::BadRequest(format!("cannot read the body: {e}")),
        })?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("the body must be JSON like {{\"qps\": 50}}: {e}")))
}

fn write_result(r: Result<serde_json::Value, crate::reload::WriteError>) -> Response<ProxyBody> {
    match r {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => {
            let mut body = json!({"error": {"code": e.code(), "message": e.to_string()}});
            if let crate::reload::WriteError::Config(errors) = &e {
                body["error"]["errors"] = json!(errors.0);
            }
            json_response(e.status(), &body)
        }
    }
}

async fn admin_v1(gw: &Gateway, req: Request<Incoming>, method: Method, rest: &str) -> Response<ProxyBody> {
    let parts: Vec<&str> = rest.split('/').collect();
    let query = req.uri().query().map(str::to_string);
    match (&method, parts.as_slice()) {
        (&Method::POST, ["reload"]) => match gw.reload("admin API").await {
            Ok(generation) => json_response(StatusCode::OK, &json!({"generation": generation})),
            Err(errors) => json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                &json!({"error": {
                    "code": "invalid_config",
                    "message": format!("the configuration was not applied ({} errors); still serving generation {}", errors.0.len(), gw.generation()),
                    "errors": errors.0,
                }}),
            ),
        },
        (&Method::GET, ["tenants", t, "limits"]) => limits(gw, t).await,
        (&Method::GET, ["tenants", t, "usage"]) => usage(gw, t, query.as_deref()).await,
        (&Method::POST, ["tenants", t, "qps-plans", f, op @ ("temporary-upgrade" | "upgrade")]) => {
            let (t, f, op) = (t.to_string(), f.to_string(), *op);
            let body = match json_body(req).await {
                Ok(b) => b,
                Err(e) => return error(&e),
            };
            match (op, body.until) {
                ("temporary-upgrade", Some(until)) => {
                    write_result(gw.temporary_upgrade(&t, &f, body.qps, &until).await)
                }
                ("temporary-upgrade", None) => {
                    error(&ApiError::BadRequest("a temporary upgrade needs \"until\"".into()))
                }
                (_, None) => write_result(gw.upgrade(&t, &f, body.qps).await),
                (_, Some(_)) => error(&ApiError::BadRequest("an upgrade is permanent: leave out \"until\"".into())),
            }
        }
        (_, ["reload"] | ["tenants", _, "qps-plans", _, "temporary-upgrade" | "upgrade"]) => not_allowed("POST"),
        (_, ["tenants", _, "limits" | "usage"]) => not_allowed("GET, HEAD"),
        _ => error(&ApiError::NotFound(format!("no admin endpoint at /admin/v1/{rest}"))),
    }
}

/// Per feature the tenant can call or holds a plan for: the limit now, its source, the plan and
/// the temporary upgrades active now.
async fn limits(gw: &Gateway, tenant: &str) -> Response<ProxyBody> {
    let snap = gw.snapshot.load_full();
    let Some(t) = snap.tenant(tenant) else {
        return error(&ApiError::NotFound(format!("no tenant {tenant:?}")));
    };
    let now = gw.clock.unix_nanos();
    let tz = snap.settings.timezone;
    let catalog = &snap.catalog;
    let mut features = serde_json::Map::new();
    for (i, f) in catalog.features.iter().enumerate() {
        let activated = t.activated(f.family);
        let has_plan = t.plans.iter().any(|p| p.feature == i);
        if !activated && !has_plan {
            continue;
        }
        let op = (i == catalog.image_search_feature).then_some(crate::config::gateway::ImageOp::Search);
        let limit = admission::limit_at(catalog, &snap.settings, t, i, op, now);
        let active = t.active_plan(i, now);
        let plan = active.map(|p| {
            json!({
                "qps": p.qps,
                "effective_at": format_rfc3339(p.effective_at, tz),
                "expires_at": format_rfc3339(p.expires_at, tz),
            })
        });
        let upgrades: Vec<_> = active
            .map(|p| {
                p.upgrades
                    .iter()
                    .filter(|u| u.from <= now && now < u.until)
                    .map(|u| json!({"qps": u.qps, "from": format_rfc3339(u.from, tz), "until": format_rfc3339(u.until, tz)}))
                    .collect()
            })
            .unwrap_or_default();
        let mut entry = json!({
            "limit": limit.qps,
            "source": limit.source,
            "capped": limit.capped,
            "activated": activated,
            "plan": plan,
            "active_upgrades": upgrades,
            "burst": admission::depth(limit.qps, snap.settings.burst_seconds),
        });
        if let (LimitSource::ImageSearch, Some(inst)) = (limit.source, t.image_search.as_ref()) {
            entry["delete_limit"] = json!(catalog.image_search.delete_qps);
            entry["capacity"] = json!(inst.capacity);
            entry["images"] = match gw.billing.images_shared(t).await {
                Ok(v) => json!(v.count()),
                Err(e) => return error(&ApiError::StoreUnavailable { reason: e.to_string() }),
            };
            entry["expires_at"] = json!(format_rfc3339(inst.expires_at, tz));
        }
        features.insert(f.id.clone(), entry);
    }
    json_response(StatusCode::OK, &json!({ "tenant": t.name, "generation": snap.generation, "features": features }))
}

/// `month=YYYY-MM`, or the current month in the billing timezone.
fn month_param(query: Option<&str>, default: String) -> Result<String, ApiError> {
    let Some(m) = query.unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("month=")) else {
        return Ok(default);
    };
    let b = m.as_bytes();
    let ok = b.len() == 7
        && b[4] == b'-'
        && b[..4].iter().chain(&b[5..]).all(u8::is_ascii_digit)
        && matches!(m[5..].parse::<u8>(), Ok(1..=12));
    if ok {
        Ok(m.to_string())
    } else {
        Err(ApiError::BadRequest(format!("month {m:?} must be written YYYY-MM, e.g. 2026-01")))
    }
}

/// The usage report of SPEC §9.
async fn usage(gw: &Gateway, tenant: &str, query: Option<&str>) -> Response<ProxyBody> {
    let snap = gw.snapshot.load_full();
    let Some(t) = snap.tenant(tenant) else {
        return error(&ApiError::NotFound(format!("no tenant {tenant:?}")));
    };
    let tz = snap.settings.timezone;
    let month = match month_param(query, crate::ledger::month_of(gw.clock.unix_nanos(), tz)) {
        Ok(m) => m,
        Err(e) => return error(&e),
    };
    match crate::report::usage(&snap, &gw.billing, t, &month).await {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => error(&ApiError::StoreUnavailable { reason: e.to_string() }),
    }
}
