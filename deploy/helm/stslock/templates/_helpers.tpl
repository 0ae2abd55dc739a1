{{- define "stslock.labels" -}}
app.kubernetes.io/name: stslock
{{- end }}

{{- define "stslock.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* An optional STSLOCK_* variable: left out when the value is empty. */}}
{{- define "stslock.optionalEnv" -}}
{{- if ne (toString .value) "" }}
- name: {{ .name }}
  value: {{ toString .value | quote }}
{{- end }}
{{- end }}
