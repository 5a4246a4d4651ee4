{{/* Chart name, overridable for forks. */}}
{{- define "kuberlhf.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped name of every object; the release name alone when it already says kuberlhf. */}}
{{- define "kuberlhf.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels that select the operator pod; never change them on upgrade (selectors are immutable). */}}
{{- define "kuberlhf.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kuberlhf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kuberlhf.labels" -}}
{{ include "kuberlhf.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kuberlhf
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "kuberlhf.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kuberlhf.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kuberlhf.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The namespaces the operator watches, comma-separated; empty when it watches every namespace.
Usage: include "kuberlhf.watchNamespaces" . | splitList ","  (after checking clusterWide)
*/}}
{{- define "kuberlhf.watchNamespaces" -}}
{{- if .Values.clusterWide -}}
{{- if .Values.watchNamespaces -}}
{{- fail "clusterWide: true already watches every namespace; leave watchNamespaces empty or set clusterWide: false" -}}
{{- end -}}
{{- else -}}
{{- join "," (default (list .Release.Namespace) .Values.watchNamespaces) -}}
{{- end -}}
{{- end -}}

{{/*
The operator's permissions, read from files/operator-rbac.yaml (their single source).
Usage: include "kuberlhf.rules" (list . "namespaced")
*/}}
{{- define "kuberlhf.rules" -}}
{{- $root := index . 0 -}}
{{- $rules := $root.Files.Get "files/operator-rbac.yaml" | fromYaml -}}
{{- with index $rules (index . 1) }}{{ toYaml . }}{{ end -}}
{{- end -}}
