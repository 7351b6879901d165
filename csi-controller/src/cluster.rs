//! What the controller reads of the cluster: a claim's annotations, LazyImages, Secrets. A
//! trait, so that provisioning is tested without an API server; `KubeCluster` is the real one,
//! `NoCluster` stands in where the controller runs without one (a StorageClass `url` still works).

use crate::crd::LazyImage;
use crate::error::{ControllerError, Kind, Result};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use kube::api::Api;
use std::collections::{BTreeMap, HashMap};

#[async_trait::async_trait]
pub trait Cluster: Send + Sync + 'static {
    /// The annotations of claim `namespace/name`.
    async fn claim_annotations(&self, namespace: &str, name: &str) -> Result<BTreeMap<String, String>>;
    /// The LazyImage `name`, `None` if there is none.
    async fn lazy_image(&self, name: &str) -> Result<Option<LazyImage>>;
    /// The data of Secret `namespace/name`, as strings.
    async fn secret(&self, namespace: &str, name: &str) -> Result<HashMap<String, String>>;
    /// Records a Normal event on claim `namespace/name` (best effort: never fails the caller).
    async fn note_on_claim(&self, namespace: &str, name: &str, reason: &str, note: &str);
}

pub struct KubeCluster {
    pub client: kube::Client,
    pub recorder: kube::runtime::events::Recorder,
}

#[async_trait::async_trait]
impl Cluster for KubeCluster {
    async fn claim_annotations(&self, namespace: &str, name: &str) -> Result<BTreeMap<String, String>> {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), namespace);
        let pvc = api.get(name).await.map_err(|e| ControllerError::kube(&format!("reading claim {namespace}/{name}"), &e))?;
        Ok(pvc.metadata.annotations.unwrap_or_default())
    }

    async fn lazy_image(&self, name: &str) -> Result<Option<LazyImage>> {
        let api: Api<LazyImage> = Api::all(self.client.clone());
        api.get_opt(name).await.map_err(|e| ControllerError::kube(&format!("reading LazyImage {name}"), &e))
    }

    async fn secret(&self, namespace: &str, name: &str) -> Result<HashMap<String, String>> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let s = api.get(name).await.map_err(|e| ControllerError::kube(&format!("reading Secret {namespace}/{name}"), &e))?;
        let mut out = HashMap::new();
        for (k, v) in s.data.unwrap_or_default() {
            let v =
                String::from_utf8(v.0).map_err(|_| ControllerError::invalid(format!("Secret {namespace}/{name}: key {k} is not text")))?;
            out.insert(k, v);
        }
        Ok(out)
    }

    async fn note_on_claim(&self, namespace: &str, name: &str, reason: &str, note: &str) {
        use kube::runtime::events::{Event, EventType};
        let claim = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("PersistentVolumeClaim".into()),
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            ..Default::default()
        };
        let ev =
            Event { type_: EventType::Normal, reason: reason.into(), note: Some(note.into()), action: "Provision".into(), secondary: None };
        if let Err(e) = self.recorder.publish(&ev, &claim).await {
            tracing::warn!(claim = %format!("{namespace}/{name}"), error = %e, "cannot record an event on the claim");
        }
    }
}

/// No Kubernetes API (run outside a cluster): only StorageClass parameters name images.
pub struct NoCluster;

fn no_api(what: &str) -> ControllerError {
    ControllerError::new(
        Kind::FailedPrecondition,
        format!("{what}: the controller runs without a Kubernetes API (no kubeconfig or in-cluster account)"),
    )
}

#[async_trait::async_trait]
impl Cluster for NoCluster {
    async fn claim_annotations(&self, namespace: &str, name: &str) -> Result<BTreeMap<String, String>> {
        Err(no_api(&format!("reading claim {namespace}/{name}")))
    }
    async fn lazy_image(&self, name: &str) -> Result<Option<LazyImage>> {
        Err(no_api(&format!("reading LazyImage {name}")))
    }
    async fn secret(&self, namespace: &str, name: &str) -> Result<HashMap<String, String>> {
        Err(no_api(&format!("reading Secret {namespace}/{name}")))
    }
    async fn note_on_claim(&self, _namespace: &str, _name: &str, _reason: &str, _note: &str) {}
}
