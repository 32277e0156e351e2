{{- define "authprobe.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "authprobe.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "authprobe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "authprobe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "authprobe.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "authprobe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "authprobe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "authprobe.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "authprobe.endpoints" -}}
{{- $pairs := list }}
{{- range $service, $url := .Values.google.endpoints }}
{{- $pairs = append $pairs (printf "%s=%s" $service $url) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{- /* A Go duration (90s, 30m, 1h30m) in seconds, for PromQL comparisons. */ -}}
{{- define "authprobe.seconds" -}}
{{- $total := 0 -}}
{{- range $part := regexFindAll "[0-9]+[hms]" . -1 -}}
{{- $n := int (trimSuffix "h" (trimSuffix "m" (trimSuffix "s" $part))) -}}
{{- if hasSuffix "h" $part }}{{ $total = add $total (mul $n 3600) }}{{ else if hasSuffix "m" $part }}{{ $total = add $total (mul $n 60) }}{{ else }}{{ $total = add $total $n }}{{ end -}}
{{- end -}}
{{- $total -}}
{{- end }}

{{- /* The leader-election Lease, one per release: two releases in one namespace never share it. */ -}}
{{- define "authprobe.leaseName" -}}
{{- printf "%s-leader" (include "authprobe.fullname" .) }}
{{- end }}

{{- /* Values the schema cannot judge alone. */ -}}
{{- define "authprobe.validate" -}}
{{- if and (not .Values.leaderElection.enabled) (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "replicaCount=%d needs leaderElection.enabled=true: without a Lease every replica would reconcile, write status and mint tokens. Set replicaCount=1 or enable leader election." (int .Values.replicaCount)) }}
{{- end }}
{{- end }}
