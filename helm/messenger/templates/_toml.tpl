{{/*
A TOML writer for the service's configuration. Helm's toToml writes every
number as a float (values pass through JSON), which the service's integer
keys refuse; this one writes whole numbers as integers. Tables become
[a.b] sections, maps inside arrays inline tables, null values are left out
(the service's default applies), keys that are not bare are quoted.
*/}}

{{- define "messenger.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{- define "messenger.toml.value" -}}
{{- $value := . -}}
{{- if kindIs "string" $value -}}{{ toJson $value }}
{{- else if kindIs "bool" $value -}}{{ $value }}
{{- else if or (kindIs "float64" $value) (kindIs "float32" $value) -}}
{{- if eq (float64 $value) (floor $value) -}}{{ int64 $value }}{{- else -}}{{ $value }}{{- end -}}
{{- else if or (kindIs "int" $value) (kindIs "int64" $value) -}}{{ $value }}
{{- else if kindIs "slice" $value -}}[{{- range $index, $item := $value -}}{{- if $index -}}, {{ end -}}{{ include "messenger.toml.value" $item }}{{- end -}}]
{{- else if kindIs "map" $value -}}{ {{- $first := true -}}{{- range $key, $item := $value -}}{{- if not (kindIs "invalid" $item) -}}{{- if not $first -}}, {{ end -}}{{- $first = false -}}{{ include "messenger.toml.key" $key }} = {{ include "messenger.toml.value" $item }}{{- end -}}{{- end -}} }
{{- else -}}{{ fail (printf "config: cannot write %v (%s) as TOML" $value (kindOf $value)) }}
{{- end -}}
{{- end -}}

{{/* One table: its plain keys, then its sub-tables. Argument: dict "table" MAP "path" LIST-OF-KEYS. */}}
{{- define "messenger.toml.table" -}}
{{- $path := .path -}}
{{- range $key, $value := .table -}}
{{- if and (not (kindIs "invalid" $value)) (not (kindIs "map" $value)) }}
{{ include "messenger.toml.key" $key }} = {{ include "messenger.toml.value" $value }}
{{- end -}}
{{- end -}}
{{- range $key, $value := .table -}}
{{- if kindIs "map" $value -}}
{{- $sub := append $path (include "messenger.toml.key" $key) }}

[{{ join "." $sub }}]
{{- include "messenger.toml.table" (dict "table" $value "path" $sub) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "messenger.toml" -}}
# Rendered by the messenger Helm chart; `messenger --config <this file> config` prints it merged.
{{- include "messenger.toml.table" (dict "table" . "path" list) }}
{{ end -}}
