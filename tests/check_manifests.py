#!/usr/bin/env python3
"""Checks the install paths: the Helm chart, manifests/ and the e2e objects.

Run from the project venv (`make check-manifests`), which holds the pinned kubernetes-validate
and PyYAML. It checks that
  1. the chart's and manifests/' copies of the CRD equal crds/syncpipeline.yaml, byte for byte;
  2. manifests/ is what charts/render.py generates now (re-rendered into a temporary directory
     and compared, with a diff when stale);
  3. every object of manifests/, of the chart rendered with several sets of values, of
     e2e/kind/ and, when the environment variable MONSOON_RENDERED_DIR names a directory, of
     every *.yaml under it, validates against the Kubernetes API schemas of KUBERNETES_VERSION
     in strict mode (unknown fields are errors, as `kubectl apply` reports them); SyncPipelines
     validate against the CRD's own schema and its CEL rules (x-kubernetes-validations,
     evaluated with cel-python); ServiceMonitors are skipped (kubernetes-validate has no schema
     for the Prometheus Operator's CRDs) and said so;
  4. every pipeline of tests/crd-cases.yaml under `refused` is refused by the CRD with the
     message the case names, and every one under `operatorOnly` is accepted (the operator
     refuses those itself; crates/operator/tests/crd_cases.rs checks the operator's side);
  5. the rendered chart does what the operator needs: the RBAC rules, the Deployment's
     arguments, environment, probes, ports, security settings, and the selectors lining up;
and prints `check-manifests: N passed, N failed, N skipped`, exiting 1 on any failure.

`--root DIR` checks another checkout (for trying the checker on a deliberately broken copy);
`-v` lists every check.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path

import celpy
import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

# The Kubernetes API the operator is built against (k8s-openapi's `v1_32` feature).
KUBERNETES_VERSION = "1.32.0"

# What the operator needs in every namespace it watches (the contract in the brief of the
# operator; the chart's "monsoon.operatorRules"). (apiGroup, resource) -> verbs.
OPERATOR_PERMISSIONS = {
    ("monsoon.dev", "syncpipelines"): {"get", "list", "watch", "patch", "update"},
    ("monsoon.dev", "syncpipelines/status"): {"get", "patch", "update"},
    ("monsoon.dev", "syncpipelines/finalizers"): {"update"},
    ("apps", "statefulsets"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("policy", "poddisruptionbudgets"): {"get", "create", "patch"},
    ("", "services"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("", "serviceaccounts"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("", "secrets"): {"get"},
    ("", "pods"): {"get", "list", "watch"},
    ("rbac.authorization.k8s.io", "roles"):
        {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("rbac.authorization.k8s.io", "rolebindings"):
        {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
# Leader election, in the release namespace only, on the release's own Lease (named after the
# release, or leaderElection.leaseName).
LEADER_PERMISSIONS = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}
HTTP_PORT = 9464

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
# Examples written for `monsoon run` only: they read credentials from the environment or files,
# which the CRD refuses. The CRD must refuse them for exactly that reason.
STANDALONE_EXAMPLES = {"with-credentials.yaml": "only work with `monsoon run`"}
# The one cluster-wide grant of every install: `get` on the operator's own CRD, by name.
CRD_READER_PERMISSIONS = {("apiextensions.k8s.io", "customresourcedefinitions"): {"get"}}
CRD_NAME = "syncpipelines.monsoon.dev"
# Aggregated into the built-in roles (rbac.aggregateToDefaultRoles): label -> verbs granted on
# syncpipelines.
AGGREGATED = {
    "rbac.authorization.k8s.io/aggregate-to-view": {"get", "list", "watch"},
    "rbac.authorization.k8s.io/aggregate-to-edit": {"create", "update", "patch", "delete", "deletecollection"},
    "rbac.authorization.k8s.io/aggregate-to-admin": {"create", "update", "patch", "delete", "deletecollection"},
}
# Kinds kubernetes-validate has no schema for, and why they are let through.
_PROMETHEUS_OPERATOR = "no schema: a Prometheus Operator CRD, which kubernetes-validate does not ship"
SKIPPED_KINDS = {
    ("monitoring.coreos.com", "ServiceMonitor"): _PROMETHEUS_OPERATOR,
    ("monitoring.coreos.com", "PodMonitor"): _PROMETHEUS_OPERATOR,
    ("monitoring.coreos.com", "PrometheusRule"): _PROMETHEUS_OPERATOR,
}

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class Report:
    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.passed = 0
        self.failed: list = []
        self.skipped: list = []
        self.section_counts: dict = {}
        self.section = ""

    def begin(self, section: str) -> None:
        self.section = section
        print(f"== {section}")

    def ok(self, what: str) -> None:
        self.passed += 1
        if self.verbose:
            print(f"   ok    {what}")

    def fail(self, what: str, detail: str = "") -> None:
        self.failed.append(what)
        print(f"   FAIL  {what}")
        for line in detail.rstrip("\n").split("\n") if detail else []:
            print(f"         {line}")

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(what)
        print(f"   skip  {what}: {why}")

    def check(self, condition: bool, what: str, detail: str = "") -> bool:
        (self.ok(what) if condition else self.fail(what, detail))
        return condition


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch, returning a new value."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def load_render(root: Path):
    spec = importlib.util.spec_from_file_location("monsoon_render", root / "charts" / "render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def diff(expected: bytes, actual: bytes, expected_name: str, actual_name: str,
         limit: int = 60) -> str:
    lines = list(difflib.unified_diff(
        expected.decode(errors="replace").splitlines(keepends=True),
        actual.decode(errors="replace").splitlines(keepends=True),
        fromfile=expected_name, tofile=actual_name))
    text = "".join(lines[:limit])
    if len(lines) > limit:
        text += f"... ({len(lines) - limit} more diff lines)\n"
    return text


def objects_of(path: Path) -> list:
    """The objects of a YAML file (empty documents dropped)."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def label(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {ns}{meta.get('name')}"


# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------

def structural_to_jsonschema(s: dict, notes: set, root: bool = False) -> dict:
    """A CRD's structural schema as JSON Schema, with the API server's strict field validation:
    properties not in the schema are errors unless x-kubernetes-preserve-unknown-fields."""
    out: dict = {}
    nullable = s.get("nullable", False)
    t = s.get("type")
    if s.get("x-kubernetes-int-or-string"):
        t = ["integer", "string"]
    if t:
        out["type"] = (t if isinstance(t, list) else [t]) + (["null"] if nullable else [])
    for key in ("enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                "multipleOf", "minLength", "maxLength", "pattern", "minItems", "maxItems",
                "uniqueItems", "minProperties", "maxProperties", "required"):
        if key in s:
            out[key] = s[key]
    if nullable and "enum" in out:
        out["enum"] = list(out["enum"]) + [None]
    props = dict(s.get("properties") or {})
    if root:
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object", "x-kubernetes-preserve-unknown-fields": True})
    if props:
        out["properties"] = {k: structural_to_jsonschema(v, notes) for k, v in props.items()}
    if "items" in s:
        out["items"] = structural_to_jsonschema(s["items"], notes)
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            out[key] = [structural_to_jsonschema(x, notes) for x in s[key]]
    if "not" in s:
        out["not"] = structural_to_jsonschema(s["not"], notes)
    extra = s.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = structural_to_jsonschema(extra, notes)
    elif extra is not None:
        out["additionalProperties"] = extra
    elif "object" in (out.get("type") or []) and not s.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def api_server_message(error: jsonschema.ValidationError) -> str:
    """A JSON Schema error worded as kube-apiserver words it for a custom resource (checked
    against a real one by crates/operator/tests/control_plane.rs), so tests/crd-cases.yaml
    names one message for both checks."""
    path = ".".join(str(p) for p in error.path)
    v, arg = error.validator, error.validator_value
    if v == "pattern":
        return f"{path} in body should match '{arg}'"
    if v == "minimum":
        return f"{path} in body should be greater than or equal to {arg}"
    if v == "maximum":
        return f"{path} in body should be less than or equal to {arg}"
    if v == "minItems":
        return f"{path} in body should have at least {arg} items"
    if v == "enum":
        supported = ", ".join(json.dumps(x) for x in arg if x is not None)
        return f"Unsupported value: {json.dumps(error.instance)}: supported values: {supported}"
    if v == "additionalProperties" and arg is False and isinstance(error.instance, dict):
        # Strict field validation (kubectl's default) refuses the whole object while decoding.
        known = error.schema.get("properties") or {}
        return "; ".join(f'strict decoding error: unknown field "{path + "." if path else ""}{key}"'
                         for key in error.instance if key not in known)
    if v == "required":
        return f"Required value ({error.message})"
    return error.message


class CelRules:
    """The CRD's CEL rules (x-kubernetes-validations), evaluated as the API server does: each
    rule of a schema node with `self` bound to the value there, wherever the value is present.
    Only rules on `self` are supported (no `oldSelf` transition rules: the CRD has none)."""

    def __init__(self):
        self.env = celpy.Environment()
        self.programs: dict = {}

    def program(self, rule: str):
        if rule not in self.programs:
            if "oldSelf" in rule:
                raise ValueError(f"transition rule not supported here: {rule}")
            self.programs[rule] = self.env.program(self.env.compile(rule))
        return self.programs[rule]

    def problems(self, schema: dict, value, path: str = "") -> list:
        out = []
        for v in schema.get("x-kubernetes-validations") or []:
            try:
                result = self.program(v["rule"]).evaluate({"self": celpy.json_to_cel(value)})
                passed = isinstance(result, celpy.celtypes.BoolType) and bool(result)
            except celpy.CELEvalError as e:
                passed, result = False, e
            if not passed:
                message = v.get("message") or f"failed rule: {v['rule']}"
                out.append(f"{path or '(root)'}: {message} (CEL rule of crds/syncpipeline.yaml)")
        if isinstance(value, dict):
            props = schema.get("properties") or {}
            extra = schema.get("additionalProperties")
            for key, item in value.items():
                sub = props.get(key, extra if isinstance(extra, dict) else None)
                if sub is not None:
                    out += self.problems(sub, item, f"{path}.{key}" if path else key)
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                out += self.problems(schema["items"], item, f"{path}[{i}]")
        return out


class Validator:
    """Validates objects: Kubernetes kinds with kubernetes-validate, SyncPipelines with the
    schema and CEL rules of crds/syncpipeline.yaml."""

    def __init__(self, crd_path: Path, report: Report):
        self.report = report
        self.notes: set = set()
        self.custom: dict = {}  # (apiVersion, kind) -> (JSON Schema, structural schema)
        self.cel = CelRules()
        for crd in objects_of(crd_path):
            spec = crd["spec"]
            for version in spec["versions"]:
                schema = version["schema"]["openAPIV3Schema"]
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                self.custom[key] = (structural_to_jsonschema(schema, self.notes, root=True), schema)

    def validate(self, obj: dict, where: str, namespaced_check: bool = True) -> None:
        what = f"{where}: {label(obj)}"
        group = obj.get("apiVersion", "").rpartition("/")[0] if isinstance(obj, dict) else ""
        if isinstance(obj, dict) and (group, obj.get("kind")) in SKIPPED_KINDS:
            self.report.skip(what, SKIPPED_KINDS[(group, obj["kind"])])
            return
        problems = self.problems(obj, namespaced_check)
        self.report.check(not problems, what, "\n".join(problems))

    def problems(self, obj: dict, namespaced_check: bool = True) -> list:
        """Everything the API server would refuse in obj (empty: it would be accepted)."""
        if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
            return ["not a Kubernetes object (apiVersion and kind needed)"]
        problems = self.metadata_problems(obj, namespaced_check)
        key = (obj["apiVersion"], obj["kind"])
        if key in self.custom:
            json_schema, structural = self.custom[key]
            validator = jsonschema.Draft202012Validator(json_schema)
            for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.path)):
                path = ".".join(str(p) for p in error.path) or "(root)"
                problems.append(f"{path}: {api_server_message(error)} (schema of crds/syncpipeline.yaml)")
            if not problems:
                # The API server evaluates CEL rules only on objects that pass the schema.
                problems += self.cel.problems(structural, obj)
        elif obj["apiVersion"].startswith("monsoon.dev/"):
            problems.append(f"{obj['apiVersion']} {obj['kind']} is not in crds/syncpipeline.yaml")
        else:
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path) or "(root)"
                problems.append(f"{path}: {e.message} (Kubernetes {e.version} schema, strict)")
            except SchemaNotFoundError as e:
                problems.append(e.message)
        return problems

    @staticmethod
    def metadata_problems(obj: dict, namespaced_check: bool) -> list:
        """What the API server would refuse (or apply elsewhere) that no schema says."""
        problems = []
        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            problems.append(f"metadata.name {name!r} is not a DNS-1123 subdomain")
        elif obj["kind"] in ("Service", "Namespace") and (len(name) > 63 or not _DNS_LABEL.match(name)):
            problems.append(f"metadata.name {name!r} is not a DNS-1035 label (Service, Namespace)")
        for key, value in (meta.get("labels") or {}).items():
            if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
                problems.append(f"label {key}: {value!r} is not a valid label value")
        if namespaced_check:
            if obj["kind"] in CLUSTER_SCOPED and "namespace" in meta:
                problems.append(f"a cluster-scoped {obj['kind']} has a metadata.namespace")
            if obj["kind"] not in CLUSTER_SCOPED and not meta.get("namespace"):
                problems.append("no metadata.namespace: `kubectl apply` would put it in the "
                                "current namespace")
        return problems


# ---------------------------------------------------------------------------------------------
# What the chart must do for the operator
# ---------------------------------------------------------------------------------------------

def permissions(rules: list) -> tuple[dict, list]:
    """(apiGroup, resource) -> verbs granted by RBAC rules, and the resourceNames limits."""
    granted: dict = {}
    limited = []
    for rule in rules:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                granted.setdefault((group, resource), set()).update(rule.get("verbs", []))
                if rule.get("resourceNames"):
                    limited.append(((group, resource), tuple(rule["resourceNames"])))
    return granted, limited


def permission_diff(granted: dict, wanted: dict) -> str:
    lines = []
    for key in sorted(set(granted) | set(wanted)):
        missing = wanted.get(key, set()) - granted.get(key, set())
        extra = granted.get(key, set()) - wanted.get(key, set())
        name = f"{key[0] or 'core'}/{key[1]}"
        if missing:
            lines.append(f"{name}: missing {sorted(missing)}")
        if extra:
            lines.append(f"{name}: not in the contract {sorted(extra)}")
    return "\n".join(lines)


def check_chart_variant(report: Report, name: str, objs: list, values: dict, release: str,
                        namespace: str, chart_meta: dict) -> None:
    by_kind: dict = {}
    for obj in objs:
        by_kind.setdefault(obj["kind"], []).append(obj)
    c = report.check
    v = f"chart[{name}]"

    def one(kind: str) -> dict | None:
        found = by_kind.get(kind, [])
        if c(len(found) == 1, f"{v}: exactly one {kind}", f"found {len(found)}"):
            return found[0]
        return None

    watch = values.get("watchNamespaces") or []
    sa_create = values.get("serviceAccount", {}).get("create", True)
    sa_objs = by_kind.get("ServiceAccount", [])
    if sa_create:
        sa = one("ServiceAccount")
        sa_name = sa["metadata"]["name"] if sa else None
    else:
        c(not sa_objs, f"{v}: no ServiceAccount when serviceAccount.create is false",
          f"found {[label(o) for o in sa_objs]}")
        sa_name = values["serviceAccount"]["name"]
    subject = {"kind": "ServiceAccount", "name": sa_name, "namespace": namespace}

    # RBAC on the watched namespaces.
    roles = {(o["metadata"].get("namespace"), o["metadata"]["name"]): o
             for o in by_kind.get("Role", [])}
    bindings = by_kind.get("RoleBinding", []) + by_kind.get("ClusterRoleBinding", [])

    def bound(role_kind: str, role: dict) -> bool:
        ns = role["metadata"].get("namespace")
        return any(b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind,
                                    "name": role["metadata"]["name"]}
                   and b["metadata"].get("namespace") == ns and subject in b.get("subjects", [])
                   for b in bindings)

    def rules_match(what: str, role: dict, wanted: dict) -> None:
        granted, _ = permissions(role.get("rules", []))
        c(granted == wanted, f"{v}: {what} grants exactly the contract's permissions",
          permission_diff(granted, wanted))

    leader = [r for r in roles.values() if any(
        p == ("coordination.k8s.io", "leases") for p in permissions(r.get("rules", []))[0])]
    fullname = values.get("fullnameOverride") or release
    lease_name = (values.get("leaderElection") or {}).get("leaseName") or fullname

    # The cluster-wide exceptions: the CRD reader (the operator's) and the aggregated roles
    # (people's, bound to nobody by the chart).
    cluster_roles = by_kind.get("ClusterRole", [])
    aggregated = [r for r in cluster_roles
                  if any(k in AGGREGATED for k in (r["metadata"].get("labels") or {}))]
    readers = [r for r in cluster_roles
               if permissions(r.get("rules", []))[0] == CRD_READER_PERMISSIONS]
    if c(len(readers) == 1, f"{v}: one ClusterRole reading the CRD", f"found {len(readers)}"):
        _, limited = permissions(readers[0]["rules"])
        c(limited == [(("apiextensions.k8s.io", "customresourcedefinitions"), (CRD_NAME,))],
          f"{v}: the CRD reader names only {CRD_NAME}", str(limited))
        c(bound("ClusterRole", readers[0]), f"{v}: the CRD reader is bound to {subject}")
    if (values.get("rbac") or {}).get("aggregateToDefaultRoles", True):
        for key, verbs in AGGREGATED.items():
            granted = [permissions(r.get("rules", []))[0].get(("monsoon.dev", "syncpipelines"), set())
                       for r in aggregated if (r["metadata"].get("labels") or {}).get(key) == "true"]
            c(len(granted) == 1 and granted[0] == verbs,
              f"{v}: a ClusterRole aggregated by {key} grants {sorted(verbs)} on syncpipelines",
              str(granted))
        c(not any(b["roleRef"]["name"] in {r["metadata"]["name"] for r in aggregated}
                  for b in bindings), f"{v}: the chart binds the aggregated ClusterRoles to nobody")
    else:
        c(not aggregated, f"{v}: no aggregated ClusterRoles when rbac.aggregateToDefaultRoles is false")
    operator_cluster_roles = [r for r in cluster_roles if r not in aggregated and r not in readers]
    if watch:
        reader_names = {r["metadata"]["name"] for r in readers}
        other_bindings = [b for b in by_kind.get("ClusterRoleBinding", [])
                          if b["roleRef"]["name"] not in reader_names]
        c(not operator_cluster_roles and not other_bindings,
          f"{v}: no cluster-wide RBAC but the CRD reader with watchNamespaces={watch}",
          f"found {[label(o) for o in operator_cluster_roles + other_bindings]}")
        for ns in watch:
            ns_roles = [r for (rns, _), r in roles.items() if rns == ns and r not in leader]
            if c(len(ns_roles) == 1, f"{v}: one operator Role in watched namespace {ns}",
                 f"found {len(ns_roles)}"):
                rules_match(f"Role in {ns}", ns_roles[0], OPERATOR_PERMISSIONS)
                c(bound("Role", ns_roles[0]), f"{v}: the Role in {ns} is bound to {subject}")
    else:
        cr = operator_cluster_roles[0] if len(operator_cluster_roles) == 1 else None
        c(cr is not None, f"{v}: exactly one operator ClusterRole",
          f"found {[label(r) for r in operator_cluster_roles]}")
        if cr:
            rules_match("the ClusterRole", cr, OPERATOR_PERMISSIONS)
            c(bound("ClusterRole", cr), f"{v}: the ClusterRole is bound to {subject}")
        others = [label(r) for r in roles.values() if r not in leader]
        c(not others, f"{v}: no namespaced operator Roles when watching all namespaces",
          f"found {others}")
    if c(len(leader) == 1 and leader[0]["metadata"].get("namespace") == namespace,
         f"{v}: one leader-election Role, in the release namespace {namespace}",
         f"found {[label(r) for r in leader]}"):
        rules_match("the leader-election Role", leader[0], LEADER_PERMISSIONS)
        _, limited = permissions(leader[0]["rules"])
        c(bool(limited) and all(names == (lease_name,) for _, names in limited),
          f"{v}: the leader-election Role names only the Lease {lease_name}", str(limited))
        c(bound("Role", leader[0]), f"{v}: the leader-election Role is bound to {subject}")

    # The Deployment.
    deploy = one("Deployment")
    if deploy:
        pod = deploy["spec"]["template"]
        spec = pod["spec"]
        pod_labels = pod["metadata"].get("labels", {})
        selector = deploy["spec"]["selector"]["matchLabels"]
        c(selector.items() <= pod_labels.items(), f"{v}: the Deployment selects its pods",
          f"selector {selector}, pod labels {pod_labels}")
        c(deploy["spec"]["replicas"] == values.get("replicaCount", 1), f"{v}: replicas",
          f"replicas {deploy['spec']['replicas']!r}, replicaCount {values.get('replicaCount')!r}")
        c(spec.get("serviceAccountName") == sa_name, f"{v}: the pod runs as {sa_name}",
          f"serviceAccountName {spec.get('serviceAccountName')}")
        containers = spec["containers"]
        if c(len(containers) == 1, f"{v}: one container"):
            ctr = containers[0]
            image = values.get("image", {})
            want_image = (f"{image.get('repository', 'ghcr.io/monsoon-dev/monsoon')}:"
                          f"{image.get('tag') or chart_meta['appVersion']}")
            c(ctr["image"] == want_image, f"{v}: image {want_image}", f"image {ctr['image']}")
            args = ctr.get("args", [])
            want_args = [f"--log-format={values.get('logFormat', 'json')}", "operator",
                         f"--http-addr=0.0.0.0:{HTTP_PORT}",
                         f"--worker-image={values.get('workerImage') or want_image}"]
            election = values.get("leaderElection") or {}
            want_args += [f"--leader-election-lease-name={lease_name}",
                          f"--leader-election-lease-duration-seconds={election.get('leaseDurationSeconds', 15)}",
                          f"--leader-election-renew-period-seconds={election.get('renewPeriodSeconds', 5)}"]
            if watch:
                want_args.append(f"--watch-namespaces={','.join(watch)}")
            c(args == want_args, f"{v}: operator arguments", f"args {args}\nwant {want_args}")
            env = {e["name"]: e for e in ctr.get("env", [])}
            for var, path in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
                got = env.get(var, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                c(got == path, f"{v}: env {var} from the downward API {path}", f"got {got}")
            ports = ctr.get("ports", [])
            c(ports == [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
              f"{v}: container port http {HTTP_PORT}", str(ports))
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                got = ctr.get(probe, {}).get("httpGet", {})
                c(got.get("path") == path and got.get("port") == "http",
                  f"{v}: {probe} GET {path} on port http", str(got))
            sc = ctr.get("securityContext", {})
            c(sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False
              and sc.get("capabilities", {}).get("drop") == ["ALL"],
              f"{v}: container security context (read-only root, no escalation, no capabilities)",
              str(sc))
            c(ctr.get("resources", {}).get("requests") and ctr.get("resources", {}).get("limits"),
              f"{v}: resource requests and limits", str(ctr.get("resources")))
        psc = spec.get("securityContext", {})
        c(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 65532
          and psc.get("seccompProfile") == {"type": "RuntimeDefault"},
          f"{v}: pod security context (non-root 65532, RuntimeDefault seccomp)", str(psc))
        c(isinstance(spec.get("terminationGracePeriodSeconds"), int)
          and spec["terminationGracePeriodSeconds"] >= 30, f"{v}: grace period >= 30 s")
        for key in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets"):
            want = values.get(key) or None
            c(spec.get(key) == want, f"{v}: pod {key} from values", f"{spec.get(key)} != {want}")
        want_ann = values.get("podAnnotations") or None
        c(pod["metadata"].get("annotations") == want_ann, f"{v}: pod annotations from values")

        svc = one("Service")
        if svc:
            c(svc["spec"]["selector"].items() <= pod_labels.items(),
              f"{v}: the Service selects the operator pods", str(svc["spec"]["selector"]))
            c(svc["spec"]["ports"] == [{"name": "http", "port": HTTP_PORT, "targetPort": "http",
                                        "protocol": "TCP"}],
              f"{v}: the Service exposes port http {HTTP_PORT}", str(svc["spec"]["ports"]))
            monitors = by_kind.get("ServiceMonitor", [])
            sm_values = values.get("metrics", {}).get("serviceMonitor", {})
            if sm_values.get("enabled"):
                if c(len(monitors) == 1, f"{v}: a ServiceMonitor when enabled"):
                    sm = monitors[0]
                    c(sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items(),
                      f"{v}: the ServiceMonitor selects the Service")
                    c(sm["spec"]["endpoints"][0]["port"] == "http"
                      and sm["spec"]["endpoints"][0]["interval"] == sm_values.get("interval"),
                      f"{v}: the ServiceMonitor scrapes port http at the interval from values")
                    c((sm_values.get("labels") or {}).items() <= sm["metadata"]["labels"].items(),
                      f"{v}: the ServiceMonitor carries the labels from values")
            else:
                c(not monitors, f"{v}: no ServiceMonitor unless enabled")

    metrics = values.get("metrics", {})
    for kind, key in (("PodMonitor", "podMonitor"), ("PrometheusRule", "prometheusRule")):
        found = by_kind.get(kind, [])
        if (metrics.get(key) or {}).get("enabled"):
            c(len(found) == 1, f"{v}: a {kind} when metrics.{key}.enabled", f"found {len(found)}")
        else:
            c(not found, f"{v}: no {kind} unless metrics.{key}.enabled")
    for pm in by_kind.get("PodMonitor", []):
        sel = pm["spec"]["selector"]["matchLabels"]
        c(sel == {"app.kubernetes.io/name": "monsoon-worker", "app.kubernetes.io/managed-by": "monsoon-operator"},
          f"{v}: the PodMonitor selects the worker pods (the labels the operator puts on them)", str(sel))
        c(pm["spec"]["podMetricsEndpoints"][0]["port"] == "http",
          f"{v}: the PodMonitor scrapes the workers' port http")
    for rule in by_kind.get("PrometheusRule", []):
        exprs = " ".join(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
        for metric in WORKER_METRICS + OPERATOR_METRICS:
            c(metric in exprs, f"{v}: an alert on {metric}")
    tests = [o for o in by_kind.get("Pod", [])
             if (o["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"]
    c(len(tests) == 1, f"{v}: one `helm test` hook Pod", f"found {len(tests)}")


# ---------------------------------------------------------------------------------------------

# Series the PrometheusRule must alert on: the workers' (crates/engine/src/metrics.rs, prefix
# monsoon_) and the operator's (crates/operator/src/lib.rs, prefix monsoon_operator_). A renamed
# metric fails here instead of silently never firing.
WORKER_METRICS = ["monsoon_lag_seconds", "monsoon_history_lost_total", "monsoon_dead_letter_total",
                  "monsoon_checkpoint_timestamp_seconds", "monsoon_writes_in_flight",
                  "monsoon_stale_write_share"]
OPERATOR_METRICS = ["monsoon_operator_pipelines", "monsoon_operator_reconcile_errors_total",
                    "monsoon_operator_leader"]

# Sets of values the chart is rendered with: defaults, a namespaced install, the ServiceMonitor,
# and every optional value set (so that each `with` block is rendered and validated).
VARIANTS = {
    "defaults": {},
    "watchNamespaces=[a,b]": {"watchNamespaces": ["a", "b"]},
    "serviceMonitor": {"metrics": {"serviceMonitor": {"enabled": True, "interval": "15s",
                                                       "labels": {"release": "prometheus"}}}},
    "everything-set": {
        "image": {"repository": "registry.example/mirror/monsoon", "tag": "0.1.0-rc1",
                  "pullPolicy": "Always"},
        "workerImage": "registry.example/mirror/monsoon-worker:0.1.0-rc1",
        "imagePullSecrets": [{"name": "registry"}],
        "fullnameOverride": "sync-operator",
        "replicaCount": 2,
        "logFormat": "text",
        "watchNamespaces": ["shop"],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                      "limits": {"cpu": "1", "memory": "512Mi"}},
        "podAnnotations": {"example.com/team": "search"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops",
                         "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}]}]}}},
        "serviceAccount": {"create": False, "name": "existing-sa"},
        "leaderElection": {"leaseName": "sync-operator-leader", "leaseDurationSeconds": 30,
                           "renewPeriodSeconds": 10},
        "rbac": {"aggregateToDefaultRoles": False},
        "metrics": {"serviceMonitor": {"enabled": True, "interval": "1m", "labels": {}},
                    "podMonitor": {"enabled": True, "interval": "15s", "labels": {"team": "search"}},
                    "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"},
                                       "lagSeconds": 60}},
        "test": {"image": "registry.example/mirror/busybox:1.37"},
    },
}

# Values that `helm install` must refuse through values.schema.json: (what, values).
REFUSED_VALUES = [
    ("a misspelled key", {"replicaCont": 2}),
    ("a misspelled nested key", {"metrics": {"serviceMonitor": {"enabeld": True}}}),
    ("a number as a string", {"replicaCount": "2"}),
    ("an unknown log format", {"logFormat": "xml"}),
    ("a renew period of zero", {"leaderElection": {"renewPeriodSeconds": 0}}),
]


def _pipeline(generation: int, observed, conditions: dict, paused: bool = False) -> dict:
    return {"metadata": {"name": "p", "generation": generation}, "spec": {"paused": paused},
            "status": {"observedGeneration": observed, "conditions": [
                {"type": t, "status": st, "reason": "R", "message": f"{t} {st}", "observedGeneration": g}
                for t, (st, g) in conditions.items()]}}


# (what, pipeline, Argo CD health status it must get).
ARGOCD_CASES = [
    ("no status yet", {"metadata": {"name": "p", "generation": 1}}, "Progressing"),
    ("ready for this generation", _pipeline(2, 2, {"Ready": ("True", 2), "Stalled": ("False", 2)}), "Healthy"),
    ("ready for the previous generation only (just applied)",
     _pipeline(3, 2, {"Ready": ("True", 2), "Reconciling": ("True", 3)}), "Progressing"),
    ("rolling out (observedGeneration behind)", _pipeline(3, 2, {"Ready": ("False", 3), "Reconciling": ("True", 3)}), "Progressing"),
    ("invalid spec", _pipeline(4, 4, {"Stalled": ("True", 4), "Ready": ("False", 4)}), "Degraded"),
    ("a worker failed", _pipeline(4, 4, {"Degraded": ("True", 4), "Ready": ("False", 4)}), "Degraded"),
    ("paused", _pipeline(5, 5, {"Ready": ("False", 5)}, paused=True), "Suspended"),
    ("workers starting", _pipeline(5, 5, {"Ready": ("False", 5)}), "Progressing"),
]


def check_argocd_health(report: Report, script: Path) -> None:
    """Runs the Argo CD health check as Argo CD does: the Lua script with `obj` set."""
    if not report.check(script.exists(), f"{script.name} exists"):
        return
    try:
        import lupa  # make venv installs it (LUPA in the Makefile)
    except ImportError:
        report.fail("lupa is installed (make venv)", "run `make venv`: the Lua health check cannot be run")
        return
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    source = script.read_text()

    def to_lua(value):
        if isinstance(value, dict):
            return lua.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        return value

    run = lua.eval(f"function(obj) {source} end")
    for what, obj, want in ARGOCD_CASES:
        result = run(to_lua(obj))
        got = result["status"] if result is not None else None
        report.check(got == want, f"Argo CD health of a pipeline {what}: {want}",
                     f"got {got} ({result['message'] if result is not None else ''})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout to check (default: this one)")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every check")
    args = parser.parse_args()
    root = args.root.resolve()
    report = Report(args.verbose)
    render = load_render(root)
    crd = root / "crds" / "syncpipeline.yaml"
    print(f"check-manifests: kubernetes-validate {kubernetes_validate.__version__}, "
          f"Kubernetes {KUBERNETES_VERSION} schemas, strict")

    report.begin("CRD copies equal crds/syncpipeline.yaml")
    crd_bytes = crd.read_bytes()
    for copy in (root / "charts" / "monsoon" / "crds" / "syncpipeline.yaml",
                 root / "manifests" / render.CRD_FILE):
        rel = copy.relative_to(root)
        if not copy.exists():
            report.fail(f"{rel} exists", "missing: run `make manifests`")
        else:
            report.check(copy.read_bytes() == crd_bytes, f"{rel} is a byte copy",
                         diff(crd_bytes, copy.read_bytes(), "crds/syncpipeline.yaml", str(rel))
                         + "run `make manifests`")

    report.begin("manifests/ is up to date with charts/monsoon")
    chart = None
    try:
        chart = render.Chart(root / "charts" / "monsoon")
        with tempfile.TemporaryDirectory() as tmp:
            fresh_dir = Path(tmp) / "manifests"
            render.write_generated(fresh_dir, Path(tmp) / "chart-crd.yaml")
            fresh = {p.name: p.read_bytes() for p in fresh_dir.glob("*.yaml")}
        current = {p.name: p.read_bytes() for p in (root / "manifests").glob("*.yaml")}
        for name in sorted(set(fresh) | set(current)):
            if name not in current:
                report.fail(f"manifests/{name} exists", "missing: run `make manifests`")
            elif name not in fresh:
                report.fail(f"manifests/{name} is generated",
                            "charts/render.py does not generate it; `kubectl apply -f "
                            "manifests/` would apply it: remove it or run `make manifests`")
            else:
                report.check(fresh[name] == current[name], f"manifests/{name} is fresh",
                             diff(fresh[name], current[name], f"rendered/{name}",
                                  f"manifests/{name}") + "stale: run `make manifests`")
    except render.TemplateError as e:
        report.fail("the chart renders", str(e))

    validator = Validator(crd, report)
    report.check(("monsoon.dev/v1alpha1", "SyncPipeline") in validator.custom,
                 "crds/syncpipeline.yaml defines SyncPipeline monsoon.dev/v1alpha1",
                 f"found {sorted(validator.custom)}")

    report.begin("manifests/*.yaml against the API schemas")
    for path in sorted((root / "manifests").glob("*.yaml")):
        for obj in objects_of(path):
            validator.validate(obj, f"manifests/{path.name}")

    if chart is not None:
        for name, values in VARIANTS.items():
            report.begin(f"chart rendered with {name}")
            try:
                rendered = chart.render(values, "monsoon", "monsoon-system")
            except render.TemplateError as e:
                report.fail(f"chart[{name}] renders", str(e))
                continue
            report.check(bool(rendered.notes.strip()), f"chart[{name}]: NOTES.txt renders")
            objs = [d.obj for d in rendered.documents]
            for doc in rendered.documents:
                validator.validate(doc.obj, f"chart[{name}] {doc.source.split('/', 1)[1]}")
            try:
                check_chart_variant(report, name, objs, render.merge_values(chart.values, values),
                                    "monsoon", "monsoon-system", chart.meta)
            except (KeyError, TypeError, AttributeError, IndexError) as e:
                # A shape the checks did not expect (a field missing or of another type).
                report.fail(f"chart[{name}]: objects have the expected shape",
                            f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-1)}")

    report.begin("values.schema.json refuses typos and accepts every variant")
    schema_path = root / "charts" / "monsoon" / "values.schema.json"
    if chart is not None and report.check(schema_path.exists(), "charts/monsoon/values.schema.json exists"):
        schema = json.loads(schema_path.read_text())
        jsonschema.Draft7Validator.check_schema(schema)
        values_validator = jsonschema.Draft7Validator(schema)
        for name, values in VARIANTS.items():
            merged = render.merge_values(chart.values, values)
            errors = [e.message for e in values_validator.iter_errors(merged)]
            report.check(not errors, f"values.schema.json accepts {name}", "\n".join(errors))
        for what, values in REFUSED_VALUES:
            merged = render.merge_values(chart.values, values)
            report.check(any(True for _ in values_validator.iter_errors(merged)),
                         f"values.schema.json refuses {what}: {values}")
        report.check(bool(chart.meta.get("kubeVersion")), "Chart.yaml sets kubeVersion")
    kinds_in_manifests = [o.get("kind") for p in sorted((root / "manifests").glob("*.yaml"))
                          for o in objects_of(p)]
    report.check("Pod" not in kinds_in_manifests, "manifests/ holds no hook (the helm test Pod)")

    report.begin("charts/monsoon/argocd-health.lua on sample statuses")
    check_argocd_health(report, root / "charts" / "monsoon" / "argocd-health.lua")

    report.begin("charts/README.md documents every value")
    if chart is not None:
        readme = (root / "charts" / "README.md").read_text()
        documented = set(re.findall(r"^\| `([^`]+)` \|", readme, re.M))

        def covered(path: str, value) -> bool:
            # A value is documented by its own row, or (a map) by rows for all its keys.
            if path in documented:
                return True
            return isinstance(value, dict) and bool(value) and all(
                covered(f"{path}.{k}", v) for k, v in value.items())

        for key, value in chart.values.items():
            report.check(covered(key, value), f"charts/README.md values table has `{key}`",
                         "add a row for it (or for each of its keys)")

    report.begin("e2e/kind/*.yaml against the API schemas")
    e2e_files = sorted((root / "e2e" / "kind").glob("*.yaml"))
    report.check(bool(e2e_files), "e2e/kind/ has manifests")
    for path in e2e_files:
        for obj in objects_of(path):
            validator.validate(obj, f"e2e/kind/{path.name}")

    report.begin("examples/*.yaml against the CRD schema")
    example_files = sorted((root / "examples").glob("*.yaml"))
    report.check(bool(example_files), "examples/ has pipelines")
    for path in example_files:
        for obj in objects_of(path):
            if path.name not in STANDALONE_EXAMPLES:
                validator.validate(obj, f"examples/{path.name}", namespaced_check=False)
                continue
            why = STANDALONE_EXAMPLES[path.name]
            problems = validator.problems(obj, namespaced_check=False)
            report.check(bool(problems) and all(why in p for p in problems),
                         f"examples/{path.name} (for `monsoon run`): the CRD refuses it only "
                         f"because its values {why}", "\n".join(problems) or "accepted")

    report.begin("tests/crd-cases.yaml: what the CRD refuses")
    cases = yaml.safe_load((root / "tests" / "crd-cases.yaml").read_text())
    report.check(len(cases.get("refused") or []) >= 20, "tests/crd-cases.yaml lists refused cases")
    for case in cases.get("refused") or []:
        obj = merge_patch(cases["base"], case["patch"])
        problems = validator.problems(obj, namespaced_check=False)
        report.check(any(case["crd"] in p for p in problems),
                     f"refused: {case['name']}",
                     f"expected a problem containing {case['crd']!r}, got:\n"
                     + ("\n".join(problems) or "accepted"))
    for case in [{"name": "the base pipeline", "patch": {}}] + (cases.get("operatorOnly") or []):
        obj = merge_patch(cases["base"], case["patch"])
        problems = validator.problems(obj, namespaced_check=False)
        report.check(not problems, f"accepted by the CRD (the operator refuses it): {case['name']}"
                     if case["patch"] else f"accepted: {case['name']}", "\n".join(problems))

    rendered_dir = os.environ.get("MONSOON_RENDERED_DIR")
    if rendered_dir:
        report.begin(f"MONSOON_RENDERED_DIR={rendered_dir} against the API schemas")
        files = sorted(Path(rendered_dir).rglob("*.yaml")) if Path(rendered_dir).is_dir() else []
        if report.check(bool(files), f"{rendered_dir} holds *.yaml files",
                        "no such directory, or no *.yaml in it: nothing would be checked"):
            for path in files:
                try:
                    objs = objects_of(path)
                except yaml.YAMLError as e:
                    report.fail(f"{path} parses", str(e))
                    continue
                report.check(bool(objs), f"{path} holds objects")
                for obj in objs:
                    validator.validate(obj, str(path), namespaced_check=False)
    else:
        print("== MONSOON_RENDERED_DIR not set: no operator-rendered objects checked")

    for note in sorted(validator.notes):
        print(f"note: {note}")
    failed, skipped = len(report.failed), len(report.skipped)
    print(f"check-manifests: {report.passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
