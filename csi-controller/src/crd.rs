//! The `LazyImage` resource (cluster-scoped, `lazy-image.csi.dev/v1alpha1`): an image the
//! cluster knows by name. Claims and StorageClasses name it (`image: NAME`) instead of repeating
//! its URL; the controller resolves it (size, validator) and reports it in status. Its status
//! has two writers, each patching only its own fields: the reconciler (size, validator,
//! conditions) and the placement pass in `warm` (where the image is ordered and cached).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "lazy-image.csi.dev",
    version = "v1alpha1",
    kind = "LazyImage",
    plural = "lazyimages",
    shortname = "li",
    status = "LazyImageStatus",
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".spec.url"}"#,
    printcolumn = r#"{"name":"SIZE","type":"integer","jsonPath":".status.size"}"#,
    printcolumn = r#"{"name":"WARM","type":"integer","jsonPath":".status.warmNodes"}"#,
    printcolumn = r#"{"name":"ORDERED","type":"integer","jsonPath":".status.orderedNodes"}"#,
    printcolumn = r#"{"name":"READY","type":"string","jsonPath":".status.conditions[?(@.type==\"Resolved\")].status"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LazyImageSpec {
    /// Where the image is: an http:// or https:// URL whose server honours Range.
    pub url: String,
    /// auto (default), ext4, erofs or squashfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// sha256:... of the per-chunk manifest: every chunk is verified against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Where the manifest is (default: url + ".manifest" when a digest is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_url: Option<String>,
    /// Cache and fetch unit, e.g. 16K (a manifest sets its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<String>,
    /// A Secret with `bearerToken`, or `username` and `password`, for the origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
    /// Where the image should be kept cached.
    #[serde(default)]
    pub warm: WarmPolicy,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretRef {
    pub name: String,
    pub namespace: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmPolicy {
    /// `None`: cached where pods read it; `Nodes`: kept cached on the nodes below.
    #[serde(default)]
    pub mode: WarmMode,
    /// Nodes whose labels match all of these (none: every node).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// At most this many nodes (none: all that match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_nodes: Option<u32>,
    /// Spread the chosen nodes over the values of this node label, e.g.
    /// `topology.kubernetes.io/zone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread_by: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum WarmMode {
    #[default]
    None,
    Nodes,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LazyImageStatus {
    /// The image's size in bytes, from the last probe of the origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The origin's ETag (or Last-Modified) at the last probe: a change means a new image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validator: Option<String>,
    /// Resolved, Warm, Degraded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Nodes that hold the whole image.
    #[serde(default)]
    pub warm_nodes: u32,
    /// Nodes the warm policy has ordered to keep the image.
    #[serde(default)]
    pub ordered_nodes: u32,
    /// Why the warm policy is not (fully) carried out, if it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_problem: Option<String>,
    /// Bytes cached over all nodes.
    #[serde(default)]
    pub cached_bytes: u64,
    /// Per node (at most `MAX_NODE_ENTRIES`, the warmest first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeCache>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Per-node entries kept in status; the counts above cover every node.
pub const MAX_NODE_ENTRIES: usize = 50;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCache {
    pub node: String,
    pub cached_bytes: u64,
    pub fill_percent: u32,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_read: Option<String>,
}

/// A status condition, as Kubernetes' own (`metav1.Condition`) has them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    pub reason: String,
    pub message: String,
    /// RFC 3339.
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl LazyImageSpec {
    /// The volume attributes the node plugin stages this image with.
    pub fn attributes(&self) -> HashMap<String, String> {
        let mut a = HashMap::from([("url".to_string(), self.url.clone())]);
        for (k, v) in
            [("format", &self.format), ("digest", &self.digest), ("manifestUrl", &self.manifest_url), ("chunkSize", &self.chunk_size)]
        {
            if let Some(v) = v {
                a.insert(k.to_string(), v.clone());
            }
        }
        a
    }
}

impl LazyImageStatus {
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// Sets condition `type_`; its transition time moves only when its status changes.
    pub fn set_condition(&mut self, type_: &str, status: bool, reason: &str, message: &str, generation: Option<i64>, now: &str) {
        let status = if status { "True" } else { "False" };
        let since = match self.condition(type_) {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => now.to_string(),
        };
        self.conditions.retain(|c| c.type_ != type_);
        self.conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: since,
            observed_generation: generation,
        });
        self.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    }
}

/// The CRD as YAML, as the chart installs it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    lazy_image_csi_common::crd_yaml::<LazyImage>()
}

/// Applies this build's CRDs (LazyImage, NodeCache) to the cluster (server-side apply, as the
/// field manager `lazy-image-csi-controller`): Helm installs `crds/` once and never upgrades
/// it, so the controller of a newer chart brings its CRDs up to date itself.
pub async fn apply_crd(client: kube::Client) -> Result<(), kube::Error> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, Patch, PatchParams};
    use kube::CustomResourceExt;
    let api: Api<CustomResourceDefinition> = Api::all(client);
    for crd in [LazyImage::crd(), lazy_image_csi_common::node_cache::NodeCache::crd()] {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &PatchParams::apply("lazy-image-csi-controller").force(), &Patch::Apply(&crd)).await?;
    }
    Ok(())
}

/// Where the chart keeps the generated CRD (relative to the repository root).
pub const CRD_PATH: &str = "deploy/helm/lazy-image/crds/lazyimages.lazy-image.csi.dev.yaml";

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in CRD is what the types generate: regenerate it with
    /// `cargo run -p lazy-image-csi-controller --bin lazy-image-crdgen > deploy/...` when this fails.
    #[test]
    fn checked_in_crd_matches_the_types() {
        assert!(
            lazy_image_csi_common::checked_in_crd(CRD_PATH) == crd_yaml().unwrap(), "{CRD_PATH} differs from the LazyImage types: run `cargo run -p lazy-image-csi-controller --bin lazy-image-crdgen > {CRD_PATH}`");
    }

    #[test]
    fn crd_is_cluster_scoped_with_printer_columns() {
        use kube::CustomResourceExt;
        let crd = LazyImage::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        let cols: Vec<String> = crd.spec.versions[0].additional_printer_columns.iter().flatten().map(|c| c.name.clone()).collect();
        assert_eq!(cols, ["URL", "SIZE", "WARM", "ORDERED", "READY", "AGE"]);
    }

    /// Each CRD goes to the API as a forced server-side apply of exactly the generated object.
    #[tokio::test]
    async fn the_crd_is_applied_server_side() {
        use http::{Request, Response};
        use kube::client::Body;
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..2 {
                let (req, send) = handle.next_request().await.expect("a request per CRD");
                let (parts, body) = req.into_parts();
                let bytes = http_body_util::BodyExt::collect(body).await.unwrap().to_bytes();
                send.send_response(Response::builder().status(200).body(Body::from(bytes.to_vec())).unwrap());
                seen.push((parts, bytes));
            }
            seen
        });
        apply_crd(kube::Client::new(svc, "default")).await.unwrap();
        use kube::CustomResourceExt;
        let want = [("lazyimages", LazyImage::crd()), ("nodecaches", lazy_image_csi_common::node_cache::NodeCache::crd())];
        for ((parts, bytes), (plural, crd)) in server.await.unwrap().into_iter().zip(want) {
            assert_eq!(parts.method, http::Method::PATCH);
            assert_eq!(parts.uri.path(), format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{plural}.lazy-image.csi.dev"));
            let q = parts.uri.query().unwrap_or_default();
            assert!(q.contains("fieldManager=lazy-image-csi-controller") && q.contains("force=true"), "{q}");
            assert_eq!(parts.headers.get("content-type").unwrap(), "application/apply-patch+yaml");
            let sent: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(sent, serde_json::to_value(crd).unwrap());
        }
    }

    #[test]
    fn conditions_keep_their_transition_time_while_unchanged() {
        let mut s = LazyImageStatus::default();
        s.set_condition("Resolved", true, "Probed", "ok", Some(1), "t1");
        s.set_condition("Resolved", true, "Probed", "still", Some(2), "t2");
        assert_eq!(s.condition("Resolved").unwrap().last_transition_time, "t1");
        s.set_condition("Resolved", false, "ProbeFailed", "down", Some(2), "t3");
        assert_eq!(s.condition("Resolved").unwrap().last_transition_time, "t3");
        assert_eq!(s.conditions.len(), 1);
    }
}
