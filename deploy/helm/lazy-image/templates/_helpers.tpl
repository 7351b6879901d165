{{/* Common labels. */}}
{{- define "lazy-image.labels" -}}
app.kubernetes.io/name: lazy-image
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* An image reference: repository@digest when a digest is given, else repository:tag (the chart's appVersion when the tag is empty). */}}
{{- define "lazy-image.image" -}}
{{- $img := .img -}}
{{- if $img.digest -}}
{{ $img.repository }}@{{ $img.digest }}
{{- else -}}
{{ $img.repository }}:{{ $img.tag | default .chart.AppVersion }}
{{- end -}}
{{- end }}

{{/* The directory of the node plugin's socket on the host, and the socket kubelet dials. */}}
{{- define "lazy-image.pluginDir" -}}
{{ .Values.kubeletDir }}/plugins/{{ .Values.driverName }}
{{- end }}

{{/* The securityContext of every container that needs no privilege. */}}
{{- define "lazy-image.restricted" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: { drop: [ALL] }
{{- end }}
