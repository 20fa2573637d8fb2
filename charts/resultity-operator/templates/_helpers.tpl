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
{{- with .root.Values.imageRegistry -}}
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
