//! An in-process stand-in for the Kubernetes API server, for tests of the code that talks to it
//! (the node's cache reports, the controller's placement): a `kube::Client` over a store of JSON
//! objects kept by path. It does what those callers use: get, list, create, delete, JSON merge
//! patch (server-side apply is taken as a merge of the applied object), the status subresource,
//! and resourceVersion conflicts. It records every request, and can be taken down (every
//! request answered 503) to show what a caller does without an API server.

use http::{Method, Request, Response};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Resource plurals whose path without a name is a collection (a list).
const PLURALS: &[&str] = &["nodes", "nodecaches", "lazyimages", "events", "leases", "secrets", "persistentvolumeclaims"];

#[derive(Default)]
struct Store {
    objects: BTreeMap<String, Value>,
    version: u64,
    log: Vec<(Method, String, Value)>,
}

#[derive(Clone, Default)]
pub struct FakeApi {
    store: Arc<Mutex<Store>>,
    down: Arc<AtomicBool>,
}

fn status(code: u16, reason: &str, message: String) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": reason, "message": message, "code": code}),
    )
}

/// RFC 7386: `patch` merged into `target`, a null removing a key.
pub fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

impl FakeApi {
    pub fn new() -> Self {
        FakeApi::default()
    }

    /// A client of this fake (default namespace `default`).
    pub fn client(&self) -> kube::Client {
        let api = self.clone();
        let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
            let api = api.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = http_body_util::BodyExt::collect(body).await.map(|b| b.to_bytes()).unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let (code, out) = api.answer(&parts.method, parts.uri.path(), body);
                let resp = Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(out.to_string().into_bytes()));
                resp.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            }
        });
        kube::Client::new(svc, "default")
    }

    /// Takes the API server down (`true`: every request gets 503) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Puts `obj` at `path` (e.g. `/api/v1/nodes/n1`), as an administrator would.
    pub fn put(&self, path: &str, mut obj: Value) {
        let mut s = self.store.lock().unwrap_or_else(|p| p.into_inner());
        s.version += 1;
        obj["metadata"]["resourceVersion"] = json!(s.version.to_string());
        s.objects.insert(path.to_string(), obj);
    }

    /// The object at `path`, if any.
    pub fn get(&self, path: &str) -> Option<Value> {
        self.store.lock().unwrap_or_else(|p| p.into_inner()).objects.get(path).cloned()
    }

    /// Deletes the object at `path`, as an administrator would.
    pub fn remove(&self, path: &str) -> Option<Value> {
        self.store.lock().unwrap_or_else(|p| p.into_inner()).objects.remove(path)
    }

    /// Every request so far: (method, path, body).
    pub fn log(&self) -> Vec<(Method, String, Value)> {
        self.store.lock().unwrap_or_else(|p| p.into_inner()).log.clone()
    }

    /// Writes (anything but GET) so far whose path contains `part`.
    pub fn writes(&self, part: &str) -> usize {
        self.log().iter().filter(|(m, p, _)| *m != Method::GET && p.contains(part)).count()
    }

    fn answer(&self, method: &Method, path: &str, body: Value) -> (u16, Value) {
        let mut s = self.store.lock().unwrap_or_else(|p| p.into_inner());
        s.log.push((method.clone(), path.to_string(), body.clone()));
        if self.down.load(Ordering::SeqCst) {
            return status(503, "ServiceUnavailable", "the API server is down".into());
        }
        let (obj_path, sub) = match path.strip_suffix("/status") {
            Some(p) => (p.to_string(), true),
            None => (path.to_string(), false),
        };
        let last = obj_path.rsplit('/').next().unwrap_or_default();
        let collection = PLURALS.contains(&last);
        match (method.clone(), collection) {
            (Method::GET, true) => {
                let prefix = format!("{obj_path}/");
                let items: Vec<Value> = s
                    .objects
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
                    .map(|(_, v)| v.clone())
                    .collect();
                (200, json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": s.version.to_string()}, "items": items}))
            }
            (Method::GET, false) => match s.objects.get(&obj_path) {
                Some(o) => (200, o.clone()),
                None => status(404, "NotFound", format!("{obj_path} not found")),
            },
            (Method::POST, true) => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default().to_string();
                let at = format!("{obj_path}/{name}");
                if name.is_empty() && !last.eq("events") {
                    return status(422, "Invalid", "metadata.name is required".into());
                }
                if s.objects.contains_key(&at) {
                    return status(409, "AlreadyExists", format!("{at} already exists"));
                }
                s.version += 1;
                let mut obj = body;
                obj["metadata"]["resourceVersion"] = json!(s.version.to_string());
                obj["metadata"]["uid"] = json!(format!("uid-{}", s.version));
                if !last.eq("events") {
                    s.objects.insert(at, obj.clone());
                }
                (201, obj)
            }
            (Method::PATCH, false) | (Method::PUT, false) => {
                let applied = !s.objects.contains_key(&obj_path) && *method == Method::PATCH && !sub;
                let version = s.version + 1;
                if !s.objects.contains_key(&obj_path) {
                    if applied {
                        // Server-side apply of a new object creates it.
                        s.version = version;
                        let mut obj = body;
                        obj["metadata"]["resourceVersion"] = json!(version.to_string());
                        s.objects.insert(obj_path, obj.clone());
                        return (201, obj);
                    }
                    return status(404, "NotFound", format!("{obj_path} not found"));
                }
                let Some(obj) = s.objects.get_mut(&obj_path) else { return status(404, "NotFound", obj_path) };
                let want_rv = body["metadata"]["resourceVersion"].as_str().map(str::to_string);
                if want_rv.is_some() && want_rv.as_deref() != obj["metadata"]["resourceVersion"].as_str() {
                    return status(
                        409,
                        "Conflict",
                        format!("{obj_path}: the object has been modified; apply your changes to the latest version"),
                    );
                }
                let mut patch = body;
                if let Value::Object(p) = &mut patch {
                    if sub {
                        p.retain(|k, _| k == "status");
                    } else {
                        p.remove("status");
                    }
                    if let Some(Value::Object(m)) = p.get_mut("metadata") {
                        m.remove("resourceVersion");
                    }
                }
                if let Value::Array(ops) = &patch {
                    // A JSON patch (RFC 6902), as kube's finalizer helper sends.
                    let mut next = obj.clone();
                    for op in ops {
                        if let Err(why) = json_patch_op(&mut next, op) {
                            return status(422, "Invalid", format!("{obj_path}: {why}"));
                        }
                    }
                    *obj = next;
                } else if *method == Method::PUT {
                    let keep_status = obj.get("status").cloned();
                    let mut next = patch;
                    if let (false, Some(st)) = (sub, keep_status) {
                        next["status"] = st;
                    }
                    *obj = next;
                } else {
                    merge(obj, &patch);
                }
                obj["metadata"]["resourceVersion"] = json!(version.to_string());
                let out = obj.clone();
                s.version = version;
                (200, out)
            }
            (Method::DELETE, false) => match s.objects.remove(&obj_path) {
                Some(o) => (200, o),
                None => status(404, "NotFound", format!("{obj_path} not found")),
            },
            (m, _) => status(405, "MethodNotAllowed", format!("{m} {path}")),
        }
    }
}

/// One RFC 6902 operation (test, add, replace, remove) on `doc`.
fn json_patch_op(doc: &mut Value, op: &Value) -> Result<(), String> {
    let path = op["path"].as_str().ok_or("an operation without a path")?;
    let (parent, last) = path.rsplit_once('/').ok_or("a path without /")?;
    let value = op.get("value").cloned().unwrap_or(Value::Null);
    match op["op"].as_str() {
        Some("test") => (doc.pointer(path) == Some(&value)).then_some(()).ok_or_else(|| format!("test of {path} failed")),
        Some(kind @ ("add" | "replace" | "remove")) => {
            let target = doc.pointer_mut(parent).ok_or_else(|| format!("no {parent}"))?;
            match target {
                Value::Object(m) => {
                    if kind == "remove" {
                        m.remove(last).map(|_| ()).ok_or_else(|| format!("no {path}"))
                    } else {
                        m.insert(last.to_string(), value);
                        Ok(())
                    }
                }
                Value::Array(a) => {
                    let i = if last == "-" { a.len() } else { last.parse::<usize>().map_err(|_| format!("bad index in {path}"))? };
                    match kind {
                        "remove" if i < a.len() => {
                            a.remove(i);
                        }
                        "replace" if i < a.len() => a[i] = value,
                        "add" if i <= a.len() => a.insert(i, value),
                        _ => return Err(format!("index out of range in {path}")),
                    }
                    Ok(())
                }
                _ => Err(format!("{parent} is not a container")),
            }
        }
        other => Err(format!("unsupported operation {other:?}")),
    }
}

/// An empty JSON object, for building test objects.
pub fn object() -> Value {
    Value::Object(Map::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_cache::{NodeCache, NodeCacheSpec};
    use kube::api::{Api, Patch, PatchParams, PostParams};

    #[tokio::test]
    async fn get_list_create_patch_status_and_conflicts() {
        let fake = FakeApi::new();
        let api: Api<NodeCache> = Api::all(fake.client());
        assert!(api.get_opt("n1").await.unwrap().is_none());
        api.create(&PostParams::default(), &NodeCache::new("n1", NodeCacheSpec::default())).await.unwrap();
        let e = api.create(&PostParams::default(), &NodeCache::new("n1", NodeCacheSpec::default())).await.unwrap_err();
        assert!(matches!(e, kube::Error::Api(ref s) if s.code == 409), "{e}");
        let got = api.get("n1").await.unwrap();
        // A status patch touches only status; a stale resourceVersion is refused.
        api.patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"orders": 2}, "spec": {"warm": [{"image": "x", "attributes": {}}]}})),
        )
        .await
        .unwrap();
        let now = api.get("n1").await.unwrap();
        assert_eq!(now.status.as_ref().map(|s| s.orders), Some(2));
        assert!(now.spec.warm.is_empty());
        let stale = json!({"metadata": {"resourceVersion": got.metadata.resource_version}, "spec": {"warm": []}});
        let e = api.patch("n1", &PatchParams::default(), &Patch::Merge(stale)).await.unwrap_err();
        assert!(matches!(e, kube::Error::Api(ref s) if s.code == 409), "{e}");
        assert_eq!(api.list(&Default::default()).await.unwrap().items.len(), 1);
        fake.set_down(true);
        assert!(api.get_opt("n1").await.is_err());
        assert_eq!(fake.writes("nodecaches"), 4);
    }
}
