{{/*
Combinations the service would refuse at start, or that would lose data
or route badly, refused at render time with the reason.
*/}}
{{- define "messenger.validate" -}}
{{- $values := .Values -}}
{{- /* helm install checks Chart.yaml's kubeVersion; this makes `helm template --kube-version` check it too. */ -}}
{{- if not (semverCompare .Chart.KubeVersion .Capabilities.KubeVersion.Version) -}}
{{- fail (printf "Kubernetes %s is older than the chart supports (%s)" .Capabilities.KubeVersion.Version .Chart.KubeVersion) -}}
{{- end -}}
{{- $store := include "messenger.messageStore" . -}}
{{- $presence := include "messenger.presenceBackend" . -}}
{{- $cache := include "messenger.cacheBackend" . -}}
{{- if not (or $values.auth.jwksKey $values.auth.publicKeyKey $values.auth.hs256SecretKey) -}}
{{- fail "auth: set auth.jwksKey, auth.publicKeyKey or auth.hs256SecretKey (the gateway refuses to start without a verification key)" -}}
{{- end -}}
{{- if and (not $values.tls.cluster.enabled) (not $values.tls.cluster.insecurePlaintext) -}}
{{- fail "tls: with tls.cluster.enabled false the internal ports listen on the pod network in plaintext, which the service refuses unless tls.cluster.insecurePlaintext is true" -}}
{{- end -}}
{{- if and $values.tls.public.enabled (not $values.tls.public.existingSecret) -}}
{{- fail "tls.public.existingSecret is required when tls.public.enabled is true" -}}
{{- end -}}
{{- if and (eq $values.discovery.backend "etcd") (not $values.external.etcd.endpoints) -}}
{{- fail "external.etcd.endpoints is required when discovery.backend is etcd" -}}
{{- end -}}
{{- if and (include "messenger.usesScylla" .) (not $values.external.scylla.nodes) -}}
{{- fail "external.scylla.nodes is required when config.message.store, config.media.store or config.notify.store is scylla" -}}
{{- end -}}
{{- if and (or (eq $presence "redis") (eq $cache "redis")) (not (or $values.external.redis.url $values.external.redis.existingSecret)) -}}
{{- fail "external.redis.url or external.redis.existingSecret is required when presence.backend or message.cache.backend is redis" -}}
{{- end -}}
{{- if and (hasPrefix "rediss://" $values.external.redis.url) (not $values.external.redis.tls.enabled) -}}
{{- fail "external.redis.url is rediss:// but external.redis.tls is off: enable it with the Secret holding Redis's CA" -}}
{{- end -}}
{{- /* external.<backend>.tls: the tls tables it sets (from config as well would be two sources for one table). */ -}}
{{- $tlsTables := dict "scylla" (list "scylla") "redis" (list "presence.redis" "message.cache.redis") "etcd" (list "discovery.etcd") -}}
{{- range $backend, $tables := $tlsTables -}}
{{- $tls := index $values.external $backend "tls" -}}
{{- if and $tls.enabled (not $tls.existingSecret) -}}
{{- fail (printf "external.%s.tls.existingSecret is required when external.%s.tls.enabled is true" $backend $backend) -}}
{{- end -}}
{{- if ne (empty $tls.certKey) (empty $tls.keyKey) -}}
{{- fail (printf "external.%s.tls.certKey and keyKey go together (a client certificate and its key, for mutual TLS)" $backend) -}}
{{- end -}}
{{- range $table := $tables -}}
{{- if and $tls.enabled (include "messenger.configSet" (dict "config" $values.config "path" (printf "%s.tls" $table))) -}}
{{- fail (printf "config.%s.tls: leave it out when external.%s.tls is enabled (the chart sets it from the Secret)" $table $backend) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if eq $values.discovery.backend "etcd" -}}
{{- $etcdTls := or $values.external.etcd.tls.enabled (include "messenger.configSet" (dict "config" $values.config "path" "discovery.etcd.tls.ca_file")) -}}
{{- range $endpoint := $values.external.etcd.endpoints -}}
{{- if and $etcdTls (hasPrefix "http://" $endpoint) -}}
{{- fail (printf "external.etcd.endpoints: %s is http:// but TLS to etcd is on: use https:// (or host:port)" $endpoint) -}}
{{- end -}}
{{- if and (not $etcdTls) (hasPrefix "https://" $endpoint) -}}
{{- fail (printf "external.etcd.endpoints: %s is https:// but TLS to etcd is off: set external.etcd.tls (or config.discovery.etcd.tls.ca_file)" $endpoint) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (eq (include "messenger.cdnMode" .) "cloudfront") (not (and $values.cdn.existingSecret $values.cdn.cloudfrontPrivateKeyKey)) -}}
{{- fail "cdn.existingSecret and cdn.cloudfrontPrivateKeyKey are required when config.media.cdn.mode is cloudfront" -}}
{{- end -}}
{{- if and (eq (include "messenger.cdnMode" .) "hmac") (not (and $values.cdn.existingSecret $values.cdn.hmacSecretKey)) -}}
{{- fail "cdn.existingSecret and cdn.hmacSecretKey are required when config.media.cdn.mode is hmac" -}}
{{- end -}}
{{- if and (or $values.push.apns $values.push.fcm $values.push.vapidKeyKey) (not $values.push.existingSecret) -}}
{{- fail "push.existingSecret is required when push.apns, push.fcm or push.vapidKeyKey is set" -}}
{{- end -}}
{{- range $name := keys $values.roles | sortAlpha -}}
{{- $role := include "messenger.role" (dict "root" $ "role" $name) | fromJson -}}
{{- if $role.enabled -}}
{{- $many := or (gt (int $role.replicas) 1) $role.autoscaling.enabled -}}
{{- if and $many (eq $name "media") (eq (include "messenger.mediaStore" $) "sqlite") -}}
{{- fail "roles.media: upload records in SQLite live in one process; set config.media.store to scylla for more than one instance" -}}
{{- end -}}
{{- if and $many (eq $name "notify") (eq (include "messenger.notifyStore" $) "sqlite") -}}
{{- fail "roles.notify: the push outbox in SQLite lives in one process; set config.notify.store to scylla for more than one instance" -}}
{{- end -}}
{{- if and $many (eq $name "message") (eq $store "sqlite") -}}
{{- fail "roles.message: the SQLite store has one writer process; set config.message.store to scylla for more than one instance" -}}
{{- end -}}
{{- if and $many (eq $name "presence") (eq $presence "memory") -}}
{{- fail "roles.presence: sessions in memory live in one process; set config.presence.backend to redis for more than one instance" -}}
{{- end -}}
{{- $discovered := false -}}
{{- range $portName, $port := $role.ports -}}
{{- if $port.discoveryKey -}}{{- $discovered = true -}}{{- end -}}
{{- if not (regexMatch "^[a-z_]+(\\.[a-z_]+)+$" $port.listenKey) -}}
{{- fail (printf "roles.%s.ports.%s.listenKey %q must be section.key (or section.table.key)" $name $portName $port.listenKey) -}}
{{- end -}}
{{- end -}}
{{- if and $many $discovered (eq $values.discovery.backend "static") -}}
{{- fail (printf "roles.%s: more than one instance needs discovery.backend etcd (static discovery reaches one address per role, and HTTP/2 connections would stay on one pod)" $name) -}}
{{- end -}}
{{- if and $role.autoscaling.enabled $role.autoscaling.targetCPUUtilizationPercentage (not (and $role.resources.requests $role.resources.requests.cpu)) -}}
{{- fail (printf "roles.%s: autoscaling on CPU needs resources.requests.cpu" $name) -}}
{{- end -}}
{{- if and $role.autoscaling.enabled (lt (int $role.autoscaling.maxReplicas) (int $role.autoscaling.minReplicas)) -}}
{{- fail (printf "roles.%s: autoscaling.maxReplicas is below minReplicas" $name) -}}
{{- end -}}
{{- if and $role.persistence.enabled $many -}}
{{- fail (printf "roles.%s: a ReadWriteOnce data volume serves one pod; turn persistence off for more than one instance" $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
