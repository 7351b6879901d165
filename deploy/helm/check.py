#!/usr/bin/env python3
"""Checks the Helm chart offline, as CI runs it (scripts/test.sh):

- renders it with Helm v4 (helm-python-sdk, no binary) with the default values and variations
  (FUSE only, no StorageClass, a custom kubelet directory, monitoring on) and lints it;
- values.schema.json refuses bad values (a wrong type, an unknown backend, a negative cache size);
- every rendered object (and the CRD) validates against the Kubernetes API schemas of each
  supported version (kubernetes-validate, strict);
- checkov finds nothing that is not skipped with a reason in the chart;
- the invariants that break CSI drivers in practice hold: one socket path for the plugin, the
  registrar and kubelet; one driver name everywhere; Bidirectional propagation only on the
  kubelet directory of a privileged container; the chart's CRD is the generated one; every image
  reference comes from a value.

Exits non-zero with a sentence per failure.
"""
import json
import os
import subprocess
import sys
import tempfile

import helm_python as helm
import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
CHART = os.path.join(HERE, "lazy-image")
REPO = os.path.dirname(os.path.dirname(HERE))
# The Kubernetes versions the chart claims (Chart.yaml kubeVersion >= 1.26; schemas from 1.30 on).
VERSIONS = ["1.30.0", "1.32.0", "1.34.0", "1.37.0"]
VARIATIONS = {
    "defaults": {},
    "fuse-only": {"node": {"backend": "fuse", "loadUblkModule": False}},
    "no-storageclass": {"storageClass": {"create": False}},
    "custom-kubelet-dir": {"kubeletDir": "/var/snap/microk8s/common/var/lib/kubelet"},
    "monitoring": {"monitoring": {"podMonitor": True, "dashboard": True}},
    "pinned-digests": {"image": {"node": {"digest": "sha256:" + "a" * 64}}, "storageClass": {"parameters": {"format": "erofs"}}},
    "no-fd-holder": {"node": {"fdHolder": False, "cacheLimitBytes": 10 << 30}},
    "no-cache-reports": {"node": {"cacheReports": {"enabled": False}}},
    "local-sources": {"node": {"localSources": {"roots": ["/mnt/datasets", "/srv/images"], "devices": ["/dev/disk/by-id/scsi-*"]}}},
}
# Our containers and the binaries they run: every flag the chart passes must be one of theirs.
BINARIES = {"node-plugin": "lazy-image-csi-node", "controller": "lazy-image-csi-controller", "fd-holder": "lazy-image-fd-holder"}
HELP = {}


def flags_of(binary):
    if binary not in HELP:
        path = os.path.join(REPO, "target", "debug", binary)
        HELP[binary] = subprocess.run([path, "--help"], check=True, capture_output=True, text=True).stdout
    return HELP[binary]


def rules_of(objs, role):
    for o in objs:
        if o["kind"] == "ClusterRole" and o["metadata"]["name"].endswith(role):
            return o.get("rules", [])
    return []


def grants(rules, resource, verb):
    return any(resource in r.get("resources", []) and verb in r.get("verbs", []) for r in rules)
BAD_VALUES = {
    "a wrong type": {"controller": {"replicas": "two"}},
    "an unknown backend": {"node": {"backend": "nbd"}},
    "a negative cache size": {"node": {"cacheLimitBytes": -1}},
    "an unknown key": {"node": {"cacheLimit": 1}},
    "a malformed digest": {"image": {"controller": {"digest": "md5:1"}}},
    "a zero write rate": {"controller": {"placement": {"writesPerSecond": 0}}},
}

failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL " + msg)


def merge(base, over):
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def objects(manifests):
    out = []
    for path, text in manifests.items():
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append(doc)
    return out


def containers(obj):
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return spec, spec.get("initContainers", []) + spec.get("containers", [])


def arg(c, flag):
    for a in c.get("args", []):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def check_invariants(name, values, objs):
    driver, kdir = values["driverName"], values["kubeletDir"]
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    csidriver = by_kind.get("CSIDriver", [])
    if [d["metadata"]["name"] for d in csidriver] != [driver]:
        fail(f"{name}: the CSIDriver is not named {driver}")
    for sc in by_kind.get("StorageClass", []):
        if sc["provisioner"] != driver:
            fail(f"{name}: StorageClass provisioner {sc['provisioner']} is not {driver}")
    if values["storageClass"]["create"] != bool(by_kind.get("StorageClass")):
        fail(f"{name}: storageClass.create is {values['storageClass']['create']} but the StorageClass is {'there' if by_kind.get('StorageClass') else 'missing'}")
    ds = [o for o in by_kind.get("DaemonSet", [])]
    if len(ds) != 1:
        fail(f"{name}: expected one node DaemonSet, found {len(ds)}")
        return
    spec, cs = containers(ds[0])
    vols = {v["name"]: v for v in spec["volumes"]}
    plugin = next(c for c in cs if c["name"] == "node-plugin")
    registrar = next(c for c in cs if c["name"] == "node-driver-registrar")
    # The plugin's socket, as kubelet reaches it on the host.
    endpoint = arg(plugin, "--endpoint")
    sock_in_container = endpoint.removeprefix("unix://")
    mount = next(m for m in plugin["volumeMounts"] if sock_in_container.startswith(m["mountPath"] + "/"))
    host_sock = vols[mount["name"]]["hostPath"]["path"] + sock_in_container[len(mount["mountPath"]):]
    if host_sock != f"{kdir}/plugins/{driver}/csi.sock":
        fail(f"{name}: the plugin's socket is {host_sock} on the host, not {kdir}/plugins/{driver}/csi.sock")
    if arg(registrar, "--kubelet-registration-path") != host_sock:
        fail(f"{name}: the registrar registers {arg(registrar, '--kubelet-registration-path')}, the plugin listens at {host_sock}")
    reg_sock = arg(registrar, "--csi-address")
    rmount = next(m for m in registrar["volumeMounts"] if reg_sock.startswith(m["mountPath"] + "/"))
    if vols[rmount["name"]]["hostPath"]["path"] + reg_sock[len(rmount["mountPath"]):] != host_sock:
        fail(f"{name}: the registrar dials another socket than the plugin's")
    reg_dir = next(m for m in registrar["volumeMounts"] if m["mountPath"] == "/registration")
    if vols[reg_dir["name"]]["hostPath"]["path"] != f"{kdir}/plugins_registry":
        fail(f"{name}: the registration directory is not {kdir}/plugins_registry")
    if arg(plugin, "--kubelet-root") != kdir:
        fail(f"{name}: the plugin's --kubelet-root is not {kdir}")
    # Bidirectional propagation: only the kubelet directory, only in a privileged container.
    for o in by_kind.get("DaemonSet", []) + by_kind.get("Deployment", []):
        _, ocs = containers(o)
        for c in ocs:
            for m in c.get("volumeMounts", []):
                if m.get("mountPropagation") == "Bidirectional":
                    if not c.get("securityContext", {}).get("privileged"):
                        fail(f"{name}: {c['name']} has Bidirectional propagation without being privileged")
                    if m["mountPath"] != kdir or c["name"] != "node-plugin":
                        fail(f"{name}: Bidirectional propagation on {c['name']}:{m['mountPath']}")
    if not any(m.get("mountPropagation") == "Bidirectional" and m["mountPath"] == kdir for m in plugin["volumeMounts"]):
        fail(f"{name}: the plugin's kubelet directory is not Bidirectional: pods would not see its mounts")
    # Every image reference is one of the values'.
    wanted = set()
    for key, img in values["image"].items():
        tag = img["tag"] or CHART_APP_VERSION
        wanted.add(f"{img['repository']}@{img['digest']}" if img["digest"] else f"{img['repository']}:{tag}")
    for o in objs:
        _, ocs = containers(o)
        for c in ocs:
            if c["image"] not in wanted:
                fail(f"{name}: {o['kind']} {c['name']} runs {c['image']}, which no image value names")
    # Every flag our containers get is one their binary knows.
    for o in objs:
        _, ocs = containers(o)
        for c in ocs:
            if c["name"] in BINARIES:
                known = flags_of(BINARIES[c["name"]])
                for a in c.get("args", []):
                    flag = a.split("=", 1)[0]
                    if flag.startswith("--") and (flag + " ") not in known and (flag + "\n") not in known:
                        fail(f"{name}: {c['name']} gets {flag}, which {BINARIES[c['name']]} does not know")
    # Cache reports: the plugin's flag and its right to its NodeCache follow the value; the
    # controller may always write orders and warm labels.
    reports = values["node"]["cacheReports"]["enabled"]
    if arg(plugin, "--cache-reports") != ("auto" if reports else "off"):
        fail(f"{name}: node.cacheReports.enabled is {reports} but the plugin gets --cache-reports={arg(plugin, '--cache-reports')}")
    node_rules = rules_of(objs, "-node")
    if grants(node_rules, "nodecaches/status", "patch") != reports or grants(node_rules, "nodecaches", "create") != reports:
        fail(f"{name}: the node plugin's right to its NodeCache does not follow node.cacheReports.enabled")
    # Local sources: one flag per allowed root and pattern, each root mounted read-only.
    local = values["node"]["localSources"]
    args = plugin.get("args", [])
    if [a.split("=", 1)[1] for a in args if a.startswith("--local-source-root=")] != local["roots"]:
        fail(f"{name}: the plugin's --local-source-root flags do not follow node.localSources.roots")
    if [a.split("=", 1)[1] for a in args if a.startswith("--local-source-device=")] != local["devices"]:
        fail(f"{name}: the plugin's --local-source-device flags do not follow node.localSources.devices")
    mounts = {m["mountPath"]: m for m in plugin.get("volumeMounts", [])}
    for root in local["roots"]:
        if not mounts.get(root, {}).get("readOnly"):
            fail(f"{name}: local source root {root} is not mounted read-only into the plugin")
    ctrl_rules = rules_of(objs, "-controller")
    if not (grants(ctrl_rules, "nodecaches", "patch") and grants(ctrl_rules, "nodes", "patch")):
        fail(f"{name}: the controller cannot write warm orders or warm node labels")
    # The controller: non-root, read-only root filesystem, the provisioner with extra metadata.
    for d in by_kind.get("Deployment", []):
        pspec, dcs = containers(d)
        if not pspec.get("securityContext", {}).get("runAsNonRoot"):
            fail(f"{name}: the controller's pod does not run as non-root")
        for c in dcs:
            if not c.get("securityContext", {}).get("readOnlyRootFilesystem"):
                fail(f"{name}: {c['name']} has a writable root filesystem")
        prov = next(c for c in dcs if c["name"] == "csi-provisioner")
        if "--extra-create-metadata" not in prov["args"] or "--leader-election" not in prov["args"]:
            fail(f"{name}: the provisioner lacks --extra-create-metadata or --leader-election")


def main():
    global CHART_APP_VERSION
    with helm.Chart.load(CHART) as chart:
        CHART_APP_VERSION = chart.metadata["appVersion"]
        defaults = chart.values
        crds = chart.crds
        # The chart's CRDs are the ones the Rust types generate.
        # Built by the test build (scripts/chart-check.sh makes sure).
        crdgen = os.path.join(REPO, "target", "debug", "lazy-image-crdgen")
        for plural in ("lazyimages", "nodecaches"):
            generated = subprocess.run([crdgen, plural], check=True, capture_output=True, text=True).stdout
            in_chart = [c for c in crds if c["name"].endswith(f"{plural}.lazy-image.csi.dev.yaml")]
            if len(in_chart) != 1 or in_chart[0]["data"] != generated:
                fail(f"the chart's {plural} CRD differs from `lazy-image-crdgen {plural}`")
        lint = helm.lint(CHART)
        if lint["errors"] or any(m["severity"] > 1 for m in lint["messages"]):
            fail(f"helm lint: {lint}")
        for what, bad in BAD_VALUES.items():
            try:
                chart.validate_schema(merge(defaults, bad))
                fail(f"values.schema.json accepts {what}: {bad}")
            except Exception as e:  # the SDK raises its own error types
                print(f"ok   values.schema.json refuses {what}: {str(e).splitlines()[0][:120]}")
        rendered_dirs = []
        for name, over in VARIATIONS.items():
            values = merge(defaults, over)
            chart.validate_schema(values)
            manifests = chart.render(over, name="lazy-image", namespace="kube-system", is_install=True)
            objs = objects(manifests)
            check_invariants(name, values, objs)
            if name == "monitoring":
                kinds = [o["kind"] for o in objs]
                if "ConfigMap" not in kinds:
                    fail("monitoring: no dashboard ConfigMap")
                if "PodMonitor" in kinds:
                    fail("monitoring: a PodMonitor rendered without the monitoring.coreos.com API")
            for version in VERSIONS:
                for o in objs + [yaml.safe_load(c["data"]) for c in crds]:
                    try:
                        kubernetes_validate.validate(o, version, strict=True)
                    except Exception as e:
                        fail(f"{name}: {o['kind']} {o['metadata'].get('name')} is not valid for Kubernetes {version}: {str(e)[:300]}")
            d = tempfile.mkdtemp(prefix=f"chart-{name}-")
            with open(os.path.join(d, "all.yaml"), "w") as f:
                yaml.safe_dump_all(objs, f)
            rendered_dirs.append((name, d))
            print(f"ok   {name}: {len(objs)} objects rendered, valid for {', '.join(VERSIONS)}")
    # The policy scanner over what a user would apply.
    for name, d in rendered_dirs:
        out = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "checkov"), "-d", d, "--framework", "kubernetes", "--compact", "-o", "json"],
            capture_output=True,
            text=True,
        )
        try:
            report = json.loads(out.stdout)
        except json.JSONDecodeError:
            fail(f"checkov ({name}) gave no report: {out.stderr[-500:]}")
            continue
        reports = report if isinstance(report, list) else [report]
        failed = [c for r in reports for c in r.get("results", {}).get("failed_checks", [])]
        skipped = [c for r in reports for c in r.get("results", {}).get("skipped_checks", [])]
        for c in failed:
            fail(f"checkov ({name}): {c['check_id']} {c['check_name']} on {c['resource']}")
        print(f"ok   checkov ({name}): {len(failed)} failed, {len(skipped)} skipped with a reason in the chart")
    if failures:
        print(f"chart check: {len(failures)} failures")
        sys.exit(1)
    print("chart check: all passed")


if __name__ == "__main__":
    main()
