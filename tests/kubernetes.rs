//! The Kubernetes examples (`deploy/kubernetes/sidecar`, `deploy/kubernetes/cluster`) agree with
//! what the binary expects: every manifest parses and is listed in its kustomization; container
//! ports are the ConfigMap's listen ports; the probes and the Prometheus annotations name paths
//! the admin listener serves, on its port; the `--config` path, the catalog and entitlements it
//! names and the ConfigMap mount line up; the ledger is on a writable volume under a read-only
//! root filesystem; the termination grace covers the gateway's shutdown; and the ConfigMap's
//! files pass `turnstile check` and serve: the real binary answers the probes and a tenant call.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use http::StatusCode;
use serde_norway::Value;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");

struct Doc {
    file: String,
    v: Value,
}

/// Every document of every `*.yaml` in `dir`, after checking that the kustomization lists
/// exactly those files.
fn load(dir: &str) -> Vec<Doc> {
    let dir = Path::new(ROOT).join(dir);
    let mut files: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("manifest folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    assert!(files.remove("kustomization.yaml"), "{}: no kustomization.yaml", dir.display());
    let kust: Value =
        serde_norway::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).expect("read")).expect("yaml");
    assert_eq!(kust["kind"].as_str(), Some("Kustomization"));
    let listed: BTreeSet<String> = kust["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("resource name").to_string())
        .collect();
    assert_eq!(listed, files, "{}: kustomization resources vs the folder's files", dir.display());
    let mut docs = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(dir.join(f)).expect("read manifest");
        for d in serde_norway::Deserializer::from_str(&text) {
            let v = <Value as serde::Deserialize>::deserialize(d).unwrap_or_else(|e| panic!("{f}: {e}"));
            if v.is_null() {
                continue;
            }
            for key in ["apiVersion", "kind"] {
                assert!(v[key].as_str().is_some(), "{f}: a document without {key}");
            }
            assert!(v["metadata"]["name"].as_str().is_some(), "{f}: a document without metadata.name");
            docs.push(Doc { file: f.clone(), v });
        }
    }
    docs
}

fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Value {
    let hits: Vec<&Doc> =
        docs.iter().filter(|d| d.v["kind"].as_str() == Some(kind) && d.v["metadata"]["name"] == name).collect();
    assert_eq!(hits.len(), 1, "exactly one {kind} {name:?}");
    &hits[0].v
}

fn only<'a>(docs: &'a [Doc], kind: &str) -> &'a Value {
    let hits: Vec<&Doc> = docs.iter().filter(|d| d.v["kind"].as_str() == Some(kind)).collect();
    assert_eq!(hits.len(), 1, "exactly one {kind}, found {:?}", hits.iter().map(|d| &d.file).collect::<Vec<_>>());
    &hits[0].v
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(|s| s.as_slice()).unwrap_or(&[])
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in {addr:?}"))
}

/// A probe's or Service's port (a number or a container port's name) as a number.
fn resolve_port(container: &Value, port: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = port.as_str().expect("port is a number or a name");
    seq(&container["ports"])
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {name:?}"))
}

fn arg_after(container: &Value, flag: &str) -> Option<String> {
    let args: Vec<&str> = seq(&container["args"]).iter().filter_map(|a| a.as_str()).collect();
    args.iter().position(|a| *a == flag).and_then(|i| args.get(i + 1)).map(|s| s.to_string())
}

/// `path` resolved against the main file's folder, as the gateway does.
fn resolve(config_dir: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        config_dir.join(p)
    }
}

/// What one variant's manifests say, once checked against each other.
struct Variant {
    docs: Vec<Doc>,
    /// The ConfigMap's files, by name.
    files: Vec<(String, String)>,
    main: toml::Value,
    replicas: u64,
}

impl Variant {
    fn file(&self, name: &str) -> &str {
        &self.files.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("ConfigMap has no {name}")).1
    }
}

fn check_variant(dir: &str) -> Variant {
    let docs = load(dir);
    let deployment = only(&docs, "Deployment");
    let replicas = deployment["spec"]["replicas"].as_u64().expect("spec.replicas");
    let template = &deployment["spec"]["template"];
    let pod = &template["spec"];
    let containers = seq(&pod["containers"]);
    let gw = containers
        .iter()
        .find(|c| seq(&c["args"]).first().and_then(|a| a.as_str()) == Some("serve"))
        .expect("a container running `turnstile serve`");

    // The Deployment selects its own pods, and so does the Service.
    let labels = template["metadata"]["labels"].as_mapping().expect("pod labels");
    for (k, v) in deployment["spec"]["selector"]["matchLabels"].as_mapping().expect("matchLabels") {
        assert_eq!(labels.get(k), Some(v), "the Deployment selector matches its pod labels");
    }

    // --config names turnstile.toml in the folder where the ConfigMap is mounted.
    let config = PathBuf::from(arg_after(gw, "--config").expect("serve --config PATH"));
    let config_dir = config.parent().expect("config folder").to_path_buf();
    let mounts = seq(&gw["volumeMounts"]);
    let volumes = seq(&pod["volumes"]);
    let volume = |name: &Value| volumes.iter().find(|v| v["name"] == *name).expect("the mount's volume");
    let config_mount = mounts
        .iter()
        .find(|m| m["mountPath"].as_str().map(Path::new) == Some(config_dir.as_path()))
        .unwrap_or_else(|| panic!("no volume mounted at {} (the --config folder)", config_dir.display()));
    assert!(config_mount["subPath"].is_null(), "a subPath mount would not see ConfigMap updates (reload)");
    let cm_ref = &volume(&config_mount["name"])["configMap"];
    let cm = find(&docs, "ConfigMap", cm_ref["name"].as_str().expect("configMap volume"));
    let data = cm["data"].as_mapping().expect("ConfigMap data");
    // The names the mount makes visible: the items' paths, or every key.
    let files: Vec<(String, String)> = if cm_ref["items"].is_null() {
        data.iter().map(|(k, v)| (k.as_str().expect("key").into(), v.as_str().expect("text").into())).collect()
    } else {
        seq(&cm_ref["items"])
            .iter()
            .map(|i| {
                let key = i["key"].as_str().expect("item key");
                (i["path"].as_str().expect("item path").into(), data[key].as_str().expect("item's data").into())
            })
            .collect()
    };
    let visible = |p: &Path| -> bool {
        p.parent() == Some(config_dir.as_path())
            && files.iter().any(|(n, _)| Some(std::ffi::OsStr::new(n)) == p.file_name())
    };
    assert!(visible(&config), "{} is not a file of the ConfigMap mount", config.display());
    let main_name = config.file_name().and_then(|n| n.to_str()).expect("file name");
    let main_text = &files.iter().find(|(n, _)| n == main_name).expect("main file").1;
    let main: toml::Value = toml::from_str(main_text).expect("the ConfigMap's turnstile.toml parses");
    for (key, default) in [("catalog", "catalog.toml"), ("entitlements", "entitlements.json")] {
        let name = main.get("files").and_then(|f| f.get(key)).and_then(|v| v.as_str()).unwrap_or(default);
        let p = resolve(&config_dir, name);
        assert!(visible(&p), "files.{key} = {name:?} is {} inside the pod: not in the ConfigMap mount", p.display());
    }

    // Ports: the container's ports are the listen ports.
    let server = &main["server"];
    let listen = port_of(server["listen"].as_str().expect("server.listen"));
    let admin = port_of(server.get("admin_listen").and_then(|v| v.as_str()).unwrap_or("127.0.0.1:9090"));
    for addr in [&server["listen"], &server["admin_listen"]] {
        assert!(addr.as_str().is_some_and(|a| a.starts_with("0.0.0.0:")), "{addr} must listen on the pod network");
    }
    let ports: BTreeSet<u64> = seq(&gw["ports"]).iter().filter_map(|p| p["containerPort"].as_u64()).collect();
    assert_eq!(ports, BTreeSet::from([listen, admin]), "container ports == server.listen and server.admin_listen");
    assert_eq!(resolve_port(gw, &Value::from("http")), listen, "port \"http\" is the tenant listener");
    assert_eq!(resolve_port(gw, &Value::from("admin")), admin, "port \"admin\" is the admin listener");

    // Probes on the admin listener, on paths it serves.
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &gw[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe} path");
        assert_eq!(resolve_port(gw, &get["port"]), admin, "{probe} is on the admin port");
    }
    let ann = &template["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(ann["prometheus.io/port"].as_str(), Some(admin.to_string().as_str()), "scrape the admin port");
    assert_eq!(ann["prometheus.io/path"].as_str(), Some("/metrics"));

    // Non-root as in the Dockerfile, read-only root, resources on every container.
    let sec = |c: &Value, key: &str| {
        if c["securityContext"][key].is_null() {
            pod["securityContext"][key].clone()
        } else {
            c["securityContext"][key].clone()
        }
    };
    for c in containers {
        let name = c["name"].as_str().unwrap_or("?");
        assert_eq!(sec(c, "runAsNonRoot").as_bool(), Some(true), "{name}: runAsNonRoot");
        assert_eq!(sec(c, "runAsUser").as_u64(), Some(10001), "{name}: uid 10001 like the Dockerfile");
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"].as_bool(), Some(true), "{name}: read-only root");
        for k in ["requests", "limits"] {
            for r in ["cpu", "memory"] {
                assert!(!c["resources"][k][r].is_null(), "{name}: resources.{k}.{r}");
            }
        }
    }

    // The ledger folder is on a writable volume that outlives the container.
    let ledger_dir = resolve(
        &config_dir,
        main.get("ledger").and_then(|l| l.get("dir")).and_then(|d| d.as_str()).unwrap_or("data/ledger"),
    );
    let ledger_mount = mounts
        .iter()
        .filter(|m| ledger_dir.starts_with(m["mountPath"].as_str().unwrap_or("\0")))
        .max_by_key(|m| m["mountPath"].as_str().map_or(0, str::len))
        .unwrap_or_else(|| panic!("ledger.dir {} is on the read-only root filesystem", ledger_dir.display()));
    assert_ne!(ledger_mount["readOnly"].as_bool(), Some(true), "the ledger mount must be writable");
    let lv = volume(&ledger_mount["name"]);
    if let Some(claim) = lv["persistentVolumeClaim"]["claimName"].as_str() {
        find(&docs, "PersistentVolumeClaim", claim);
        assert!(
            replicas == 1 && deployment["spec"]["strategy"]["type"] == "Recreate",
            "a ReadWriteOnce ledger claim: one replica, Recreate"
        );
    } else {
        assert!(!lv["emptyDir"].is_null(), "the ledger volume is a PersistentVolumeClaim or an emptyDir");
    }

    // The admin token comes from a Secret that has the key.
    let env = seq(&gw["env"]).iter().find(|e| e["name"] == "TURNSTILE_ADMIN_TOKEN").expect("TURNSTILE_ADMIN_TOKEN");
    let sref = &env["valueFrom"]["secretKeyRef"];
    let secret = find(&docs, "Secret", sref["name"].as_str().expect("secretKeyRef.name"));
    let key = sref["key"].as_str().expect("secretKeyRef.key");
    assert!(!secret["stringData"][key].is_null() || !secret["data"][key].is_null(), "the Secret has {key}");

    // SIGTERM: the pod is given at least the grace, the drain, the last ledger flush and the
    // webhooks still being tried (3 s each), and in cluster mode the settlements on their way
    // to Redis and the fallback's replay (3 s each).
    let ms = |k: &str, d: i64| server.get(k).and_then(|v| v.as_integer()).unwrap_or(d);
    let grace_ms = ms("shutdown_grace_ms", 5000);
    let waits = if main.get("cluster").is_some() { 4 } else { 2 };
    let needed = grace_ms + ms("upstream_timeout_ms", 30000) + 1000 + waits * 3000;
    let tgps = pod["terminationGracePeriodSeconds"].as_i64().expect("terminationGracePeriodSeconds");
    assert!(tgps * 1000 >= needed, "terminationGracePeriodSeconds {tgps} < {needed} ms of shutdown");

    // The inference container is what [server].upstream points at, and outlives the grace.
    let upstream: http::Uri = server["upstream"].as_str().expect("upstream").parse().expect("upstream URL");
    let authority = upstream.authority().expect("authority").as_str().to_string();
    let host = upstream.host().unwrap_or_default();
    assert!(host == "127.0.0.1" || host == "localhost", "the upstream is in the pod: {upstream}");
    let inference = containers.iter().find(|c| c["name"] == "inference").expect("an inference container");
    assert_eq!(seq(&inference["args"]).first().and_then(|a| a.as_str()), Some("stand-in"));
    assert_eq!(arg_after(inference, "--listen").as_deref(), Some(authority.as_str()), "stand-in listens at upstream");
    let sleep = inference["lifecycle"]["preStop"]["sleep"]["seconds"].as_i64().expect("inference preStop sleep");
    assert!(sleep * 1000 > grace_ms, "the inference container must serve on through the gateway's grace");

    // The Service sends tenants to the tenant listener of these pods.
    let svc = docs
        .iter()
        .map(|d| &d.v)
        .find(|v| v["kind"] == "Service" && v["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"])
        .expect("a Service selecting the gateway's pods");
    for p in seq(&svc["spec"]["ports"]) {
        assert_eq!(resolve_port(gw, &p["targetPort"]), listen, "the Service targets the tenant listener");
    }

    Variant { docs, files, main, replicas }
}

/// The ConfigMap's files written to a temp dir, `[cluster]` left out when `strip_cluster`.
fn write_files(v: &Variant, strip_cluster: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, text) in &v.files {
        let text = if strip_cluster { without_table(text, "cluster") } else { text.clone() };
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    dir
}

/// `text` without the `[name]` table (its header up to the next table header).
fn without_table(text: &str, name: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            skipping = t.starts_with(&format!("[{name}]"));
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn check(main: &Path) -> (bool, String) {
    let out = Command::new(BIN).arg("check").arg("--config").arg(main).output().expect("run check");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// Serves the variant's files (listeners on loopback ephemeral ports, the ledger in a temp dir,
/// the upstream a stand-in) and asks the real binary what the kubelet, Prometheus and a tenant
/// would.
async fn serve_and_probe(v: &Variant) {
    let dir = write_files(v, true);
    let up = Upstream::start().await;
    let main_path = dir.path().join("turnstile.toml");
    let server = &v.main["server"];
    let mut text = std::fs::read_to_string(&main_path).expect("read");
    for (from, to) in [
        (server["listen"].as_str().expect("listen").to_string(), "127.0.0.1:0".to_string()),
        (server["admin_listen"].as_str().expect("admin_listen").to_string(), "127.0.0.1:0".to_string()),
        (server["upstream"].as_str().expect("upstream").to_string(), up.url()),
        (
            v.main["ledger"]["dir"].as_str().expect("ledger.dir").to_string(),
            dir.path().join("ledger").display().to_string(),
        ),
    ] {
        let quoted = format!("{from:?}");
        assert_eq!(text.matches(&quoted).count(), 1, "{quoted} once in turnstile.toml");
        text = text.replace(&quoted, &format!("{to:?}"));
    }
    std::fs::write(&main_path, text).expect("write");
    let gw = Gateway::start_with(&["--config", main_path.to_str().expect("utf-8")], &[], dir.path());
    let c = client();
    let deployment = only(&v.docs, "Deployment");
    let gwc = seq(&deployment["spec"]["template"]["spec"]["containers"])
        .iter()
        .find(|c| c["args"][0] == "serve")
        .expect("gateway container")
        .clone();
    for probe in ["readinessProbe", "livenessProbe"] {
        let path = gwc[probe]["httpGet"]["path"].as_str().expect("path");
        assert_eq!(get(&c, &gw.admin_url(path), &[]).await.status, StatusCode::OK, "{probe} {path}");
    }
    let metrics = get(&c, &gw.admin_url("/metrics"), &[]).await;
    assert_eq!(metrics.status, StatusCode::OK);
    // The example tenant can call the first route (its key is the demo key, `turnstile hash-key`).
    let route = v.main["routes"][0]["path"].as_str().expect("routes[0].path");
    let r = post(&c, &gw.url(route), &[("x-api-key", "demo-acme-key")], b"{}").await;
    assert_eq!(r.status, StatusCode::OK, "{route}: {}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["ok"], true, "answered by the stand-in upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_manifests_agree_with_the_binary() {
    let v = check_variant("sidecar");
    assert!(v.main.get("cluster").is_none(), "the sidecar variant runs the embedded store");
    let dir = write_files(&v, false);
    let (ok, out) = check(&dir.path().join("turnstile.toml"));
    assert!(ok, "turnstile check on the ConfigMap's files:\n{out}");
    serve_and_probe(&v).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_manifests_agree_with_the_binary_and_the_spec() {
    let v = check_variant("cluster");
    let sidecar = check_variant("sidecar");
    for f in ["catalog.toml", "entitlements.json"] {
        assert_eq!(v.file(f), sidecar.file(f), "{f}: the two variants' ConfigMaps hold the same file");
    }

    // [cluster] as SPEC §11 writes it.
    let cluster = v.main.get("cluster").expect("[cluster]");
    let keys: BTreeSet<&str> = cluster.as_table().expect("table").keys().map(String::as_str).collect();
    let spec_keys =
        BTreeSet::from(["store", "redis", "key_prefix", "hold_lease_ms", "on_store_error", "expected_replicas"]);
    assert!(keys.is_subset(&spec_keys), "[cluster] keys {keys:?} beyond SPEC §11's {spec_keys:?}");
    assert_eq!(cluster["store"].as_str(), Some("redis"));
    assert!(matches!(cluster["on_store_error"].as_str(), Some("deny" | "local")));
    assert_eq!(cluster["expected_replicas"].as_integer(), Some(v.replicas as i64), "expected_replicas == replicas");
    assert!(v.replicas > 1, "the cluster variant runs several replicas");

    // The Redis it names: the StatefulSet's Service, on Redis's port, AOF fsynced always, on a PVC.
    let urls = cluster["redis"].as_array().expect("cluster.redis");
    assert_eq!(urls.len(), 1, "one URL: a single Redis server");
    let url: http::Uri = urls[0].as_str().expect("URL").parse().expect("redis URL");
    assert_eq!(url.scheme_str(), Some("redis"));
    let sts = only(&v.docs, "StatefulSet");
    let svc = find(&v.docs, "Service", url.host().expect("host"));
    assert_eq!(sts["spec"]["serviceName"], svc["metadata"]["name"], "the StatefulSet's governing Service");
    assert_eq!(svc["spec"]["selector"], sts["spec"]["selector"]["matchLabels"]);
    let redis = &seq(&sts["spec"]["template"]["spec"]["containers"])[0];
    let svc_port = &seq(&svc["spec"]["ports"])[0];
    assert_eq!(svc_port["port"].as_u64(), url.port_u16().map(u64::from), "URL port == Service port");
    let container_port = resolve_port(redis, &svc_port["targetPort"]);
    let conf_mount = seq(&redis["volumeMounts"])
        .iter()
        .find(|m| {
            seq(&redis["command"])
                .iter()
                .any(|a| a.as_str().is_some_and(|a| a.starts_with(m["mountPath"].as_str().unwrap_or("\0"))))
        })
        .expect("redis-server is given a config file from a mount");
    let conf_volume = seq(&sts["spec"]["template"]["spec"]["volumes"])
        .iter()
        .find(|vol| vol["name"] == conf_mount["name"])
        .expect("config volume");
    let conf_cm = find(&v.docs, "ConfigMap", conf_volume["configMap"]["name"].as_str().expect("configMap"));
    let conf = conf_cm["data"]["redis.conf"].as_str().expect("redis.conf");
    let directive = |name: &str| -> Option<String> {
        conf.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name).filter(|r| r.starts_with(' ')).map(|r| r.trim().to_string()))
    };
    assert_eq!(directive("appendonly").as_deref(), Some("yes"), "AOF on");
    assert_eq!(directive("appendfsync").as_deref(), Some("always"), "AOF fsynced on every write (SPEC 11.5)");
    assert_eq!(directive("port").and_then(|p| p.parse().ok()), Some(container_port), "redis.conf port");
    let data_dir = directive("dir").expect("redis.conf dir");
    let data_mount = seq(&redis["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"] == data_dir.as_str())
        .unwrap_or_else(|| panic!("nothing mounted at the AOF dir {data_dir}"));
    assert!(
        seq(&sts["spec"]["volumeClaimTemplates"]).iter().any(|t| t["metadata"]["name"] == data_mount["name"]),
        "the AOF dir is a PersistentVolumeClaim"
    );
    assert_eq!(redis["securityContext"]["readOnlyRootFilesystem"].as_bool(), Some(true));

    // `turnstile check` on the files as they are: it parses [cluster] and connects to the Redis it
    // names, which a test machine cannot reach; every error must be about [cluster]: the rest of
    // the file is checked for real, and served, without it.
    let dir = write_files(&v, false);
    let (ok, out) = check(&dir.path().join("turnstile.toml"));
    if !ok {
        let errors: Vec<&str> = out.lines().filter(|l| l.starts_with(dir.path().to_str().expect("utf-8"))).collect();
        assert!(!errors.is_empty(), "check failed without naming a file:\n{out}");
        assert!(errors.iter().all(|l| l.contains("cluster")), "errors beyond [cluster]:\n{out}");
        eprintln!("notice: the in-cluster Redis of [cluster] is not reachable from here:\n{out}");
    }
    let stripped = write_files(&v, true);
    let (ok, out) = check(&stripped.path().join("turnstile.toml"));
    assert!(ok, "turnstile check on the cluster ConfigMap without [cluster]:\n{out}");
    serve_and_probe(&v).await;
}
