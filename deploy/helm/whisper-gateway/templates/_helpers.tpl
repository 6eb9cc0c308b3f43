{{- define "wg.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "wg.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of a component's objects: (list $ "envoy") */}}
{{- define "wg.labels" -}}
{{- $ := index . 0 -}}
{{ include "wg.selector" $ }}
app.kubernetes.io/component: {{ index . 1 }}
app.kubernetes.io/version: {{ $.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" $.Chart.Name $.Chart.Version }}
{{- end -}}

{{- define "wg.componentSelector" -}}
{{- $ := index . 0 -}}
{{ include "wg.selector" $ }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "wg.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "wg.namespaceDomain" -}}
{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}
{{- end -}}

{{- define "wg.engineModel" -}}
{{- $first := index .Values.gateway.models 0 -}}
{{- .Values.engines.model | default (kindIs "map" $first | ternary (get (kindIs "map" $first | ternary $first dict) "name") $first) -}}
{{- end -}}

{{- define "wg.internalSecret" -}}
{{- .Values.internalTls.existingSecret | default (printf "%s-internal-tls" (include "wg.fullname" .)) -}}
{{- end -}}

{{- define "wg.adminTokenSecret" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-admin-token" (include "wg.fullname" .)) -}}
{{- end -}}

{{- define "wg.engineKeySecret" -}}
{{- .Values.engines.apiKey.existingSecret | default (printf "%s-engine-api-key" (include "wg.fullname" .)) -}}
{{- end -}}

{{- define "wg.listenTlsSecret" -}}
{{- .Values.listenTls.existingSecret | default (printf "%s-listen-tls" (include "wg.fullname" .)) -}}
{{- end -}}

{{- define "wg.engineKeyOn" -}}
{{- if and .Values.engines.apiKey.enabled (or .Values.engines.enabled .Values.engines.apiKey.existingSecret) }}true{{ end -}}
{{- end -}}

{{- define "wg.etcdMembers" -}}
{{- $full := include "wg.fullname" . -}}
{{- $members := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $members = append $members (printf "%s-etcd-%d.%s-etcd.%s" $full $i $full (include "wg.namespaceDomain" $)) -}}
{{- end -}}
{{- join "," $members -}}
{{- end -}}

{{/* The internal TLS folder of one part, /etc/whisper-gateway/pki, as a projected volume:
(list $ "control-plane"|"envoy"|"etcd"). cert-manager's Secrets have ca.crt/tls.crt/tls.key; a
Secret from `whisper-gateway certs init` has the file names as keys. */}}
{{- define "wg.pkiVolume" -}}
{{- $ := index . 0 -}}
{{- $part := index . 1 -}}
{{- $full := include "wg.fullname" $ -}}
{{- $files := dict "control-plane" (list (list "control-plane" "ca.pem" "control-plane")) "envoy" (list (list "envoy" "ca.pem" "envoy-envoy")) "etcd" (list (list "etcd-member" "etcd-ca.pem" "etcd-etcd")) -}}
{{- $sets := get $files $part -}}
{{- if and (eq $part "control-plane") $.Values.etcd.enabled -}}
{{- $sets = append $sets (list "etcd-client" "etcd-ca.pem" "etcd-client-control-plane") -}}
{{- end -}}
- name: pki
  projected:
    defaultMode: 0440
    sources:
{{- range $sets }}
{{- $ca := index . 1 }}{{ $stem := index . 2 }}
{{- if $.Values.internalTls.certManager }}
      - secret:
          name: {{ printf "%s-%s-tls" $full (index . 0) }}
          items:
            - {key: ca.crt, path: {{ $ca }}}
            - {key: tls.crt, path: {{ $stem }}.pem}
            - {key: tls.key, path: {{ $stem }}.key}
{{- else }}
      - secret:
          name: {{ include "wg.internalSecret" $ }}
          items:
            - {key: {{ $ca }}, path: {{ $ca }}}
            - {key: {{ $stem }}.pem, path: {{ $stem }}.pem}
            - {key: {{ $stem }}.key, path: {{ $stem }}.key}
{{- end }}
{{- end }}
{{- end -}}

{{/* A component's spread over nodes (or zones): (list $ "envoy" .Values.envoy.topologySpread) */}}
{{- define "wg.topologySpread" -}}
{{- $ := index . 0 -}}
{{- $spread := index . 2 -}}
{{- if $spread.enabled }}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: {{ $spread.topologyKey }}
    whenUnsatisfiable: {{ $spread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "wg.componentSelector" (list $ (index . 1)) | nindent 8 }}
{{- end }}
{{- end -}}

{{/* A Secret's value kept across upgrades: the given one, else the installed one, else new. */}}
{{- define "wg.keptSecret" -}}
{{- $ := index . 0 -}}
{{- $name := index . 1 -}}
{{- $key := index . 2 -}}
{{- $given := index . 3 -}}
{{- if $given -}}
{{- $given | b64enc -}}
{{- else -}}
{{- $found := lookup "v1" "Secret" $.Release.Namespace $name -}}
{{- if and $found (hasKey $found.data $key) -}}
{{- index $found.data $key -}}
{{- else -}}
{{- randAlphaNum 48 | b64enc -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* gateway.yaml: the gateway values, with what the cluster decides set over them. */}}
{{- define "wg.gatewayConfig" -}}
{{- $full := include "wg.fullname" . -}}
{{- $g := deepCopy .Values.gateway -}}
{{- $listen := mergeOverwrite (deepCopy (default dict $g.listen)) (dict
  "address" "0.0.0.0" "port" (int .Values.ports.audio)
  "envoy_admin_port" (int .Values.ports.envoyAdmin) "envoy_metrics_port" (int .Values.ports.envoyMetrics)
  "xds_address" "0.0.0.0" "xds_port" (int .Values.ports.xds)
  "admin_address" "0.0.0.0" "admin_port" (int .Values.ports.admin)) -}}
{{- if .Values.listenTls.enabled -}}
{{- $_ := set $listen "tls" (mergeOverwrite (deepCopy (default dict $listen.tls)) (dict "cert_file" "/etc/whisper-gateway/certs/tls.crt" "key_file" "/etc/whisper-gateway/certs/tls.key")) -}}
{{- end -}}
{{- $_ := set $g "listen" $listen -}}
{{- $_ := set $g "internal_tls" (dict "dir" "/etc/whisper-gateway/pki") -}}
{{- if include "wg.engineKeyOn" . -}}
{{- $_ := set $g "auth" (mergeOverwrite (deepCopy (default dict $g.auth)) (dict "engine_api_key_env" "WHISPER_GATEWAY_ENGINE_API_KEY")) -}}
{{- end -}}
{{- $discovery := default list $g.discovery -}}
{{- if .Values.engines.enabled -}}
{{- $discovery = append $discovery (dict "name" (printf "%s-engine.%s" $full (include "wg.namespaceDomain" .)) "port" (int .Values.engines.port) "models" (list (include "wg.engineModel" .)) "interval_s" 5) -}}
{{- end -}}
{{- $_ := set $g "discovery" $discovery -}}
{{- if .Values.etcd.enabled -}}
{{- $members := list -}}
{{- range (splitList "," (include "wg.etcdMembers" .)) -}}
{{- $members = append $members (printf "%s:2379" .) -}}
{{- end -}}
{{- $_ := set $g "state" (mergeOverwrite (deepCopy (default dict $g.state)) (dict "etcd" $members "etcd_tls" (dict
  "ca_file" "/etc/whisper-gateway/pki/etcd-ca.pem"
  "cert_file" "/etc/whisper-gateway/pki/etcd-client-control-plane.pem"
  "key_file" "/etc/whisper-gateway/pki/etcd-client-control-plane.key"))) -}}
{{- end -}}
{{- toYaml $g -}}
{{- end -}}
