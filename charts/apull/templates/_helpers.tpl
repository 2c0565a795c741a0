{{- define "apull.name" -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "apull.labels" -}}
app.kubernetes.io/name: apull
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "apull.selector" -}}
app.kubernetes.io/name: apull
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "apull.image" -}}
{{ required "image.repository is required (apull chart-image prints it)" .Values.image.repository }}:{{ required "image.tag is required (apull chart-image prints it)" .Values.image.tag }}
{{- end -}}

{{- define "apull.apiEnv" -}}
{{- if .Values.kubernetesApi.host }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.kubernetesApi.host | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .Values.kubernetesApi.port | quote }}
{{- end }}
{{- end -}}
