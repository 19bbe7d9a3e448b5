{{/* Names and labels. */}}
{{- define "nexus.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "nexus.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: nexus-fleet
app.kubernetes.io/part-of: nexus-fleet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "ingest"). */}}
{{- define "nexus.selector" -}}
app.kubernetes.io/name: nexus-fleet
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "nexus.component" -}}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Image of a component: (dict "ctx" $ "repo" .Values.image.ingest "cuda" false). */}}
{{- define "nexus.image" -}}
{{- $tag := .ctx.Values.image.tag | default .ctx.Chart.AppVersion -}}
{{- $suffix := ternary .ctx.Values.image.cudaSuffix "" (default false .cuda) -}}
{{- printf "%s%s%s:%s" .ctx.Values.image.registry .repo $suffix $tag -}}
{{- end -}}

{{- define "nexus.redisSecret" -}}
{{- if .Values.redis.existingSecret -}}{{ .Values.redis.existingSecret }}{{- else -}}{{ include "nexus.fullname" . }}-redis-url{{- end -}}
{{- end -}}

{{/* Environment every stage shares. */}}
{{- define "nexus.env" -}}
- name: NEXUS_REDIS
  valueFrom:
    secretKeyRef:
      name: {{ include "nexus.redisSecret" . }}
      key: url
{{- $addr := ternary (printf "%s-redis:6379" (include "nexus.fullname" .)) .Values.redis.address .Values.redis.bundled }}
{{- if $addr }}
# host:port of Redis for KEDA's redis-streams scaler (the stages read NEXUS_REDIS).
- name: NEXUS_REDIS_ADDRESS
  value: {{ $addr | quote }}
{{- end }}
- name: NEXUS_NODE
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- if or .Values.admin.token .Values.admin.existingSecret }}
# PUT /log on the admin port needs this token; without it the log filter is fixed.
- name: NEXUS_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.admin.existingSecret | default (printf "%s-admin-token" (include "nexus.fullname" .)) }}
      key: token
{{- end }}
{{- with .Values.fleet.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The weights volume, and the init container that fills it. */}}
{{- define "nexus.modelsVolume" -}}
- name: models
{{- if eq .Values.models.volume.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.models.volume.claimName | default (printf "%s-models" (include "nexus.fullname" .)) }}
{{- else }}
  emptyDir: {}
{{- end }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{/* Init container pulling `names` (a list): (dict "ctx" $ "names" (list ...)). */}}
{{- define "nexus.pullModels" -}}
{{- if .ctx.Values.models.pull }}
- name: pull-models
  image: {{ include "nexus.image" (dict "ctx" .ctx "repo" .ctx.Values.image.cli) }}
  imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
  args: ["models", "pull", {{- range $i, $n := .names }}{{ if $i }},{{ end }} {{ $n | quote }}{{- end }}]
  env:
    - name: NEXUS_HOME
      value: /models
    - name: HOME
      value: /tmp
  envFrom:
    - configMapRef:
        name: {{ include "nexus.fullname" .ctx }}-config
  resources:
    {{- toYaml .ctx.Values.models.resources | nindent 4 }}
  securityContext:
    {{- toYaml .ctx.Values.securityContext | nindent 4 }}
  volumeMounts:
    - {name: models, mountPath: /models}
    - {name: tmp, mountPath: /tmp}
{{- end }}
{{- end -}}

{{/* Scheduling of a stage, GPU-aware: (dict "ctx" $ "stage" .Values.encoder). */}}
{{- define "nexus.scheduling" -}}
{{- $gpu := .stage.gpu | default dict -}}
{{- $sel := .stage.nodeSelector | default dict -}}
{{- $tol := .stage.tolerations | default list -}}
{{- if $gpu.enabled }}
{{- $sel = merge (deepCopy $sel) .ctx.Values.gpu.nodeSelector }}
{{- $tol = concat $tol .ctx.Values.gpu.tolerations }}
{{- end }}
{{- with $sel }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tol }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .stage.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Resources with the GPU limit when enabled: (dict "stage" .Values.encoder). */}}
{{- define "nexus.resources" -}}
{{- $r := deepCopy (.stage.resources | default dict) -}}
{{- if and .stage.gpu .stage.gpu.enabled }}
{{- $limits := $r.limits | default dict }}
{{- $_ := set $limits "nvidia.com/gpu" (.stage.gpu.count | int) }}
{{- $_ := set $r "limits" $limits }}
{{- end }}
{{- toYaml $r }}
{{- end -}}

{{/* gRPC health probes on `port`. */}}
{{- define "nexus.grpcProbes" -}}
startupProbe:
  grpc: {port: {{ .port }}}
  periodSeconds: 5
  failureThreshold: 120
readinessProbe:
  grpc: {port: {{ .port }}}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  grpc: {port: {{ .port }}}
  periodSeconds: 10
  failureThreshold: 6
{{- end -}}

{{/* The WebRTC UDP ports as a JSON list (a Service has no port ranges). */}}
{{- define "nexus.udpPorts" -}}
{{- $r := splitList "-" .Values.ingest.webrtc.udpPorts -}}
{{- if ne (len $r) 2 }}{{ fail "ingest.webrtc.udpPorts must be LOW-HIGH, e.g. 40000-40063" }}{{ end -}}
{{- $lo := index $r 0 | int -}}
{{- $hi := index $r 1 | int -}}
{{- if or (gt $lo $hi) (gt (sub $hi $lo) 999) }}{{ fail "ingest.webrtc.udpPorts: LOW-HIGH with at most 1000 ports" }}{{ end -}}
{{- untilStep $lo (add1 $hi | int) 1 | toJson -}}
{{- end -}}
