//! The LazyImage reconciler: keeps each image resolved (its origin probed: size, validator) and
//! says so in status conditions and Events. A finalizer holds deletion until a placement pass
//! (`warm`) has withdrawn the image's orders to nodes and its node labels.
//!
//! Conditions: `Resolved` (the origin answers with the image), `Degraded` (the origin cannot be
//! reached, or its image changed since the last probe: nodes then drop their caches of the old
//! one, never mix them). Status is written only when it changes.

use crate::cluster::Cluster;
use crate::crd::LazyImage;
use crate::error::{ControllerError, Kind};
use crate::origin::Origin;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::{Resource, ResourceExt};
use lazy_image_csi_common::attributes::Credentials;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const FINALIZER: &str = "lazy-image.csi.dev/cleanup";
/// How often a resolved image's origin is probed again, to notice a changed image.
pub const RESOLVED_EVERY: Duration = Duration::from_secs(600);
/// How soon an image that failed to resolve is tried again.
pub const RETRY_EVERY: Duration = Duration::from_secs(30);
/// A bound on each write to the API server, so a stuck one fails the reconcile (and is retried).
pub use lazy_image_csi_common::API_TIMEOUT;

/// Counters for the metrics endpoint.
#[derive(Default)]
pub struct Metrics {
    pub reconciles: AtomicU64,
    pub errors: AtomicU64,
    pub api_writes: AtomicU64,
}

pub struct Context {
    pub client: kube::Client,
    pub cluster: Arc<dyn Cluster>,
    pub origin: Arc<dyn Origin>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// The placement pass (withdraws a deleted image's orders), if placement runs.
    pub placer: Option<Arc<crate::warm::Placer>>,
}

pub async fn reconcile(li: Arc<LazyImage>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    ctx.metrics.reconciles.fetch_add(1, Ordering::Relaxed);
    let api: Api<LazyImage> = Api::all(ctx.client.clone());
    let name = li.name_any();
    let res = finalizer(&api, FINALIZER, li, |event| async {
        match event {
            Finalizer::Apply(li) => apply(&li, &ctx, &api).await,
            Finalizer::Cleanup(li) => {
                let name = li.name_any();
                if let Some(placer) = &ctx.placer {
                    // The pass withdraws a deleted image's orders and labels.
                    let err = |e: String| ControllerError::new(Kind::Unavailable, e);
                    placer.pass().await.map_err(err)?;
                    if placer.still_ordered(&name).await.map_err(err)? {
                        return Err(ControllerError::new(
                            Kind::Unavailable,
                            format!("LazyImage {name}: nodes are still ordered to keep it; retrying"),
                        ));
                    }
                }
                tracing::info!(image = %name, "LazyImage deleted; no node is ordered to keep it");
                Ok(Action::await_change())
            }
        }
    });
    match tokio::time::timeout(API_TIMEOUT * 2, res).await {
        Ok(Ok(a)) => Ok(a),
        Ok(Err(e)) => Err(ControllerError::new(Kind::Unavailable, format!("LazyImage {name}: {e}"))),
        // The bound covers the finalizer's patches, the origin probe and the status write.
        Err(_) => Err(ControllerError::new(
            Kind::Unavailable,
            format!("LazyImage {name}: the reconcile did not finish within {} s (API server or origin)", (API_TIMEOUT * 2).as_secs()),
        )),
    }
}

/// After an error: count it and try again soon.
pub fn error_policy(li: Arc<LazyImage>, e: &ControllerError, ctx: Arc<Context>) -> Action {
    ctx.metrics.errors.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(image = %li.name_any(), error = %e, "reconcile failed; retrying");
    Action::requeue(RETRY_EVERY)
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

async fn apply(li: &LazyImage, ctx: &Context, api: &Api<LazyImage>) -> Result<Action, ControllerError> {
    let name = li.name_any();
    let generation = li.metadata.generation;
    let old = li.status.clone().unwrap_or_default();
    let mut status = old.clone();
    status.observed_generation = generation;
    let now = now();
    let probe = async {
        let creds = match &li.spec.credentials_secret_ref {
            Some(r) => Credentials::from_secrets(&ctx.cluster.secret(&r.namespace, &r.name).await?)?,
            None => None,
        };
        lazy_image_csi_common::attributes::VolumeSpec::from_attributes(&li.spec.attributes())?;
        ctx.origin.probe(&li.spec.url, creds.as_ref()).await
    };
    let (event, requeue) = match probe.await {
        Ok(info) => {
            let validator = info.etag.clone().or(info.last_modified.clone());
            let changed = old.size.is_some() && (old.size != Some(info.size) || old.validator != validator);
            status.size = Some(info.size);
            status.validator = validator.clone();
            status.set_condition(
                "Resolved",
                true,
                "Probed",
                &format!("{} bytes, validator {}", info.size, validator.as_deref().unwrap_or("none")),
                generation,
                &now,
            );
            let event = if changed {
                let msg = format!(
                    "the image at the origin changed ({:?} {:?} -> {} {:?}); nodes discard their caches of the old one",
                    old.size, old.validator, info.size, validator
                );
                status.set_condition("Degraded", true, "OriginChanged", &msg, generation, &now);
                Some((EventType::Warning, "OriginChanged", msg))
            } else {
                status.set_condition("Degraded", false, "Healthy", "the origin serves the image", generation, &now);
                let was = old.condition("Resolved").map(|c| c.status.as_str());
                (was != Some("True")).then(|| (EventType::Normal, "Resolved", format!("{} resolved: {} bytes", li.spec.url, info.size)))
            };
            (event, RESOLVED_EVERY)
        }
        Err(e) => {
            status.set_condition("Resolved", status.size.is_some(), "ProbeFailed", &e.message, generation, &now);
            status.set_condition("Degraded", true, "ProbeFailed", &e.message, generation, &now);
            let was = old.condition("Degraded").map(|c| (c.status.clone(), c.message.clone()));
            let event = (was != Some(("True".into(), e.message.clone()))).then(|| (EventType::Warning, "ProbeFailed", e.message.clone()));
            (event, RETRY_EVERY)
        }
    };
    if status != old {
        // Only this reconciler's fields: the placement pass writes the others.
        let patch = serde_json::json!({ "status": {
            "size": status.size, "validator": status.validator, "conditions": status.conditions, "observedGeneration": status.observed_generation,
        } });
        let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
        let write = api.patch_status(&name, &params, &patch);
        ctx.metrics.api_writes.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(API_TIMEOUT, write).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(ControllerError::kube(&format!("writing the status of LazyImage {name}"), &e)),
            Err(_) => {
                return Err(ControllerError::new(Kind::Unavailable, format!("writing the status of LazyImage {name}: no answer in time")))
            }
        }
    }
    if let Some((type_, reason, note)) = event {
        let ev = Event { type_, reason: reason.into(), note: Some(note), action: "Resolve".into(), secondary: None };
        ctx.metrics.api_writes.fetch_add(1, Ordering::Relaxed);
        // An event that cannot be written is not worth a retry of the whole reconcile.
        match tokio::time::timeout(API_TIMEOUT, ctx.recorder.publish(&ev, &li.object_ref(&()))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(image = %name, error = %e, "cannot record an event"),
            Err(_) => tracing::warn!(image = %name, "cannot record an event: no answer in time"),
        }
    }
    Ok(Action::requeue(requeue))
}

/// Runs the reconciler over every LazyImage until `stop` resolves.
pub async fn run(ctx: Arc<Context>, stop: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    use futures::StreamExt;
    use kube::runtime::{watcher, Controller};
    let api: Api<LazyImage> = Api::all(ctx.client.clone());
    Controller::new(api, watcher::Config::default().any_semantic())
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile outcome");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{LazyImageSpec, LazyImageStatus, WarmPolicy};
    use crate::origin::Origin;
    use http::{Request, Response};
    use kube::client::Body;
    use kube::runtime::events::Reporter;
    use lazy_image_engine::ImageInfo;
    use std::sync::Mutex;

    /// The origin's answer, settable per test.
    struct FakeOrigin(Mutex<Result<ImageInfo, String>>);

    #[async_trait::async_trait]
    impl Origin for FakeOrigin {
        async fn probe(&self, _url: &str, _c: Option<&Credentials>) -> crate::error::Result<ImageInfo> {
            self.0.lock().unwrap().clone().map_err(|m| ControllerError::new(Kind::Unavailable, m))
        }
    }

    /// What the fake API server answers a request with: a status code and a JSON body.
    type Answer = Box<dyn Fn(&http::Method, &str, &serde_json::Value) -> (u16, serde_json::Value) + Send + Sync>;

    /// A kube client over a mocked API: every request is recorded and answered by `answer`
    /// (a code of 0: never answered).
    /// The requests a mocked API saw: (method, path, JSON body).
    type Seen = Arc<Mutex<Vec<(String, String, serde_json::Value)>>>;

    fn mock_api(answer: Answer) -> (kube::Client, Seen) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        tokio::spawn(async move {
            let mut unanswered = Vec::new();
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = http_body_util::BodyExt::collect(body).await.map(|b| b.to_bytes()).unwrap_or_default();
                let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                let path = parts.uri.path().to_string();
                s.lock().unwrap().push((parts.method.to_string(), path.clone(), json.clone()));
                let (code, out) = answer(&parts.method, &path, &json);
                if code == 0 {
                    unanswered.push(send); // never answered: the caller's timeout must end the wait
                    continue;
                }
                let resp = Response::builder().status(code).body(Body::from(serde_json::to_vec(&out).unwrap())).unwrap();
                send.send_response(resp);
            }
        });
        (kube::Client::new(svc, "default"), seen)
    }

    fn image(finalized: bool, status: Option<LazyImageStatus>) -> LazyImage {
        let mut li = LazyImage::new(
            "model",
            LazyImageSpec {
                url: "http://127.0.0.1:1/model.img".into(),
                format: None,
                digest: None,
                manifest_url: None,
                chunk_size: None,
                credentials_secret_ref: None,
                warm: WarmPolicy::default(),
            },
        );
        li.metadata.generation = Some(3);
        li.metadata.resource_version = Some("7".into());
        li.metadata.uid = Some("uid-1".into());
        if finalized {
            li.metadata.finalizers = Some(vec![FINALIZER.into()]);
        }
        li.status = status;
        li
    }

    fn ok_answer(li: &LazyImage) -> Answer {
        let obj = serde_json::to_value(li).unwrap();
        Box::new(move |_m, path, _b| if path.contains("/events") { (201, serde_json::json!({})) } else { (200, obj.clone()) })
    }

    fn ctx(client: kube::Client, origin: Result<ImageInfo, String>) -> Arc<Context> {
        let reporter = Reporter { controller: "lazy-image-csi-controller".into(), instance: None };
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            cluster: Arc::new(crate::cluster::NoCluster),
            origin: Arc::new(FakeOrigin(Mutex::new(origin))),
            metrics: Arc::new(Metrics::default()),
            placer: None,
        })
    }

    fn v1() -> Result<ImageInfo, String> {
        Ok(ImageInfo { size: 4096, etag: Some("\"v1\"".into()), last_modified: None })
    }

    fn status_patches(seen: &[(String, String, serde_json::Value)]) -> Vec<LazyImageStatus> {
        seen.iter()
            .filter(|(m, p, _)| m == "PATCH" && p.ends_with("/status"))
            .map(|(_, _, b)| serde_json::from_value(b["status"].clone()).unwrap())
            .collect()
    }

    fn events(seen: &[(String, String, serde_json::Value)]) -> Vec<(String, String)> {
        seen.iter()
            .filter(|(m, p, _)| m == "POST" && p.contains("/events"))
            .map(|(_, _, b)| (b["type"].as_str().unwrap_or_default().to_string(), b["reason"].as_str().unwrap_or_default().to_string()))
            .collect()
    }

    /// Reconciles `li` and returns the body of the one request it made: a patch of the object.
    async fn the_only_object_patch(li: LazyImage) -> String {
        let (client, seen) = mock_api(ok_answer(&li));
        reconcile(Arc::new(li), ctx(client, v1())).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        let (m, p, body) = &seen[0];
        assert_eq!((m.as_str(), p.as_str()), ("PATCH", "/apis/lazy-image.csi.dev/v1alpha1/lazyimages/model"));
        body.to_string()
    }

    #[tokio::test]
    async fn a_new_image_gets_the_finalizer_first() {
        let body = the_only_object_patch(image(false, None)).await;
        assert!(body.contains(FINALIZER), "{body}");
    }

    #[tokio::test]
    async fn resolves_into_status_with_an_event_once() {
        let li = image(true, None);
        let (client, seen) = mock_api(ok_answer(&li));
        let c = ctx(client, v1());
        let action = reconcile(Arc::new(li), c.clone()).await.unwrap();
        assert_eq!(action, Action::requeue(RESOLVED_EVERY));
        let seen = seen.lock().unwrap().clone();
        let st = status_patches(&seen);
        assert_eq!(st.len(), 1, "{seen:?}");
        assert_eq!((st[0].size, st[0].validator.as_deref()), (Some(4096), Some("\"v1\"")));
        assert_eq!(st[0].condition("Resolved").unwrap().status, "True");
        assert_eq!(st[0].condition("Degraded").unwrap().status, "False");
        assert_eq!(st[0].observed_generation, Some(3));
        assert_eq!(events(&seen), vec![("Normal".to_string(), "Resolved".to_string())]);

        // Reconciled again with that status: nothing to write, no event.
        let li = image(true, Some(st[0].clone()));
        let (client, seen) = mock_api(ok_answer(&li));
        let c2 = ctx(client, v1());
        reconcile(Arc::new(li), c2.clone()).await.unwrap();
        assert!(seen.lock().unwrap().is_empty(), "{:?}", seen.lock().unwrap());
        assert_eq!(c2.metrics.api_writes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn an_origin_that_fails_or_changes_degrades_the_image() {
        let li = image(true, None);
        let (client, seen) = mock_api(ok_answer(&li));
        let action = reconcile(Arc::new(li), ctx(client, Err("origin down".into()))).await.unwrap();
        assert_eq!(action, Action::requeue(RETRY_EVERY));
        let seen = seen.lock().unwrap().clone();
        let st = &status_patches(&seen)[0];
        assert_eq!(st.condition("Resolved").unwrap().status, "False");
        let d = st.condition("Degraded").unwrap();
        assert_eq!((d.status.as_str(), d.reason.as_str(), d.message.as_str()), ("True", "ProbeFailed", "origin down"));
        assert_eq!(events(&seen), vec![("Warning".to_string(), "ProbeFailed".to_string())]);

        // Resolved at v1 before; the origin now serves another version.
        let mut before = LazyImageStatus { size: Some(4096), validator: Some("\"v1\"".into()), ..Default::default() };
        before.set_condition("Resolved", true, "Probed", "", Some(3), "t0");
        let li = image(true, Some(before));
        let (client, seen) = mock_api(ok_answer(&li));
        let v2 = Ok(ImageInfo { size: 4096, etag: Some("\"v2\"".into()), last_modified: None });
        reconcile(Arc::new(li), ctx(client, v2)).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        let st = &status_patches(&seen)[0];
        assert_eq!(st.validator.as_deref(), Some("\"v2\""));
        assert_eq!(st.condition("Degraded").unwrap().reason, "OriginChanged");
        assert_eq!(st.condition("Resolved").unwrap().last_transition_time, "t0", "still resolved: no transition");
        assert_eq!(events(&seen), vec![("Warning".to_string(), "OriginChanged".to_string())]);
    }

    #[tokio::test]
    async fn deletion_removes_the_finalizer() {
        let mut li = image(true, None);
        li.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
        // The one request is the finalizer's removal: a deleted image is not probed, no status.
        let body = the_only_object_patch(li).await;
        assert!(body.contains("\"remove\""), "a JSON patch removing the finalizer: {body}");
    }

    /// A conflict (409) or a server error on the status write fails the reconcile (the runtime
    /// retries it with the object as it is then); nothing else is written, no event claims it.
    #[tokio::test]
    async fn api_errors_fail_the_reconcile_and_write_nothing_else() {
        for code in [409u16, 500] {
            let li = image(true, None);
            let obj = serde_json::to_value(&li).unwrap();
            let (client, seen) = mock_api(Box::new(move |_m, path, _b| {
                if path.ends_with("/status") {
                    (
                        code,
                        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": code, "message": "the object has been modified"}),
                    )
                } else {
                    (200, obj.clone())
                }
            }));
            let c = ctx(client, v1());
            let e = reconcile(Arc::new(li.clone()), c.clone()).await.unwrap_err();
            assert_eq!(e.kind, Kind::Unavailable, "{e}");
            assert_eq!(error_policy(Arc::new(li), &e, c.clone()), Action::requeue(RETRY_EVERY));
            assert_eq!(c.metrics.errors.load(Ordering::Relaxed), 1);
            let seen = seen.lock().unwrap().clone();
            assert_eq!(seen.len(), 1, "{code}: only the failed status write: {seen:?}");
            assert!(events(&seen).is_empty());
        }
    }

    /// A status write that never gets an answer ends at the timeout.
    #[tokio::test(start_paused = true)]
    async fn a_stuck_api_server_times_out() {
        let li = image(true, None);
        let (client, seen) = mock_api(Box::new(|_m, _p, _b| (0, serde_json::Value::Null)));
        let e = reconcile(Arc::new(li), ctx(client, v1())).await.unwrap_err();
        assert_eq!(e.kind, Kind::Unavailable);
        assert!(e.message.contains("in time"), "{e}");
        assert_eq!(seen.lock().unwrap().len(), 1);
    }
}
