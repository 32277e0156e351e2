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

{{- /* The canary Jobs' image: canary.image, each part defaulting to the operator's own. */ -}}
{{- define "authprobe.canaryImage" -}}
{{- $repository := .Values.canary.image.repository | default .Values.image.repository }}
{{- $tag := .Values.canary.image.tag | default .Values.image.tag | default .Chart.AppVersion }}
{{- printf "%s:%s" $repository $tag }}
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

{{- /* An alert's labels: severity, then the alert's own labels, then metrics.prometheusRule.alertLabels. */ -}}
{{- define "authprobe.alertLabels" -}}
{{- $root := index . 0 }}
{{- $alert := index . 1 }}
{{- $labels := merge (dict "severity" $alert.severity) (deepCopy ($alert.labels | default dict)) (deepCopy ($root.Values.metrics.prometheusRule.alertLabels | default dict)) }}
{{- toYaml $labels }}
{{- end }}

{{- /* runbook_url for an alert: the README section named after it, under metrics.prometheusRule.runbookBaseUrl. */ -}}
{{- define "authprobe.runbook" -}}
{{- $root := index . 0 }}
{{- $alert := index . 1 }}
{{- with $root.Values.metrics.prometheusRule.runbookBaseUrl -}}
runbook_url: {{ printf "%s#%s" . (lower $alert) | quote }}
{{- end }}
{{- end }}

{{- /*
PromQL: a series of authprobe's, one per probe-level label set whichever replica exports it.
Labels naming a replica or a scrape (aggregateAway) are aggregated away. While the operator is
live for the probe (a replica exports its authprobe_last_probe_timestamp_seconds now), that is
the current value, so a recovery counts at once. While none does (the leader died and the next
has not finished its first pass, or a scrape failed), the last value within failoverTolerance
bridges the gap, so `for:` timers do not restart. Takes (list $ "SERIES").
*/ -}}
{{- define "authprobe.promql.bridged" -}}
{{- $rule := (index . 0).Values.metrics.prometheusRule }}
{{- $series := index . 1 }}
{{- $away := join ", " $rule.aggregateAway -}}
(
    max without ({{ $away }}) ({{ $series }})
  or
    (
        max without ({{ $away }}) (last_over_time({{ $series }}[{{ $rule.failoverTolerance }}]))
      unless on (probe)
        max without ({{ $away }}) (authprobe_last_probe_timestamp_seconds)
    )
)
{{- end }}
