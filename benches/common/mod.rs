//! What the request-path benches share: a gateway configuration with many pay-as-you-go tenants,
//! and one call decided and settled as for a 2xx, without sockets.

use http::{HeaderMap, HeaderValue};
use turnstile::config::Texts;
use turnstile::proxy::{decide_now as decide, settle_now, Decision};
use turnstile::server::Gateway;

/// `tenants` tenants `t0..`, each with the API key `key-<i>` and text recognition activated (so
/// `/v1/infer`, license plates, is paid pay-as-you-go); a default limit no benchmark reaches; the
/// ledger in `ledger`.
pub fn texts(tenants: usize, ledger: &std::path::Path) -> Texts {
    texts_keyed(tenants, ledger, |i| format!("key-{i}"))
}

/// [`texts`], tenant `t<i>`'s API key being `key(i)`.
pub fn texts_keyed(tenants: usize, ledger: &std::path::Path, key: impl Fn(usize) -> String) -> Texts {
    let mut ents = String::from("{\"tenants\": {");
    for i in 0..tenants {
        if i > 0 {
            ents.push(',');
        }
        let key = turnstile::hash_key(&key(i));
        ents.push_str(&format!(r#""t{i}": {{"api_keys": ["{key}"], "services": ["text_recognition"]}}"#));
    }
    ents.push_str("}}");
    let main = format!(
        "[server]\nupstream = \"http://127.0.0.1:1\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [admission]\ndefault_qps = 1000000\nburst_seconds = 3600.0\n[ledger]\ndir = \"{}\"\n\
         [[routes]]\npath = \"/v1/infer\"\nfeature = \"license-plate-recognition\"\n",
        ledger.display()
    );
    Texts::in_memory(main, include_str!("../../config/catalog.toml"), ents)
}

/// The request head of a call with API key `key`.
pub fn head(key: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-api-key", HeaderValue::try_from(key).expect("a header value"));
    h
}

/// One call's decision and, as for a 2xx, its settlement; the payer header it answers with.
pub fn decide_and_settle(gw: &Gateway, headers: &HeaderMap, ok: &HeaderMap) -> HeaderValue {
    match decide(gw, headers, "/v1/infer") {
        Decision::Forward(f) => turnstile::store::ready(settle_now(gw, f, ok)).expect("ready").expect("store").payer,
        Decision::Reject(..) => panic!("refused"),
    }
}
