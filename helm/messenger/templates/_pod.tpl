{{/*
What a role's pod is made of: environment, volumes and mounts, probes and
security contexts. Shared by the Deployments and the migrate Job.
*/}}

{{- define "messenger.envName" -}}
{{- printf "MESSENGER_%s" (. | replace "." "__" | upper) -}}
{{- end -}}

{{- define "messenger.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .key }}
{{- end -}}

{{/* The environment of a role's container. Argument: dict "root" $ "name" ROLE "role" ROLEVALUES. */}}
{{- define "messenger.env" -}}
{{- $values := .root.Values -}}
{{- $name := .name -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- range $portName, $port := .role.ports }}
{{- if $port.advertiseKey }}
- name: {{ include "messenger.envName" $port.advertiseKey }}
  value: "$(POD_IP):{{ int $port.port }}"
{{- end }}
{{- end }}
{{- if eq $values.discovery.backend "etcd" }}
- name: MESSENGER_DISCOVERY__ADVERTISE_HOST
  value: "$(POD_IP)"
{{- end }}
{{- with $values.external.otlp.endpoint }}
- name: MESSENGER_TRACING__OTLP_ENDPOINT
  value: {{ . | quote }}
- name: MESSENGER_TRACING__SAMPLE_RATIO
  value: {{ $values.external.otlp.sampleRatio | quote }}
{{- end }}
{{- if and (include "messenger.isPublic" .role) $values.auth.hs256SecretKey }}
{{ include "messenger.secretEnv" (dict "name" "MESSENGER_AUTH__HS256_SECRET" "secret" (include "messenger.authSecret" .root) "key" $values.auth.hs256SecretKey) }}
{{- end }}
{{- if and (include "messenger.scyllaUser" (dict "root" .root "name" $name)) $values.external.scylla.existingSecret }}
{{ include "messenger.secretEnv" (dict "name" "MESSENGER_SCYLLA__USERNAME" "secret" $values.external.scylla.existingSecret "key" $values.external.scylla.usernameKey) }}
{{ include "messenger.secretEnv" (dict "name" "MESSENGER_SCYLLA__PASSWORD" "secret" $values.external.scylla.existingSecret "key" $values.external.scylla.passwordKey) }}
{{- end }}
{{- with $values.external.redis.existingSecret }}
{{- if and (eq $name "presence") (eq (include "messenger.presenceBackend" $.root) "redis") }}
{{ include "messenger.secretEnv" (dict "name" "MESSENGER_PRESENCE__REDIS__URL" "secret" . "key" $values.external.redis.urlKey) }}
{{- end }}
{{- if and (eq $name "message") (eq (include "messenger.cacheBackend" $.root) "redis") }}
{{ include "messenger.secretEnv" (dict "name" "MESSENGER_MESSAGE__CACHE__REDIS__URL" "secret" . "key" $values.external.redis.urlKey) }}
{{- end }}
{{- end }}
{{- if and (eq $name "media") $values.external.s3.existingSecret }}
{{ include "messenger.secretEnv" (dict "name" "AWS_ACCESS_KEY_ID" "secret" $values.external.s3.existingSecret "key" $values.external.s3.accessKeyIdKey) }}
{{ include "messenger.secretEnv" (dict "name" "AWS_SECRET_ACCESS_KEY" "secret" $values.external.s3.existingSecret "key" $values.external.s3.secretAccessKeyKey) }}
{{- end }}
{{- with .role.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The backends a role's process connects to with external.<backend>.tls
enabled, whose Secrets its pod mounts, as a JSON list: scylla for the roles
whose store is on it and the migrate Job, redis for presence and the message
cache on it, etcd for every role when discovery uses it. Argument: dict
"root" $ "name" ROLE (or "migrate").
*/}}
{{- define "messenger.backendsWithTls" -}}
{{- $root := .root -}}
{{- $external := $root.Values.external -}}
{{- $backends := list -}}
{{- if and $external.scylla.tls.enabled (include "messenger.scyllaUser" .) -}}
{{- $backends = append $backends "scylla" -}}
{{- end -}}
{{- $redis := or (and (eq .name "presence") (eq (include "messenger.presenceBackend" $root) "redis")) (and (eq .name "message") (eq (include "messenger.cacheBackend" $root) "redis")) -}}
{{- if and $external.redis.tls.enabled $redis -}}
{{- $backends = append $backends "redis" -}}
{{- end -}}
{{- if and $external.etcd.tls.enabled (eq $root.Values.discovery.backend "etcd") (ne .name "migrate") -}}
{{- $backends = append $backends "etcd" -}}
{{- end -}}
{{- toJson $backends -}}
{{- end -}}

{{/* "true" when a role's process opens the Scylla cluster: its store is there, or it is the migrate Job. Argument: dict "root" $ "name" ROLE. */}}
{{- define "messenger.scyllaUser" -}}
{{- $root := .root -}}
{{- if include "messenger.usesScylla" $root -}}
{{- if or (eq .name "migrate") (and (eq .name "message") (eq (include "messenger.messageStore" $root) "scylla")) (and (eq .name "media") (eq (include "messenger.mediaStore" $root) "scylla")) (and (eq .name "notify") (eq (include "messenger.notifyStore" $root) "scylla")) -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{- define "messenger.authSecret" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "messenger.fullname" .)) -}}
{{- end -}}

{{- define "messenger.clusterTlsSecret" -}}
{{- .role.clusterTlsSecret | default (printf "%s-%s-cluster-tls" (include "messenger.fullname" .root) .name) -}}
{{- end -}}

{{- define "messenger.dataClaim" -}}
{{- .role.persistence.existingClaim | default (printf "%s-%s-data" (include "messenger.fullname" .root) .name) -}}
{{- end -}}

{{/* Volumes of a role's pod. Argument: dict "root" $ "name" ROLE "role" ROLEVALUES "configKey" KEY "configMap" NAME. */}}
{{- define "messenger.volumes" -}}
{{- $values := .root.Values -}}
- name: config
  configMap:
    name: {{ .configMap }}
    items:
      - key: {{ .configKey }}
        path: messenger.toml
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
- name: data
{{- if and .role.persistence .role.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "messenger.dataClaim" . }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- if include "messenger.isPublic" .role }}
{{- if or $values.auth.jwksKey $values.auth.publicKeyKey }}
- name: auth
  secret:
    secretName: {{ include "messenger.authSecret" .root }}
    defaultMode: 288 # 0440
    items:
      {{- with $values.auth.jwksKey }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
      {{- with $values.auth.publicKeyKey }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
{{- end }}
{{- if $values.tls.public.enabled }}
- name: public-tls
  secret:
    secretName: {{ $values.tls.public.existingSecret }}
    defaultMode: 288 # 0440
    items:
      - key: {{ $values.tls.public.certKey }}
        path: {{ $values.tls.public.certKey }}
      - key: {{ $values.tls.public.keyKey }}
        path: {{ $values.tls.public.keyKey }}
{{- end }}
{{- end }}
{{- if $values.tls.cluster.enabled }}
- name: cluster-tls
  secret:
    secretName: {{ include "messenger.clusterTlsSecret" . }}
    defaultMode: 288 # 0440
    items:
      - key: {{ $values.tls.cluster.caKey }}
        path: {{ $values.tls.cluster.caKey }}
      - key: {{ $values.tls.cluster.certKey }}
        path: {{ $values.tls.cluster.certKey }}
      - key: {{ $values.tls.cluster.keyKey }}
        path: {{ $values.tls.cluster.keyKey }}
{{- end }}
{{- if and (eq .name "media") $values.cdn.existingSecret (or $values.cdn.hmacSecretKey $values.cdn.cloudfrontPrivateKeyKey) }}
- name: cdn
  secret:
    secretName: {{ $values.cdn.existingSecret }}
    defaultMode: 288 # 0440
    items:
      {{- with $values.cdn.hmacSecretKey }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
      {{- with $values.cdn.cloudfrontPrivateKeyKey }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
{{- end }}
{{- if and (eq .name "notify") (include "messenger.pushCredentials" .root) }}
- name: push
  secret:
    secretName: {{ $values.push.existingSecret }}
    defaultMode: 288 # 0440
    items:
      {{- range $values.push.apns }}
      - key: {{ .keyKey }}
        path: {{ .keyKey }}
      {{- end }}
      {{- range $values.push.fcm }}
      - key: {{ .serviceAccountKey }}
        path: {{ .serviceAccountKey }}
      {{- end }}
      {{- with $values.push.vapidKeyKey }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
{{- end }}
{{- include "messenger.backendTlsVolumes" . }}
{{- end -}}

{{/* The external.<backend>.tls Secrets of messenger.backendsWithTls, only the keys named. Argument: dict "root" $ "name" ROLE. */}}
{{- define "messenger.backendTlsVolumes" -}}
{{- range $backend := include "messenger.backendsWithTls" . | fromJsonArray }}
{{- $tls := index $.root.Values.external $backend "tls" }}
- name: {{ $backend }}-tls
  secret:
    secretName: {{ $tls.existingSecret }}
    defaultMode: 288 # 0440
    items:
      - key: {{ $tls.caKey }}
        path: {{ $tls.caKey }}
      {{- if $tls.certKey }}
      - key: {{ $tls.certKey }}
        path: {{ $tls.certKey }}
      - key: {{ $tls.keyKey }}
        path: {{ $tls.keyKey }}
      {{- end }}
{{- end }}
{{- end -}}

{{/* Mounts matching messenger.backendTlsVolumes. Argument: dict "root" $ "name" ROLE. */}}
{{- define "messenger.backendTlsVolumeMounts" -}}
{{- range $backend := include "messenger.backendsWithTls" . | fromJsonArray }}
- name: {{ $backend }}-tls
  mountPath: {{ include "messenger.backendTlsDir" $backend }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Mounts matching messenger.volumes. Secrets are mounted as directories, never subPath: their files are replaced in place on rotation and the service polls them. */}}
{{- define "messenger.volumeMounts" -}}
{{- $values := .root.Values -}}
- name: config
  mountPath: {{ include "messenger.configDir" .root }}
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: {{ include "messenger.dataDir" .root }}
{{- if include "messenger.isPublic" .role }}
{{- if or $values.auth.jwksKey $values.auth.publicKeyKey }}
- name: auth
  mountPath: {{ include "messenger.authDir" .root }}
  readOnly: true
{{- end }}
{{- if $values.tls.public.enabled }}
- name: public-tls
  mountPath: {{ include "messenger.publicTlsDir" .root }}
  readOnly: true
{{- end }}
{{- end }}
{{- if $values.tls.cluster.enabled }}
- name: cluster-tls
  mountPath: {{ include "messenger.clusterTlsDir" .root }}
  readOnly: true
{{- end }}
{{- if and (eq .name "media") $values.cdn.existingSecret (or $values.cdn.hmacSecretKey $values.cdn.cloudfrontPrivateKeyKey) }}
- name: cdn
  mountPath: {{ include "messenger.cdnDir" .root }}
  readOnly: true
{{- end }}
{{- if and (eq .name "notify") (include "messenger.pushCredentials" .root) }}
- name: push
  mountPath: {{ include "messenger.pushDir" .root }}
  readOnly: true
{{- end }}
{{- include "messenger.backendTlsVolumeMounts" . }}
{{- end -}}

{{- define "messenger.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ int .Values.securityContext.runAsUser }}
runAsGroup: {{ int .Values.securityContext.runAsGroup }}
fsGroup: {{ int .Values.securityContext.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "messenger.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ int .Values.securityContext.runAsUser }}
runAsGroup: {{ int .Values.securityContext.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* One probe's action: gRPC health on a plaintext port; on a TLS one (the kubelet's gRPC probe speaks plaintext only) the admin port's /readyz or /livez (`path`). Argument: dict "root" $ "port" PORT "service" NAME "path" PATH. */}}
{{- define "messenger.probeAction" -}}
{{- if include "messenger.portTls" (dict "root" .root "port" .port) -}}
httpGet:
  port: {{ int .root.Values.metrics.port }}
  path: {{ .path }}
{{- else -}}
grpc:
  port: {{ int .port.port }}
  service: {{ .service | quote }}
{{- end -}}
{{- end -}}

{{/* The three probes. Argument: dict "root" $ "name" ROLE "role" ROLEVALUES. */}}
{{- define "messenger.probes" -}}
{{- $port := index .role.ports .role.probePort -}}
{{- if not $port -}}
{{- fail (printf "roles.%s.probePort %q names no port of the role" .name .role.probePort) -}}
{{- end -}}
{{- $probes := .role.probes -}}
startupProbe:
  {{- include "messenger.probeAction" (dict "root" .root "port" $port "service" $port.healthService "path" "/readyz") | nindent 2 }}
  {{- toYaml $probes.startup | nindent 2 }}
readinessProbe:
  {{- include "messenger.probeAction" (dict "root" .root "port" $port "service" $port.healthService "path" "/readyz") | nindent 2 }}
  {{- toYaml $probes.readiness | nindent 2 }}
livenessProbe:
  {{- /* "" is the server as a whole: it stays SERVING while draining, so a drain never looks like a hang. */}}
  {{- include "messenger.probeAction" (dict "root" .root "port" $port "service" "" "path" "/livez") | nindent 2 }}
  {{- toYaml $probes.liveness | nindent 2 }}
{{- end -}}
