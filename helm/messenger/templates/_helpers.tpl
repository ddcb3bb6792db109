{{/*
Names, labels, the image, and each role's effective values.
*/}}

{{- define "messenger.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "messenger.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "messenger.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object; `component` names the role (or job). Argument: dict "root" $ "component" NAME. */}}
{{- define "messenger.labels" -}}
helm.sh/chart: {{ include "messenger.chart" .root }}
{{ include "messenger.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Values.image.tag | default .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: messenger
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "messenger.selectorLabels" -}}
app.kubernetes.io/name: {{ include "messenger.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{- define "messenger.image" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository ($image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{- define "messenger.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "messenger.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
A role's values over the shared defaults, with every optional key of the
role and its ports filled in, as JSON. Argument: dict "root" $ "role" NAME.
*/}}
{{- define "messenger.role" -}}
{{- $role := mergeOverwrite (deepCopy .root.Values.defaults) (deepCopy (index .root.Values.roles .role)) -}}
{{- $service := dict "type" "ClusterIP" "port" 0 "annotations" dict "loadBalancerClass" "" "loadBalancerSourceRanges" list "externalTrafficPolicy" "" -}}
{{- $_ := set $role "service" (mergeOverwrite $service (dig "service" dict $role)) -}}
{{- $_ = set $role "probePort" (dig "probePort" "" $role) -}}
{{- $ports := dict -}}
{{- range $name, $port := dig "ports" dict $role -}}
{{- $_ := set $ports $name (mergeOverwrite (dict "public" false "http" false "callers" list "discoveryKey" "" "advertiseKey" "" "healthService" "") $port) -}}
{{- end -}}
{{- $_ = set $role "ports" $ports -}}
{{- toJson $role -}}
{{- end -}}

{{/* The names of the enabled roles, sorted, as a JSON list. */}}
{{- define "messenger.enabledRoles" -}}
{{- $enabled := list -}}
{{- range $name := keys .Values.roles | sortAlpha -}}
{{- $role := include "messenger.role" (dict "root" $ "role" $name) | fromJson -}}
{{- if $role.enabled -}}
{{- $enabled = append $enabled $name -}}
{{- end -}}
{{- end -}}
{{- toJson $enabled -}}
{{- end -}}

{{/* Whether a role has a public port ("true" or ""). Argument: the role's values. */}}
{{- define "messenger.isPublic" -}}
{{- range $name, $port := .ports -}}
{{- if $port.public -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/* Whether a port speaks TLS ("true" or ""). Argument: dict "root" $ "port" PORT. */}}
{{- define "messenger.portTls" -}}
{{- if .port.public -}}
{{- if .root.Values.tls.public.enabled -}}true{{- end -}}
{{- else if .root.Values.tls.cluster.enabled -}}true{{- end -}}
{{- end -}}

{{/* Service names: the public ports' and the internal ports' of a role. */}}
{{- define "messenger.publicService" -}}
{{- printf "%s-%s" (include "messenger.fullname" .root) .role | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "messenger.internalService" -}}
{{- printf "%s-%s-internal" (include "messenger.fullname" .root) .role | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* A config value with its default: dict "config" MAP "path" "a.b.c" "default" VALUE. */}}
{{- define "messenger.configValue" -}}
{{- $value := .config -}}
{{- $found := true -}}
{{- range $key := splitList "." .path -}}
{{- if and $found (kindIs "map" $value) (hasKey $value $key) -}}
{{- $value = index $value $key -}}
{{- else -}}
{{- $found = false -}}
{{- end -}}
{{- end -}}
{{- if and $found (not (kindIs "invalid" $value)) -}}{{ $value }}{{- else -}}{{ .default }}{{- end -}}
{{- end -}}

{{/* "true" when a config key holds a non-empty value (an empty table is not one). Argument: dict "config" MAP "path" "a.b.c". */}}
{{- define "messenger.configSet" -}}
{{- $value := .config -}}
{{- range $key := splitList "." .path -}}
{{- if and (kindIs "map" $value) (hasKey $value $key) -}}
{{- $value = index $value $key -}}
{{- else -}}
{{- $value = "" -}}
{{- end -}}
{{- end -}}
{{- if not (empty $value) -}}true{{- end -}}
{{- end -}}

{{/*
A humantime duration ("10s", "1m30s", "500ms", "2h") in whole seconds,
rounded up. Argument: the duration string.
*/}}
{{- define "messenger.durationSeconds" -}}
{{- $text := toString . | trim -}}
{{- if not (regexMatch "^([0-9]+(ms|s|sec|secs|m|min|mins|h|hr|hrs)\\s*)+$" $text) -}}
{{- fail (printf "cannot read the duration %q (the chart understands ms, s, m and h)" $text) -}}
{{- end -}}
{{- $millis := 0 -}}
{{- range $part := regexFindAll "[0-9]+[a-z]+" $text -1 -}}
{{- $number := regexFind "^[0-9]+" $part | atoi -}}
{{- $unit := regexFind "[a-z]+$" $part -}}
{{- if eq $unit "ms" -}}{{- $millis = add $millis $number -}}
{{- else if has $unit (list "s" "sec" "secs") -}}{{- $millis = add $millis (mul $number 1000) -}}
{{- else if has $unit (list "m" "min" "mins") -}}{{- $millis = add $millis (mul $number 60000) -}}
{{- else -}}{{- $millis = add $millis (mul $number 3600000) -}}
{{- end -}}
{{- end -}}
{{- div (add $millis 999) 1000 -}}
{{- end -}}

{{/* The pods' grace period: preStop sleep + the configured drain + a margin. Argument: dict "root" $ "role" ROLEVALUES. */}}
{{- define "messenger.terminationGracePeriod" -}}
{{- $drain := include "messenger.configValue" (dict "config" .root.Values.config "path" "server.drain_grace" "default" "10s") -}}
{{- add (int .role.preStopSleepSeconds) (include "messenger.durationSeconds" $drain | int) (int .role.terminationGraceExtraSeconds) -}}
{{- end -}}
