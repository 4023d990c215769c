{{/*
Names, labels and the operator's RBAC rules, shared by the templates.
Only a small subset of Helm's template language is used in this chart (see charts/render.py,
which renders it for manifests/ and the tests): value lookups, if/else/range/with, include,
and the functions default, quote, trunc, trimSuffix, join, toYaml, nindent.
*/}}

{{/* Name of every object: the release name, or fullnameOverride. */}}
{{- define "monsoon.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator pods. The component label keeps the selector apart from
the worker pods the operator creates, which carry their own labels. */}}
{{- define "monsoon.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels on every object. */}}
{{- define "monsoon.labels" -}}
{{ include "monsoon.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: monsoon
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "monsoon.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "monsoon.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image; the worker image defaults to it. */}}
{{- define "monsoon.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The leader-election Lease: one per release, so two releases in a namespace never share it. */}}
{{- define "monsoon.leaseName" -}}
{{- default (include "monsoon.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{- define "monsoon.workerImage" -}}
{{- default (include "monsoon.image" .) .Values.workerImage }}
{{- end }}

{{/*
What the operator does with the objects of the namespaces it watches: the same rules go into
the ClusterRole (all namespaces) or into a Role per watched namespace.
- Workers get per-pipeline Roles granting get/update/patch on their checkpoint ConfigMaps.
  Kubernetes lets the operator create such a Role only if it holds those verbs itself, which
  it does (configmaps below), so it needs neither `escalate` nor `bind`.
- Secrets: the operator only checks that a referenced Secret exists (get); it never lists or
  watches them, so it cannot enumerate credentials.
- Why no resourceNames: the objects are named after each pipeline, which RBAC cannot express
  ahead of time, and `create` and `list`/`watch` cannot be limited by name at all. The
  operator's watches select its own objects by label (app.kubernetes.io/managed-by,
  monsoon.dev/checkpoint), so its cache holds nothing else; set watchNamespaces to keep it out
  of every other namespace (kube-system included).
*/}}
{{- define "monsoon.operatorRules" -}}
- apiGroups: ["monsoon.dev"]
  resources: ["syncpipelines"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["monsoon.dev"]
  resources: ["syncpipelines/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["monsoon.dev"]
  resources: ["syncpipelines/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["services", "serviceaccounts", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
