{{/*
Each role's configuration: values.config, plus what the chart owns
(listen addresses, discovery, TLS and key files, data_dir, the external
endpoints). Pod-specific values (the pod's own address) and secrets come
from the environment instead (see messenger.env).
*/}}

{{- define "messenger.dataDir" -}}/var/lib/messenger{{- end -}}
{{- define "messenger.configDir" -}}/etc/messenger/config{{- end -}}
{{- define "messenger.configFile" -}}/etc/messenger/config/messenger.toml{{- end -}}
{{- define "messenger.authDir" -}}/etc/messenger/auth{{- end -}}
{{- define "messenger.publicTlsDir" -}}/etc/messenger/public-tls{{- end -}}
{{- define "messenger.clusterTlsDir" -}}/etc/messenger/cluster-tls{{- end -}}
{{- define "messenger.cdnDir" -}}/etc/messenger/cdn{{- end -}}
{{- define "messenger.pushDir" -}}/etc/messenger/push{{- end -}}
{{/* Where external.<backend>.tls is mounted. Argument: the backend (scylla, redis or etcd). */}}
{{- define "messenger.backendTlsDir" -}}/etc/messenger/backend-tls/{{ . }}{{- end -}}

{{/* Sets a dotted key in a map, creating tables on the way. Argument: dict "config" MAP "path" "a.b" "value" VALUE. */}}
{{- define "messenger.setPath" -}}
{{- $table := .config -}}
{{- $keys := splitList "." .path -}}
{{- range $key := initial $keys -}}
{{- if not (kindIs "map" (index $table $key)) -}}
{{- $_ := set $table $key dict -}}
{{- end -}}
{{- $table = index $table $key -}}
{{- end -}}
{{- $_ := set $table (last $keys) .value -}}
{{- end -}}

{{/* The message store, presence backend and cache backend in effect. */}}
{{- define "messenger.messageStore" -}}
{{- include "messenger.configValue" (dict "config" .Values.config "path" "message.store" "default" "sqlite") -}}
{{- end -}}
{{- define "messenger.mediaStore" -}}
{{- include "messenger.configValue" (dict "config" .Values.config "path" "media.store" "default" "sqlite") -}}
{{- end -}}
{{- define "messenger.notifyStore" -}}
{{- include "messenger.configValue" (dict "config" .Values.config "path" "notify.store" "default" "sqlite") -}}
{{- end -}}
{{/* "true" when the message, media or notify store is on Scylla (all three in the cluster and keyspace of the scylla section). */}}
{{- define "messenger.usesScylla" -}}
{{- if or (eq (include "messenger.messageStore" .) "scylla") (eq (include "messenger.mediaStore" .) "scylla") (eq (include "messenger.notifyStore" .) "scylla") -}}true{{- end -}}
{{- end -}}
{{- define "messenger.presenceBackend" -}}
{{- include "messenger.configValue" (dict "config" .Values.config "path" "presence.backend" "default" "memory") -}}
{{- end -}}
{{- define "messenger.cacheBackend" -}}
{{- include "messenger.configValue" (dict "config" .Values.config "path" "message.cache.backend" "default" "memory") -}}
{{- end -}}
{{- define "messenger.cdnMode" -}}
{{- include "messenger.configValue" (dict "config" .Values.config "path" "media.cdn.mode" "default" "none") -}}
{{- end -}}

{{/* The configuration of one role as JSON. Argument: dict "root" $ "role" NAME. */}}
{{- define "messenger.roleConfig" -}}
{{- $root := .root -}}
{{- $values := $root.Values -}}
{{- $self := include "messenger.role" (dict "root" $root "role" .role) | fromJson -}}
{{- $config := deepCopy $values.config -}}
{{- include "messenger.setPath" (dict "config" $config "path" "data_dir" "value" (include "messenger.dataDir" $root)) -}}

{{- /* Every role's listeners on the pod network; static discovery lists the internal Services. */ -}}
{{- $enabled := include "messenger.enabledRoles" $root | fromJsonArray -}}
{{- include "messenger.setPath" (dict "config" $config "path" "discovery.backend" "value" $values.discovery.backend) -}}
{{- range $name := keys $values.roles | sortAlpha -}}
{{- $role := include "messenger.role" (dict "root" $root "role" $name) | fromJson -}}
{{- range $portName, $port := $role.ports -}}
{{- include "messenger.setPath" (dict "config" $config "path" $port.listenKey "value" (printf "0.0.0.0:%d" (int $port.port))) -}}
{{- if and $port.discoveryKey (eq $values.discovery.backend "static") -}}
{{- $addresses := list -}}
{{- if hasKey $values.discovery.staticAddresses $name -}}
{{- $addresses = index $values.discovery.staticAddresses $name -}}
{{- else if has $name $enabled -}}
{{- $service := include "messenger.internalService" (dict "root" $root "role" $name) -}}
{{- $addresses = list (printf "%s.%s.svc.%s:%d" $service $root.Release.Namespace $values.clusterDomain (int $port.port)) -}}
{{- else -}}
{{- fail (printf "discovery.staticAddresses.%s is needed: role %s is not enabled and discovery.backend is static" $name $name) -}}
{{- end -}}
{{- include "messenger.setPath" (dict "config" $config "path" $port.discoveryKey "value" $addresses) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if eq $values.discovery.backend "etcd" -}}
{{- include "messenger.setPath" (dict "config" $config "path" "discovery.etcd.endpoints" "value" $values.external.etcd.endpoints) -}}
{{- end -}}
{{- include "messenger.setPath" (dict "config" $config "path" "admin.listen" "value" (printf "0.0.0.0:%d" (int $values.metrics.port))) -}}

{{- /* TLS: the public port's on roles with a public port, the cluster's everywhere. */ -}}
{{- if and $values.tls.public.enabled (include "messenger.isPublic" $self) -}}
{{- include "messenger.setPath" (dict "config" $config "path" "tls.public_cert_file" "value" (printf "%s/%s" (include "messenger.publicTlsDir" $root) $values.tls.public.certKey)) -}}
{{- include "messenger.setPath" (dict "config" $config "path" "tls.public_key_file" "value" (printf "%s/%s" (include "messenger.publicTlsDir" $root) $values.tls.public.keyKey)) -}}
{{- end -}}
{{- include "messenger.setPath" (dict "config" $config "path" "tls.cluster_domain" "value" $values.tls.cluster.domain) -}}
{{- if $values.tls.cluster.enabled -}}
{{- $dir := include "messenger.clusterTlsDir" $root -}}
{{- include "messenger.setPath" (dict "config" $config "path" "tls.cluster_ca_file" "value" (printf "%s/%s" $dir $values.tls.cluster.caKey)) -}}
{{- include "messenger.setPath" (dict "config" $config "path" "tls.cluster_cert_file" "value" (printf "%s/%s" $dir $values.tls.cluster.certKey)) -}}
{{- include "messenger.setPath" (dict "config" $config "path" "tls.cluster_key_file" "value" (printf "%s/%s" $dir $values.tls.cluster.keyKey)) -}}
{{- include "messenger.setPath" (dict "config" $config "path" "tls.insecure_cluster_plaintext" "value" false) -}}
{{- else -}}
{{- include "messenger.setPath" (dict "config" $config "path" "tls.insecure_cluster_plaintext" "value" $values.tls.cluster.insecurePlaintext) -}}
{{- end -}}

{{- /* JWT key files where tokens are verified (the roles with a public port): every role validates the files it is given. */ -}}
{{- include "messenger.setPath" (dict "config" $config "path" "auth.development" "value" false) -}}
{{- if include "messenger.isPublic" $self -}}
{{- if $values.auth.jwksKey -}}
{{- include "messenger.setPath" (dict "config" $config "path" "auth.jwks_file" "value" (printf "%s/%s" (include "messenger.authDir" $root) $values.auth.jwksKey)) -}}
{{- end -}}
{{- if $values.auth.publicKeyKey -}}
{{- include "messenger.setPath" (dict "config" $config "path" "auth.public_key_file" "value" (printf "%s/%s" (include "messenger.authDir" $root) $values.auth.publicKeyKey)) -}}
{{- end -}}
{{- end -}}

{{- /* External stores, and TLS to them from external.<backend>.tls. Like the
endpoints, the tls tables go in every role's file, since each process
validates every section (a rediss:// URL or an https:// etcd endpoint
without its ca_file is refused); the files are read, and mounted, only
where the connection is made (messenger.backendsWithTls). */ -}}
{{- if include "messenger.usesScylla" $root -}}
{{- include "messenger.setPath" (dict "config" $config "path" "scylla.nodes" "value" $values.external.scylla.nodes) -}}
{{- if $values.external.scylla.tls.enabled -}}
{{- include "messenger.setBackendTls" (dict "config" $config "path" "scylla.tls" "backend" "scylla" "tls" $values.external.scylla.tls) -}}
{{- end -}}
{{- end -}}
{{- if eq $values.discovery.backend "etcd" -}}
{{- if $values.external.etcd.tls.enabled -}}
{{- include "messenger.setBackendTls" (dict "config" $config "path" "discovery.etcd.tls" "backend" "etcd" "tls" $values.external.etcd.tls) -}}
{{- end -}}
{{- end -}}
{{- if $values.external.redis.tls.enabled -}}
{{- if eq (include "messenger.presenceBackend" $root) "redis" -}}
{{- include "messenger.setBackendTls" (dict "config" $config "path" "presence.redis.tls" "backend" "redis" "tls" $values.external.redis.tls) -}}
{{- end -}}
{{- if eq (include "messenger.cacheBackend" $root) "redis" -}}
{{- include "messenger.setBackendTls" (dict "config" $config "path" "message.cache.redis.tls" "backend" "redis" "tls" $values.external.redis.tls) -}}
{{- end -}}
{{- end -}}
{{- if and $values.external.redis.url (not $values.external.redis.existingSecret) -}}
{{- if eq (include "messenger.presenceBackend" $root) "redis" -}}
{{- include "messenger.setPath" (dict "config" $config "path" "presence.redis.url" "value" $values.external.redis.url) -}}
{{- end -}}
{{- if eq (include "messenger.cacheBackend" $root) "redis" -}}
{{- include "messenger.setPath" (dict "config" $config "path" "message.cache.redis.url" "value" $values.external.redis.url) -}}
{{- end -}}
{{- end -}}
{{- $s3 := $values.external.s3 -}}
{{- include "messenger.setPath" (dict "config" $config "path" "media.s3.embedded" "value" false) -}}
{{- include "messenger.setPath" (dict "config" $config "path" "media.s3.endpoint" "value" $s3.endpoint) -}}
{{- include "messenger.setPath" (dict "config" $config "path" "media.s3.public_endpoint" "value" $s3.publicEndpoint) -}}
{{- include "messenger.setPath" (dict "config" $config "path" "media.s3.region" "value" $s3.region) -}}
{{- include "messenger.setPath" (dict "config" $config "path" "media.s3.bucket" "value" $s3.bucket) -}}
{{- include "messenger.setPath" (dict "config" $config "path" "media.s3.force_path_style" "value" $s3.forcePathStyle) -}}
{{- if $values.cdn.hmacSecretKey -}}
{{- include "messenger.setPath" (dict "config" $config "path" "media.cdn.secret_file" "value" (printf "%s/%s" (include "messenger.cdnDir" $root) $values.cdn.hmacSecretKey)) -}}
{{- end -}}
{{- if $values.cdn.cloudfrontPrivateKeyKey -}}
{{- include "messenger.setPath" (dict "config" $config "path" "media.cdn.private_key_file" "value" (printf "%s/%s" (include "messenger.cdnDir" $root) $values.cdn.cloudfrontPrivateKeyKey)) -}}
{{- end -}}
{{- /* Push credentials (the notify role reads them; every role's file names them alike). */ -}}
{{- $push := $values.push -}}
{{- $pushDir := include "messenger.pushDir" $root -}}
{{- if $push.apns -}}
{{- $apps := list -}}
{{- range $app := $push.apns -}}
{{- $apps = append $apps (dict "bundle_id" $app.bundleId "team_id" $app.teamId "key_id" $app.keyId "key_file" (printf "%s/%s" $pushDir $app.keyKey)) -}}
{{- end -}}
{{- include "messenger.setPath" (dict "config" $config "path" "notify.apns.apps" "value" $apps) -}}
{{- end -}}
{{- if $push.fcm -}}
{{- $apps := list -}}
{{- range $app := $push.fcm -}}
{{- $apps = append $apps (dict "project_id" $app.projectId "service_account_file" (printf "%s/%s" $pushDir $app.serviceAccountKey)) -}}
{{- end -}}
{{- include "messenger.setPath" (dict "config" $config "path" "notify.fcm.apps" "value" $apps) -}}
{{- end -}}
{{- if $push.vapidKeyKey -}}
{{- include "messenger.setPath" (dict "config" $config "path" "notify.web_push.vapid_key_file" "value" (printf "%s/%s" $pushDir $push.vapidKeyKey)) -}}
{{- end -}}
{{- toJson $config -}}
{{- end -}}

{{/*
A backend's tls table, its files where messenger.backendTlsVolumes mounts
them; it replaces any config.*.tls table (messenger.validate refuses both).
Argument: dict "config" MAP "path" "scylla.tls" "backend" NAME "tls" EXTERNALTLSVALUES.
*/}}
{{- define "messenger.setBackendTls" -}}
{{- $dir := include "messenger.backendTlsDir" .backend -}}
{{- $table := dict "ca_file" (printf "%s/%s" $dir .tls.caKey) -}}
{{- if .tls.certKey -}}
{{- $_ := set $table "cert_file" (printf "%s/%s" $dir .tls.certKey) -}}
{{- $_ := set $table "key_file" (printf "%s/%s" $dir .tls.keyKey) -}}
{{- end -}}
{{- with .tls.serverName -}}
{{- $_ := set $table "server_name" . -}}
{{- end -}}
{{- include "messenger.setPath" (dict "config" .config "path" .path "value" $table) -}}
{{- end -}}

{{/* "true" when push credentials are mounted into the notify pods. */}}
{{- define "messenger.pushCredentials" -}}
{{- $push := .Values.push -}}
{{- if and $push.existingSecret (or $push.apns $push.fcm $push.vapidKeyKey) -}}true{{- end -}}
{{- end -}}

{{/* A role's TOML file. Argument: dict "root" $ "role" NAME. */}}
{{- define "messenger.roleToml" -}}
{{- include "messenger.toml" (include "messenger.roleConfig" . | fromJson) -}}
{{- end -}}
