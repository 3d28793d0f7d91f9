{{/*
Names and labels shared by every template of the chart (the monitoring templates too).
*/}}

{{- define "lora-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: RELEASE-lora-operator, or RELEASE when it already says so. */}}
{{- define "lora-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "lora-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object the chart renders. */}}
{{- define "lora-operator.labels" -}}
helm.sh/chart: {{ include "lora-operator.chart" . }}
{{ include "lora-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: lora-operator
{{- end }}

{{/* The operator pod's selector (never changes across upgrades). */}}
{{- define "lora-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lora-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels of the monitoring objects: the chart's labels plus monitoring.releaseLabels. */}}
{{- define "lora-operator.monitoringLabels" -}}
{{ include "lora-operator.labels" . }}
{{- with .Values.monitoring.releaseLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* "true" when prometheus-operator objects render: monitoring.enabled and the API served. */}}
{{- define "lora-operator.monitoringEnabled" -}}
{{- if and .Values.monitoring.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") -}}
true
{{- end -}}
{{- end }}

{{- define "lora-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lora-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lora-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* Peering (kopf) is on with more than one replica; its name is the release's full name. */}}
{{- define "lora-operator.peering" -}}
{{- if gt (int .Values.replicas) 1 -}}
{{ include "lora-operator.fullname" . }}
{{- end -}}
{{- end }}

{{/* Trainer pods the operator creates (PodMonitor selector). */}}
{{- define "lora-operator.trainerSelectorLabels" -}}
app.kubernetes.io/managed-by: lora-operator
lora-operator.dev/role: trainer
{{- end }}
