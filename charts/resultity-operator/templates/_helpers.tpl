{{/* Full name: release-scoped, DNS-label safe. */}}
{{- define "resultity.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "resultity.selectorLabels" -}}
app.kubernetes.io/name: resultity-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "resultity.labels" -}}
{{ include "resultity.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: resultity
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "resultity.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "resultity.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
An image reference: the registry override replaces the repository's registry (the first path
element when it looks like a host), the digest wins over the tag. Call with
(dict "img" .Values.image "root" $).
*/}}
{{- define "resultity.image" -}}
{{- $repo := .img.repository -}}
{{- with include "resultity.imageRegistry" .root -}}
{{- $parts := splitList "/" $repo -}}
{{- $first := first $parts -}}
{{- if or (contains "." $first) (contains ":" $first) (eq $first "localhost") -}}
{{- $repo = rest $parts | join "/" -}}
{{- end -}}
{{- $repo = printf "%s/%s" (trimSuffix "/" .) $repo -}}
{{- end -}}
{{- if .img.digest -}}
{{- printf "%s@%s" $repo .img.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .root.Chart.AppVersion .img.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The registry override: `global.imageRegistry` (set once for every chart of an umbrella release)
wins over the chart's own `imageRegistry`.
*/}}
{{- define "resultity.imageRegistry" -}}
{{- dig "imageRegistry" "" (.Values.global | default dict) | default .Values.imageRegistry -}}
{{- end -}}

{{- define "resultity.operatorImage" -}}
{{- include "resultity.image" (dict "img" .Values.image "root" .) -}}
{{- end -}}

{{- define "resultity.sidecarImage" -}}
{{- include "resultity.image" (dict "img" .Values.sidecarImage "root" .) -}}
{{- end -}}

{{/* Labels of the pods the operator creates for ResultityNodes. */}}
{{- define "resultity.nodePodSelector" -}}
app.kubernetes.io/name: resultity-node
app.kubernetes.io/managed-by: resultity-operator
{{- end -}}

{{/* The network `helm test` checks: tests.* when set, else the chart-created network. */}}
{{- define "resultity.testIoEndpoint" -}}
{{- if .Values.tests.ioEndpoint -}}{{ .Values.tests.ioEndpoint }}{{- else if .Values.network.create -}}{{ .Values.network.ioEndpoint }}{{- end -}}
{{- end -}}
{{- define "resultity.testNetworkId" -}}
{{- if .Values.tests.networkId -}}{{ .Values.tests.networkId }}{{- else if .Values.network.create -}}{{ .Values.network.networkId }}{{- end -}}
{{- end -}}
{{- define "resultity.testKeys" -}}
{{- if .Values.tests.publicKeys -}}{{ join "," .Values.tests.publicKeys }}{{- else if .Values.network.create -}}{{ join "," .Values.network.publicKeys }}{{- end -}}
{{- end -}}

{{- define "resultity.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "resultity.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
Ports of the IO endpoint(s) as a JSON list: networkPolicy.ioPorts when set, else each port
named in network.ioEndpoint and tests.ioEndpoint, or the scheme's default (http 80, https 443).
*/}}
{{- define "resultity.ioPorts" -}}
{{- $ports := list -}}
{{- if .Values.networkPolicy.ioPorts -}}
{{- $ports = .Values.networkPolicy.ioPorts -}}
{{- else -}}
{{- range $url := list .Values.network.ioEndpoint .Values.tests.ioEndpoint -}}
{{- if $url -}}
{{- $u := urlParse $url -}}
{{- $port := regexFind ":[0-9]+$" $u.host | trimPrefix ":" -}}
{{- if not $port -}}
{{- $port = ternary "80" "443" (or (eq $u.scheme "http") (eq $u.scheme "ws")) -}}
{{- end -}}
{{- $ports = append $ports (int $port) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if not $ports -}}
{{- $ports = list 443 -}}
{{- end -}}
{{- toJson ($ports | uniq) -}}
{{- end -}}

{{/*
RBAC: exactly the verbs the operator's code uses (a test derives them from its API calls and
fails on a missing or extra verb). Server-side apply of a new object needs `create` besides
`patch`. Split by scope, so `rbac.namespaced` can grant the namespaced part in a Role.
*/}}
{{- define "resultity.rbac.clusterRules" -}}
- apiGroups: ["resultity.com"]
  resources: ["resultitynetworks"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["resultity.com"]
  resources: ["resultitynetworks/status"]
  verbs: ["patch"]
# Waits for its CRDs to be established before watching.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end -}}

{{- define "resultity.rbac.eventRules" -}}
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

{{- define "resultity.rbac.namespacedRules" -}}
# patch: the drain finalizer and the rollout-step label; create and delete: fleet members
# (server-side apply that creates an object is authorized as create too).
- apiGroups: ["resultity.com"]
  resources: ["resultitynodes"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["resultity.com"]
  resources: ["resultityfleets"]
  verbs: ["list", "watch"]
- apiGroups: ["resultity.com"]
  resources: ["resultitynodes/status", "resultityfleets/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Node identity Secrets (ed25519 key and admin token), created when absent.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "delete"]
# Per-node model cache claims (spec.modelCache.volumeClaimTemplate): read, and created by
# server-side apply when absent; never updated or deleted (garbage collection deletes
# them with their ResultityNode).
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "create", "patch"]
{{ include "resultity.rbac.eventRules" . }}
{{- end -}}
