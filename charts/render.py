#!/usr/bin/env python3
"""Renders the monsoon Helm chart without Helm, and generates manifests/ from it.

`python3 charts/render.py` (or `make manifests`) writes:
  manifests/00-namespace.yaml          the monsoon-system Namespace
  manifests/01-crd-syncpipeline.yaml   a byte copy of crds/syncpipeline.yaml
  manifests/02-operator.yaml           the chart's templates for release "monsoon" in namespace
                                       "monsoon-system" with the default values
  charts/monsoon/crds/syncpipeline.yaml  a byte copy of crds/syncpipeline.yaml (Helm installs
                                       CRDs from the chart's crds/ folder)

`python3 charts/render.py --stdout [-f my-values.yaml] [--release R] [--namespace N]` prints the
chart's objects like `helm template` does, for an install without Helm with other values.

tests/check_manifests.py imports this module to re-render and compare.

The renderer implements exactly the subset of Helm's template language (Go text/template plus a
few Sprig functions) that charts/monsoon uses, with Go's semantics:
  - actions `{{ }}` with `{{-` / `-}}` whitespace trimming, comments `{{/* */}}`;
  - `define`, `if` / `else if` / `else`, `range` (lists and maps, optional `$i, $v :=`),
    `with`, `end`; variables `$` and `$name :=`;
  - pipelines with `|`, parenthesised sub-pipelines, string/number/bool literals;
  - field lookups on `.Values`, `.Release`, `.Chart`;
  - functions include, toYaml, nindent, default, quote, trunc, trimSuffix, join.
Anything else is an error rather than a guess. Two differences from Helm, both stricter:
  - looking up a key that does not exist is an error (Helm prints nothing), so a misspelled
    value name in a template fails the tests instead of silently rendering an empty string;
  - printing a number of a million or more, or a fraction, is an error (Helm would print
    `1e+06`).
toYaml writes what Helm's does (keys sorted, two-space indent, lists not indented under their
key, `"1"` double-quoted); rare strings may be quoted in another, equivalent style.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = ROOT / "charts" / "monsoon"
CRD_SOURCE = ROOT / "crds" / "syncpipeline.yaml"
MANIFESTS_DIR = ROOT / "manifests"

# The plain-YAML install: release name and namespace of `kubectl apply -f manifests/`.
RELEASE_NAME = "monsoon"
RELEASE_NAMESPACE = "monsoon-system"

# Files render.py generates, relative to the output directory.
NAMESPACE_FILE = "00-namespace.yaml"
CRD_FILE = "01-crd-syncpipeline.yaml"
OPERATOR_FILE = "02-operator.yaml"
CHART_CRD_COPY = CHART_DIR / "crds" / "syncpipeline.yaml"

# Helm's install order (helm.sh/helm/v3/pkg/releaseutil/kind_sorter.go); other kinds go last.
INSTALL_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange",
    "PodSecurityPolicy", "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList",
    "ConfigMap", "StorageClass", "PersistentVolume", "PersistentVolumeClaim",
    "CustomResourceDefinition", "ClusterRole", "ClusterRoleList", "ClusterRoleBinding",
    "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList", "Service",
    "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress",
    "APIService", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
]


class TemplateError(Exception):
    """A template that this renderer cannot render (or Helm would reject)."""


# ---------------------------------------------------------------------------------------------
# Parsing: text and actions into a tree.
# ---------------------------------------------------------------------------------------------

# `{{- ` trims white space before the action, ` -}}` after it (Go requires the space).
_ACTION = re.compile(r"\{\{(-[ \t\r\n])?(.*?)([ \t\r\n]-)?\}\}", re.S)
_WS = " \t\r\n"


@dataclass
class Text:
    text: str


@dataclass
class Action:
    pipe: "Pipeline"
    line: int


@dataclass
class If:
    pipe: "Pipeline"
    then: list
    otherwise: list
    line: int


@dataclass
class Range:
    pipe: "Pipeline"
    body: list
    otherwise: list
    line: int


@dataclass
class With:
    pipe: "Pipeline"
    body: list
    otherwise: list
    line: int


@dataclass
class Pipeline:
    decl: list  # variable names declared with `:=` (without the `$`)
    commands: list  # each a list of operands


@dataclass
class Field:
    base: str  # "." for dot, "$" or "$name" for a variable
    names: list


@dataclass
class Func:
    name: str


@dataclass
class Literal:
    value: Any


_TOKEN = re.compile(
    r"""\s*(?:
      (?P<string>"(?:[^"\\]|\\.)*")
    | (?P<raw>`[^`]*`)
    | (?P<number>-?\d+)
    | (?P<declare>:=)
    | (?P<punct>[()|,])
    | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
    | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.X,
)


def _tokens(src: str, where: str) -> list:
    out, pos = [], 0
    src = src.rstrip()
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"{where}: cannot parse {src[pos:]!r}")
        pos = m.end()
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
    return out


def _go_string(lit: str, where: str) -> str:
    body = lit[1:-1]
    escapes = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}

    def unescape(m: re.Match) -> str:
        ch = m.group(1)
        if ch not in escapes:
            raise TemplateError(f"{where}: unsupported escape \\{ch} in {lit}")
        return escapes[ch]

    return re.sub(r"\\(.)", unescape, body)


def _parse_pipeline(src: str, where: str, allow_decl: int = 1) -> Pipeline:
    toks = _tokens(src, where)
    decl: list = []
    # `$x :=` or, for range, `$i, $v :=`.
    if any(k == "declare" for k, _ in toks):
        i = [k for k, _ in toks].index("declare")
        names = [v for k, v in toks[:i] if k != "punct" or v != ","]
        if not 1 <= len(names) <= allow_decl or any(
            not re.fullmatch(r"\$[A-Za-z0-9_]+", n) for n in names
        ):
            raise TemplateError(f"{where}: bad variable declaration in {src!r}")
        decl = [n[1:] for n in names]
        toks = toks[i + 1:]
    pos = 0

    def parse_pipe(stop: str | None) -> list:
        nonlocal pos
        commands, current = [], []
        while pos < len(toks):
            kind, val = toks[pos]
            if kind == "punct" and val == ")":
                if stop != ")":
                    raise TemplateError(f"{where}: unbalanced ')' in {src!r}")
                break
            pos += 1
            if kind == "punct" and val == "|":
                if not current:
                    raise TemplateError(f"{where}: empty command in {src!r}")
                commands.append(current)
                current = []
            elif kind == "punct" and val == "(":
                inner = parse_pipe(")")
                if pos >= len(toks) or toks[pos] != ("punct", ")"):
                    raise TemplateError(f"{where}: missing ')' in {src!r}")
                pos += 1
                current.append(Pipeline([], inner))
            elif kind == "string":
                current.append(Literal(_go_string(val, where)))
            elif kind == "raw":
                current.append(Literal(val[1:-1]))
            elif kind == "number":
                current.append(Literal(int(val)))
            elif kind == "var":
                base, *names = val.split(".")
                current.append(Field(base, names))
            elif kind == "field":
                current.append(Field(".", [n for n in val.split(".") if n]))
            elif kind == "ident":
                if val in ("true", "false"):
                    current.append(Literal(val == "true"))
                elif val == "nil":
                    current.append(Literal(None))
                else:
                    current.append(Func(val))
            else:
                raise TemplateError(f"{where}: unexpected {val!r} in {src!r}")
        if not current:
            raise TemplateError(f"{where}: empty pipeline in {src!r}")
        commands.append(current)
        return commands

    commands = parse_pipe(None)
    if pos != len(toks):
        raise TemplateError(f"{where}: unexpected {toks[pos][1]!r} in {src!r}")
    return Pipeline(decl, commands)


def parse(source: str, name: str) -> tuple[list, dict]:
    """Parses a template file into its top-level nodes and the templates it defines."""
    # Split into text and actions, applying the trim markers.
    pieces: list = []
    pos = 0
    for m in _ACTION.finditer(source):
        pieces.append(["text", source[pos:m.start()]])
        line = source.count("\n", 0, m.start()) + 1
        pieces.append(["action", m.group(2).strip(), bool(m.group(1)), bool(m.group(3)), line])
        pos = m.end()
    pieces.append(["text", source[pos:]])
    for i, p in enumerate(pieces):
        if p[0] == "action":
            if p[2]:
                pieces[i - 1][1] = pieces[i - 1][1].rstrip(_WS)
            if p[3]:
                pieces[i + 1][1] = pieces[i + 1][1].lstrip(_WS)
    if any("{{" in p[1] for p in pieces if p[0] == "text"):
        raise TemplateError(f"{name}: unterminated or malformed action")

    defines: dict = {}
    items = iter(pieces)

    def block(end_words: tuple) -> tuple[list, tuple]:
        """Nodes up to one of end_words; returns them and the (word, rest, line) that ended."""
        nodes: list = []
        for p in items:
            if p[0] == "text":
                if p[1]:
                    nodes.append(Text(p[1]))
                continue
            body, line = p[1], p[4]
            where = f"{name}:{line}"
            if body.startswith("/*"):
                if not body.endswith("*/"):
                    raise TemplateError(f"{where}: unterminated comment")
                continue
            word, _, rest = body.partition(" ")
            rest = rest.strip()
            if word in ("end", "else"):
                if word not in end_words:
                    raise TemplateError(f"{where}: unexpected {{{{ {word} }}}}")
                return nodes, (word, rest, line)
            if word == "if":
                nodes.append(parse_if(rest, where, line))
            elif word in ("range", "with"):
                pipe = _parse_pipeline(rest, where, allow_decl=2 if word == "range" else 1)
                body_nodes, ended = block(("end", "else"))
                otherwise: list = []
                if ended[0] == "else":
                    if ended[1]:
                        raise TemplateError(f"{where}: `else {ended[1]}` after {word}")
                    otherwise, _ = block(("end",))
                cls = Range if word == "range" else With
                nodes.append(cls(pipe, body_nodes, otherwise, line))
            elif word == "define":
                m = re.fullmatch(r'"([^"]+)"', rest)
                if not m:
                    raise TemplateError(f"{where}: define needs a quoted name")
                defines[m.group(1)], _ = block(("end",))
            elif word in ("template", "block", "break", "continue"):
                raise TemplateError(f"{where}: {word} is outside the supported subset")
            else:
                nodes.append(Action(_parse_pipeline(body, where), line))
        if end_words:
            raise TemplateError(f"{name}: missing {{{{ end }}}}")
        return nodes, ("eof", "", 0)

    def parse_if(cond: str, where: str, line: int) -> If:
        pipe = _parse_pipeline(cond, where)
        then, ended = block(("end", "else"))
        otherwise: list = []
        if ended[0] == "else":
            word, _, rest = ended[1].partition(" ")
            if word == "if":
                otherwise = [parse_if(rest.strip(), f"{name}:{ended[2]}", ended[2])]
            elif ended[1]:
                raise TemplateError(f"{name}:{ended[2]}: `else {ended[1]}` is not supported")
            else:
                otherwise, _ = block(("end",))
        return If(pipe, then, otherwise, line)

    nodes, _ = block(())
    return nodes, defines


# ---------------------------------------------------------------------------------------------
# Execution.
# ---------------------------------------------------------------------------------------------


def truthy(value: Any) -> bool:
    """Go templates' truth: false, 0, nil and empty strings, lists and maps are false."""
    if value is None or value is False:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    if isinstance(value, (str, list, dict)):
        return len(value) > 0
    return True


class _HelmDumper(yaml.SafeDumper):
    """Quotes strings as Helm's YAML library (go-yaml v2) does: double quotes for a string
    that would read back as another type (`"1"`, `"true"`, `""`), a literal block for several
    lines; otherwise PyYAML's choice (plain where it can)."""


def _represent_str(dumper: yaml.SafeDumper, s: str) -> yaml.ScalarNode:
    tag = "tag:yaml.org,2002:str"
    if "\n" in s:
        return dumper.represent_scalar(tag, s, style="|")
    # go-yaml v2 also reads y/Y/n/N as booleans (YAML 1.1); PyYAML does not.
    if dumper.resolve(yaml.ScalarNode, s, (True, False)) != tag or s in ("y", "Y", "n", "N"):
        return dumper.represent_scalar(tag, s, style='"')
    return dumper.represent_scalar(tag, s)


_HelmDumper.add_representer(str, _represent_str)


def to_yaml(value: Any) -> str:
    """Helm's toYaml: the YAML of a value without the final newline."""
    text = yaml.dump(value, Dumper=_HelmDumper, default_flow_style=False, sort_keys=True,
                     width=1 << 30, allow_unicode=True)
    if text.endswith("\n...\n"):  # a bare scalar
        text = text[: -len("...\n")]
    return text.rstrip("\n") if text.endswith("\n") else text


def _indent(n: int, s: str) -> str:
    pad = " " * n
    return pad + s.replace("\n", "\n" + pad)


def _go_quote(s: Any) -> str:
    s = _print(s)
    if any(ord(c) < 0x20 and c not in "\n\t\r" for c in s):
        raise TemplateError(f"quote: control characters in {s!r}")
    escaped = s.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") + '"'


def _trunc(n: int, s: str) -> str:
    if n < 0:
        return s[n:] if len(s) + n > 0 else s
    return s[:n]


def _print(value: Any) -> str:
    """How Go's template engine prints a value (with Helm's `<no value>` as empty)."""
    if value is None:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        if abs(value) >= 1_000_000:
            raise TemplateError(f"Helm prints {value} in float notation; quote it in values")
        return str(int(value))
    if isinstance(value, float):
        raise TemplateError(f"refusing to print the fraction {value}; quote it in values")
    if isinstance(value, str):
        return value
    raise TemplateError(f"cannot print a {type(value).__name__} (use toYaml): {value!r}")


class Chart:
    """A chart's templates and default values, ready to render."""

    def __init__(self, chart_dir: Path = CHART_DIR):
        self.dir = chart_dir
        meta = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
        self.meta = meta
        self.values = yaml.safe_load((chart_dir / "values.yaml").read_text()) or {}
        self.defines: dict = {}
        self.templates: dict = {}  # name -> nodes, for files that produce output
        self.notes = None
        for path in sorted((chart_dir / "templates").iterdir()):
            if not path.is_file():
                continue
            nodes, defines = parse(path.read_text(), f"templates/{path.name}")
            for dname, dnodes in defines.items():
                if dname in self.defines:
                    raise TemplateError(f"template {dname!r} is defined twice")
                self.defines[dname] = dnodes
            if path.name == "NOTES.txt":
                self.notes = nodes
            elif not path.name.startswith("_") and path.suffix in (".yaml", ".yml", ".tpl"):
                self.templates[path.name] = nodes

    def context(self, values: dict, release: str, namespace: str, service: str) -> dict:
        return {
            "Values": values,
            "Release": {"Name": release, "Namespace": namespace, "Service": service,
                        "IsInstall": True, "IsUpgrade": False, "Revision": 1},
            "Chart": {"Name": self.meta["name"], "Version": self.meta["version"],
                      "AppVersion": str(self.meta.get("appVersion", "")),
                      "Description": self.meta.get("description", ""),
                      "Type": self.meta.get("type", "application")},
        }

    def render(self, values: dict | None = None, release: str = RELEASE_NAME,
               namespace: str = RELEASE_NAMESPACE, service: str = "Helm") -> "Rendered":
        merged = merge_values(self.values, values or {})
        ctx = self.context(merged, release, namespace, service)
        docs = []
        for tname, nodes in self.templates.items():
            text = _Exec(self).run(nodes, ctx, f"templates/{tname}")
            for i, doc in enumerate(split_documents(text)):
                obj = yaml.safe_load(doc)
                if obj is None:
                    continue
                where = f"templates/{tname} (document {i + 1})"
                if not isinstance(obj, dict) or not all(
                    k in obj for k in ("apiVersion", "kind", "metadata")
                ) or "name" not in (obj.get("metadata") or {}):
                    raise TemplateError(f"{where}: not a Kubernetes object:\n{doc}")
                docs.append(Document(f"{self.meta['name']}/templates/{tname}", doc, obj))
        order = {k: i for i, k in enumerate(INSTALL_ORDER)}
        docs.sort(key=lambda d: order.get(d.obj["kind"], len(order)))  # stable
        notes = _Exec(self).run(self.notes, ctx, "templates/NOTES.txt") if self.notes else ""
        return Rendered(docs, notes)


@dataclass
class Document:
    source: str  # e.g. monsoon/templates/deployment.yaml
    text: str  # the rendered text, as Helm would send it
    obj: dict  # the parsed object


@dataclass
class Rendered:
    documents: list
    notes: str

    def text(self) -> str:
        """All objects in install order, in `helm template`'s format."""
        return "".join(f"---\n# Source: {d.source}\n{d.text}\n" for d in self.documents)


def split_documents(text: str) -> list:
    """Splits a rendered file on `---` lines, dropping empty documents."""
    docs = re.split(r"(?m)^---[ \t]*(?:\n|$)", text)
    out = []
    for doc in docs:
        lines = doc.split("\n")
        while lines and not lines[0].strip():
            lines.pop(0)
        while lines and not lines[-1].strip():
            lines.pop()
        if lines:
            out.append("\n".join(lines))
    return out


def merge_values(base: dict, override: dict) -> dict:
    """Helm's merge of user values into defaults: maps merge, everything else replaces,
    null deletes."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _Exec:
    """One execution of a template with Go's scoping of `.`, `$` and variables."""

    def __init__(self, chart: Chart, depth: int = 0):
        self.chart = chart
        self.depth = depth
        self.funcs: dict[str, Callable] = {
            "include": self._include,
            "toYaml": to_yaml,
            "nindent": lambda n, s: "\n" + _indent(n, _print(s)),
            "default": lambda d, given=None: given if truthy(given) else d,
            "quote": _go_quote,
            "trunc": lambda n, s: _trunc(n, _print(s)),
            "trimSuffix": lambda suf, s: s[: -len(suf)] if suf and s.endswith(suf) else s,
            "join": lambda sep, items: sep.join(_print(i) for i in (items or []) if i is not None),
        }

    def run(self, nodes: list, dot: Any, where: str) -> str:
        self.where = where
        out: list = []
        self._nodes(nodes, dot, [{"": dot}], out)
        return "".join(out)

    def _include(self, name: str, data: Any = None) -> str:
        if name not in self.chart.defines:
            raise TemplateError(f"{self.where}: include of undefined template {name!r}")
        if self.depth > 50:
            raise TemplateError(f"{self.where}: include nested too deeply at {name!r}")
        return _Exec(self.chart, self.depth + 1).run(self.chart.defines[name], data, name)

    def _nodes(self, nodes: list, dot: Any, scopes: list, out: list) -> None:
        for node in nodes:
            if isinstance(node, Text):
                out.append(node.text)
            elif isinstance(node, Action):
                value = self._pipeline(node.pipe, dot, scopes, node.line)
                if not node.pipe.decl:
                    out.append(_print(value))
            elif isinstance(node, If):
                # A variable declared in the condition lives until the matching end.
                inner = scopes + [{}]
                branch = node.then if truthy(self._pipeline(node.pipe, dot, inner, node.line)) \
                    else node.otherwise
                self._nodes(branch, dot, inner, out)
            elif isinstance(node, With):
                inner = scopes + [{}]
                value = self._pipeline(node.pipe, dot, inner, node.line)
                if truthy(value):
                    self._nodes(node.body, value, inner, out)
                else:
                    self._nodes(node.otherwise, dot, inner, out)
            elif isinstance(node, Range):
                decl = node.pipe.decl
                value = self._pipeline(Pipeline([], node.pipe.commands), dot, scopes, node.line)
                if isinstance(value, dict):
                    pairs = [(k, value[k]) for k in sorted(value)]
                elif isinstance(value, list):
                    pairs = list(enumerate(value))
                elif value is None:
                    pairs = []
                else:
                    raise TemplateError(f"{self.where}:{node.line}: range over {value!r}")
                if not pairs:
                    self._nodes(node.otherwise, dot, scopes + [{}], out)
                for key, item in pairs:
                    scope: dict = {}
                    if len(decl) == 1:
                        scope[decl[0]] = item
                    elif len(decl) == 2:
                        scope[decl[0]], scope[decl[1]] = key, item
                    self._nodes(node.body, item, scopes + [scope], out)
            else:  # pragma: no cover
                raise TemplateError(f"{self.where}: unknown node {node!r}")

    def _pipeline(self, pipe: Pipeline, dot: Any, scopes: list, line: int) -> Any:
        value: Any = None
        for i, command in enumerate(pipe.commands):
            value = self._command(command, dot, scopes, line, value, piped=i > 0)
        if pipe.decl:
            scopes[-1][pipe.decl[0]] = value
        return value

    def _command(self, command: list, dot: Any, scopes: list, line: int, prev: Any,
                 piped: bool) -> Any:
        where = f"{self.where}:{line}"
        head, args = command[0], command[1:]
        if isinstance(head, Func):
            fn = self.funcs.get(head.name)
            if fn is None:
                raise TemplateError(f"{where}: function {head.name!r} is outside the subset")
            values = [self._operand(a, dot, scopes, line) for a in args]
            if piped:
                values.append(prev)
            try:
                return fn(*values)
            except TypeError as e:
                raise TemplateError(f"{where}: wrong arguments to {head.name}: {e}") from e
        if args or piped:
            raise TemplateError(f"{where}: arguments given to a non-function")
        if isinstance(head, Literal) and head.value is None:
            raise TemplateError(f"{where}: nil is not a command")  # as in Go
        return self._operand(head, dot, scopes, line)

    def _operand(self, operand: Any, dot: Any, scopes: list, line: int) -> Any:
        where = f"{self.where}:{line}"
        if isinstance(operand, Literal):
            return operand.value
        if isinstance(operand, Pipeline):
            return self._pipeline(operand, dot, scopes, line)
        if isinstance(operand, Func):
            return self._command([operand], dot, scopes, line, None, False)
        if isinstance(operand, Field):
            if operand.base == ".":
                value, path = dot, ""
            else:
                name = "" if operand.base == "$" else operand.base[1:]
                for scope in reversed(scopes):
                    if name in scope:
                        value = scope[name]
                        break
                else:
                    raise TemplateError(f"{where}: undefined variable {operand.base}")
                path = operand.base
            for fname in operand.names:
                path += "." + fname
                if not isinstance(value, dict):
                    raise TemplateError(f"{where}: {path}: cannot look up a field of {value!r}")
                if fname not in value:
                    raise TemplateError(f"{where}: {path} is not defined (values.yaml?)")
                value = value[fname]
            return value
        raise TemplateError(f"{where}: unknown operand {operand!r}")  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# manifests/
# ---------------------------------------------------------------------------------------------

GENERATED = "Generated by charts/render.py; do not edit. Regenerate with `make manifests`."

NAMESPACE_YAML = f"""# {GENERATED}
apiVersion: v1
kind: Namespace
metadata:
  name: {RELEASE_NAMESPACE}
  labels:
    app.kubernetes.io/part-of: monsoon
    # The operator pod meets the `restricted` Pod Security Standard: enforce it here.
    pod-security.kubernetes.io/enforce: restricted
"""


def is_hook(obj: dict) -> bool:
    """A Helm hook (`helm.sh/hook` annotation): run by Helm on its own command, not installed."""
    return "helm.sh/hook" in ((obj.get("metadata") or {}).get("annotations") or {})


def manifests(chart: Chart | None = None) -> dict[str, bytes]:
    """The files of manifests/ (name -> content), rendered from the chart's defaults."""
    chart = chart or Chart()
    rendered = chart.render(service="kubectl")
    # Hooks (the `helm test` Pod) run on Helm's command, never as part of an install.
    rendered = Rendered([d for d in rendered.documents if not is_hook(d.obj)], rendered.notes)
    header = (
        f"# {GENERATED}\n"
        f"# charts/monsoon with its default values, release {RELEASE_NAME!r} in namespace\n"
        f"# {RELEASE_NAMESPACE!r}. Apply the whole folder: `kubectl apply -f manifests/`.\n"
    )
    return {
        NAMESPACE_FILE: NAMESPACE_YAML.encode(),
        CRD_FILE: CRD_SOURCE.read_bytes(),
        OPERATOR_FILE: (header + rendered.text()).encode(),
    }


def write_generated(out_dir: Path = MANIFESTS_DIR, chart_crd: Path = CHART_CRD_COPY) -> list:
    """Writes manifests/ (and the chart's CRD copy); returns the paths that changed."""
    changed = []
    files = manifests()
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = {out_dir / name: content for name, content in files.items()}
    targets[chart_crd] = CRD_SOURCE.read_bytes()
    for path, content in targets.items():
        if not path.exists() or path.read_bytes() != content:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            changed.append(path)
    # A file that render.py no longer generates would still be applied by `kubectl apply -f`.
    for path in sorted(out_dir.glob("*.yaml")):
        if path.name not in files:
            path.unlink()
            changed.append(path)
    return changed


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=MANIFESTS_DIR,
                        help="where to write the plain-YAML install (default: manifests/)")
    parser.add_argument("--stdout", action="store_true",
                        help="print the chart's objects instead (like `helm template`)")
    parser.add_argument("-f", "--values", type=Path, action="append", default=[],
                        help="with --stdout: a values file (repeatable, later ones win)")
    parser.add_argument("--release", default=RELEASE_NAME, help="with --stdout: release name")
    parser.add_argument("--namespace", default=RELEASE_NAMESPACE,
                        help="with --stdout: release namespace")
    args = parser.parse_args(argv)
    try:
        if args.stdout:
            values: dict = {}
            for path in args.values:
                values = merge_values(values, yaml.safe_load(path.read_text()) or {})
            sys.stdout.write(Chart().render(values, args.release, args.namespace).text())
            return 0
        if args.values:
            parser.error("-f/--values only goes with --stdout; manifests/ uses the defaults")
        changed = write_generated(args.out)
    except TemplateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in changed:
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    if not changed:
        print("manifests/ and the chart's CRD copy are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
