//! Leader election on a `coordination.k8s.io` Lease, so that of several controller replicas one
//! reconciles at a time. The holder renews the lease every third of its duration; another
//! replica takes it only once it has not been renewed for a whole duration. Every write names
//! the resourceVersion it read, so two replicas racing for one lease cannot both win: the API
//! server refuses the second (409). (The CSI service answers on every replica: the
//! external-provisioner elects its own leader and calls only its own controller.)

use crate::error::{ControllerError, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use std::time::Duration;

pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaseLock {
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> Self {
        LeaseLock { api: Api::namespaced(client, namespace), name: name.into(), identity: identity.into(), duration }
    }

    /// Takes or renews the lease at time `now`; true while this replica holds it.
    pub async fn try_acquire_or_renew(&self, now: Timestamp) -> Result<bool> {
        let what = format!("lease {}", self.name);
        let secs = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await.map_err(|e| ControllerError::kube(&what, &e))? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if conflict(&e) => Ok(false),
                Err(e) => Err(ControllerError::kube(&what, &e)),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let held_for = SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(secs).into());
        let expired = match &spec.renew_time {
            Some(t) => t.0.checked_add(held_for).map_or(true, |until| until < now),
            None => true,
        };
        if !mine && !expired && spec.holder_identity.is_some() {
            return Ok(false);
        }
        if !mine {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(secs);
        // The replace carries the resourceVersion we read: a racing writer gets 409.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => {
                if !mine {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became the leader");
                }
                Ok(true)
            }
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(ControllerError::kube(&what, &e)),
        }
    }

    /// Keeps trying to lead, sending whether this replica leads on `leading` after each round,
    /// until the receiver is gone. An error counts as not leading.
    pub async fn run(self, leading: tokio::sync::watch::Sender<bool>) {
        let every = self.duration / 3;
        loop {
            let now_leading = match self.try_acquire_or_renew(Timestamp::now()).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "leader election round failed");
                    false
                }
            };
            if leading.send(now_leading).is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use std::sync::{Arc, Mutex};

    /// One Lease as the API server keeps it: optimistic concurrency on resourceVersion.
    #[derive(Default)]
    struct Store {
        lease: Option<serde_json::Value>,
        version: u64,
        writes: u64,
    }

    fn status(code: u16, reason: &str) -> serde_json::Value {
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason})
    }

    /// A client whose requests go to `store`.
    fn client(store: Arc<Mutex<Store>>) -> kube::Client {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = http_body_util::BodyExt::collect(body).await.map(|b| b.to_bytes()).unwrap_or_default();
                let (code, out) = {
                    let mut s = store.lock().unwrap();
                    match parts.method.as_str() {
                        "GET" => match &s.lease {
                            Some(l) => (200, l.clone()),
                            None => (404, status(404, "NotFound")),
                        },
                        "POST" if s.lease.is_some() => (409, status(409, "AlreadyExists")),
                        "PUT" | "POST" => {
                            let mut l: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                            let theirs = l["metadata"]["resourceVersion"].as_str().map(String::from);
                            if parts.method == "PUT" && theirs != Some(s.version.to_string()) {
                                (409, status(409, "Conflict"))
                            } else {
                                s.version += 1;
                                s.writes += 1;
                                l["metadata"]["resourceVersion"] = serde_json::json!(s.version.to_string());
                                s.lease = Some(l.clone());
                                (if parts.method == "POST" { 201 } else { 200 }, l)
                            }
                        }
                        _ => (405, status(405, "MethodNotAllowed")),
                    }
                };
                send.send_response(Response::builder().status(code).body(Body::from(serde_json::to_vec(&out).unwrap())).unwrap());
            }
        });
        kube::Client::new(svc, "default")
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    /// Two replicas against one Lease: exactly one leads; it keeps leading while it renews; the
    /// other takes over only after the lease expired, and the first then stands aside.
    #[tokio::test]
    async fn one_of_two_leads() {
        let store = Arc::new(Mutex::new(Store::default()));
        let d = Duration::from_secs(15);
        let a = LeaseLock::new(client(store.clone()), "kube-system", "lazy-image-controller", "a", d);
        let b = LeaseLock::new(client(store.clone()), "kube-system", "lazy-image-controller", "b", d);
        let (ra, rb) = tokio::join!(a.try_acquire_or_renew(at(0)), b.try_acquire_or_renew(at(0)));
        assert!(ra.unwrap() ^ rb.unwrap(), "exactly one leads");
        // Make `a` the leader for what follows, whichever won the race.
        let (first, second) =
            if store.lock().unwrap().lease.as_ref().unwrap()["spec"]["holderIdentity"] == "a" { (&a, &b) } else { (&b, &a) };
        for t in [5, 10, 15, 20] {
            assert!(first.try_acquire_or_renew(at(t)).await.unwrap(), "the holder renews at {t}");
            assert!(!second.try_acquire_or_renew(at(t)).await.unwrap(), "the other waits at {t}");
        }
        // The holder stops renewing (it died); a whole duration after its last renewal the
        // other takes over, and the old holder, back, does not.
        assert!(!second.try_acquire_or_renew(at(34)).await.unwrap(), "not expired yet");
        assert!(second.try_acquire_or_renew(at(36)).await.unwrap(), "expired: taken over");
        assert!(!first.try_acquire_or_renew(at(37)).await.unwrap(), "the old holder stands aside");
        let l = store.lock().unwrap().lease.clone().unwrap();
        assert_eq!(l["spec"]["leaseTransitions"], 1);
    }

    /// Two replicas that both read an expired lease and both try to take it: the API server's
    /// resourceVersion check lets one through.
    #[tokio::test]
    async fn a_race_for_an_expired_lease_has_one_winner() {
        let store = Arc::new(Mutex::new(Store::default()));
        let d = Duration::from_secs(15);
        let old = LeaseLock::new(client(store.clone()), "ns", "l", "old", d);
        assert!(old.try_acquire_or_renew(at(0)).await.unwrap());
        let a = LeaseLock::new(client(store.clone()), "ns", "l", "a", d);
        let b = LeaseLock::new(client(store.clone()), "ns", "l", "b", d);
        let (ra, rb) = tokio::join!(a.try_acquire_or_renew(at(100)), b.try_acquire_or_renew(at(100)));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(ra ^ rb, "one winner: a {ra}, b {rb}");
    }
}
