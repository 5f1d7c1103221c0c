{{/* Names */}}
{{- define "rlp-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rlp-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else if hasPrefix (printf "%s-" .Release.Name) $name }}
{{- /* `helm install rlp charts/rlp-operator` → rlp-operator, not rlp-rlp-operator */}}
{{- $name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "rlp-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels. app.kubernetes.io/name is fixed ("rlp-operator"): the ServiceMonitor takes the scrape job's
name from it, and the alerts select job="rlp-operator". */}}
{{- define "rlp-operator.selectorLabels" -}}
app.kubernetes.io/name: rlp-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rlp-operator.labels" -}}
helm.sh/chart: {{ include "rlp-operator.chart" . }}
{{ include "rlp-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rlp
{{- end }}

{{- define "rlp-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rlp-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "rlp-operator.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The phase Jobs' image: jobDefaults.image, else rlp-job at the chart's appVersion (scripts/build-images.sh's name) */}}
{{- define "rlp-operator.jobImage" -}}
{{- default (printf "rlp-job:%s" .Chart.AppVersion) .Values.jobDefaults.image }}
{{- end }}

{{/* Watch scope:
  "cluster"    no watchNamespaces: every namespace (ClusterRole + ClusterRoleBinding)
  "patterns"   some watchNamespaces are globs: cluster-wide rights, plus list/watch on namespaces
  "namespaced" exact names only: a Role + RoleBinding in each watched namespace */}}
{{- define "rlp-operator.scope" -}}
{{- if not .Values.watchNamespaces }}cluster
{{- else }}
{{- $glob := false }}
{{- range .Values.watchNamespaces }}{{ if regexMatch "[*?\\[\\]]" . }}{{ $glob = true }}{{ end }}{{ end }}
{{- if $glob }}patterns{{ else }}namespaced{{ end }}
{{- end }}
{{- end }}

{{- define "rlp-operator.peering" -}}
{{- if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}

{{- /* Fails the install when a monitoring object is asked for but the cluster does not serve its kind
(the Prometheus Operator's CRDs are missing): helm's own error would only be "no matches for kind".
Checked only against a cluster (`lookup` finds the default namespace): `helm template` and `helm lint`
know no cluster's APIs. Usage: include "rlp-operator.requireMonitoringKind" (list . "ServiceMonitor") */}}
{{- define "rlp-operator.requireMonitoringKind" -}}
{{- $ctx := index . 0 }}
{{- $kind := index . 1 }}
{{- if and (lookup "v1" "Namespace" "" "default") (not ($ctx.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" $kind))) }}
{{- fail (printf "%s is enabled but this cluster does not serve monitoring.coreos.com/v1 %s: install the Prometheus Operator's CRDs first (e.g. the kube-prometheus-stack chart), or turn the value off; see docs/install.md#monitoring" $kind $kind) }}
{{- end }}
{{- end }}
