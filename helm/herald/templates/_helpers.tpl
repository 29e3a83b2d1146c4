{{/* Chart name. */}}
{{- define "herald.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, at most 63 characters. */}}
{{- define "herald.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "herald.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object of the release carries, without a component:
     each object adds exactly one app.kubernetes.io/component. */}}
{{- define "herald.commonLabels" -}}
helm.sh/chart: {{ include "herald.chart" . }}
app.kubernetes.io/name: {{ include "herald.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The broker's labels. */}}
{{- define "herald.labels" -}}
{{ include "herald.commonLabels" . }}
app.kubernetes.io/component: broker
{{- end }}

{{/* The bundled NATS's labels. */}}
{{- define "herald.nats.labels" -}}
{{ include "herald.commonLabels" . }}
app.kubernetes.io/component: nats
{{- end }}

{{- define "herald.selectorLabels" -}}
app.kubernetes.io/name: {{ include "herald.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/component: broker
{{- end }}

{{- define "herald.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "herald.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "herald.secretName" -}}
{{- default (include "herald.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{/* The image: repository:tag, pinned by image.digest when given. */}}
{{- define "herald.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- with .Values.image.digest }}@{{ . }}{{ end }}
{{- end }}

{{/*
A name of the release's made of the full name and a suffix, at most `max`
characters: the full name is cut, never the suffix, so two names never
collide. Called with (list . "suffix" max).
*/}}
{{- define "herald.suffixedName" -}}
{{- $ctx := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- $room := sub (index . 2) (add1 (len $suffix)) | int -}}
{{- printf "%s-%s" (include "herald.fullname" $ctx | trunc $room | trimSuffix "-") $suffix -}}
{{- end }}

{{/* NATS resources. The StatefulSet's name is at most 52 characters: its pods'
     controller-revision-hash label is the name plus a dash and ten characters,
     and a label value holds 63; so the headless Service's
     (<this>-headless) stays within 63 too. */}}
{{- define "herald.nats.fullname" -}}
{{- include "herald.suffixedName" (list . "nats" 52) }}
{{- end }}

{{- define "herald.nats.selectorLabels" -}}
app.kubernetes.io/name: {{ include "herald.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/component: nats
{{- end }}

{{/* The NATS URL Herald connects to, in both modes. */}}
{{- define "herald.natsUrl" -}}
{{- if .Values.nats.enabled }}
{{- printf "nats://%s:%d" (include "herald.nats.fullname" .) (int .Values.nats.clientPort) }}
{{- else }}
{{- required "nats.url is required when nats.enabled is false" .Values.nats.url }}
{{- end }}
{{- end }}

{{/*
The Secret volumes access control needs: token keys (auth.tokens.secretName)
and the API keys file (a key of the API key Secret). Checks the settings.
*/}}
{{- define "herald.authVolumes" -}}
{{- $t := .Values.auth.tokens -}}
{{- if $t.secretName }}
- name: auth-keys
  secret:
    secretName: {{ $t.secretName }}
{{- end }}
{{- if .Values.auth.apiKeysFileKey }}
- name: api-keys
  secret:
    secretName: {{ include "herald.secretName" . }}
    items:
      - key: {{ .Values.auth.apiKeysFileKey }}
        path: {{ .Values.auth.apiKeysFileKey }}
{{- end }}
{{- end }}

{{/* The ports Herald reaches NATS on, comma-separated: the bundled servers'
     client port, or each distinct port of nats.url's URLs (4222 where a URL
     names none, as NATS clients default). */}}
{{- define "herald.natsPorts" -}}
{{- if .Values.nats.enabled -}}
{{- .Values.nats.clientPort -}}
{{- else -}}
{{- $ports := list -}}
{{- range splitList "," (include "herald.natsUrl" .) -}}
{{- $hostport := regexReplaceAll "^[A-Za-z]+://" (trim .) "" -}}
{{- $hostport = regexReplaceAll "^[^@/]*@" $hostport "" -}}
{{- $hostport = regexReplaceAll "/.*$" $hostport "" -}}
{{- $port := regexFind ":[0-9]+$" $hostport | trimPrefix ":" | default "4222" -}}
{{- $ports = append $ports $port -}}
{{- end -}}
{{- $ports | uniq | join "," -}}
{{- end -}}
{{- end }}

{{/* Refuses access-control settings that name no Secret. */}}
{{- define "herald.checkAuth" -}}
{{- $t := .Values.auth.tokens -}}
{{- if and (or $t.hmacKey $t.publicKey $t.jwksKey) (not $t.secretName) -}}
{{- fail "auth.tokens.secretName is required when auth.tokens.hmacKey, publicKey or jwksKey is set" -}}
{{- end -}}
{{- if and (not .Values.nats.enabled) .Values.nats.auth.enabled (not .Values.nats.auth.existingSecret) (not .Values.nats.auth.password) -}}
{{- fail "nats.auth.enabled with an external NATS (nats.enabled false) needs nats.auth.existingSecret holding its password (or nats.auth.password); or set nats.auth.enabled false" -}}
{{- end -}}
{{- $na := .Values.nats.auth -}}
{{- if and .Values.nats.enabled $na.enabled (gt (int .Values.nats.replicas) 1) (eq $na.passwordKey $na.routePasswordKey) -}}
{{- fail (printf "nats.auth.passwordKey and nats.auth.routePasswordKey are both %s: Herald's password would open the routes, and anything holding it could join the cluster as a server" $na.passwordKey) -}}
{{- end -}}
{{- if and .Values.auth.apiKeysFileKey (not .Values.auth.existingSecret) -}}
{{- fail "auth.apiKeysFileKey names a key of auth.existingSecret: set both" -}}
{{- end -}}
{{- end -}}

{{/* The chart makes the NATS Secret, unless existingSecret names one: for the
     bundled NATS, Herald's password (nats.auth) and the route password (more
     than one server); for an external one, nats.auth.password. */}}
{{- define "herald.nats.secretNeeded" -}}
{{- $a := .Values.nats.auth -}}
{{- if not $a.existingSecret -}}
{{- if and .Values.nats.enabled (or $a.enabled (gt (int .Values.nats.replicas) 1)) -}}
true
{{- else if and (not .Values.nats.enabled) $a.enabled $a.password -}}
true
{{- end -}}
{{- end -}}
{{- end }}

{{/*
Refuses passwords in a Secret the bundled NATS reads (nats.auth.existingSecret,
read with lookup where a cluster answers; an offline render sees nothing):
16+ of letters, digits and ._~-, a letter first, as for nats.auth.password,
since nats-server parses $NATS_PASSWORD's value as config and the route
password goes into URLs. Names the key, never the value. Called with
(list . secret), secret as lookup returns it (empty: nothing to check).
*/}}
{{- define "herald.nats.checkSecretPasswords" -}}
{{- $ctx := index . 0 -}}
{{- $secret := index . 1 -}}
{{- $a := $ctx.Values.nats.auth -}}
{{- if and $secret $ctx.Values.nats.enabled -}}
{{- $keys := list -}}
{{- if $a.enabled }}{{ $keys = append $keys $a.passwordKey }}{{ end -}}
{{- if gt (int $ctx.Values.nats.replicas) 1 }}{{ $keys = append $keys $a.routePasswordKey }}{{ end -}}
{{- $data := $secret.data | default dict -}}
{{- range $key := $keys | uniq -}}
{{- if not (hasKey $data $key) -}}
{{- fail (printf "nats.auth.existingSecret %s has no key %s: the NATS pods would not start" $a.existingSecret $key) -}}
{{- end -}}
{{- if not (regexMatch `^[A-Za-z][A-Za-z0-9._~-]{15,}$` (index $data $key | b64dec)) -}}
{{- fail (printf "the password in key %s of nats.auth.existingSecret %s breaks the rules: 16 or more letters, digits or ._~-, a letter first (nats-server parses it as config, and the route password goes into URLs)" $key $a.existingSecret) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* The Secret holding the NATS passwords. */}}
{{- define "herald.natsSecretName" -}}
{{- default (include "herald.suffixedName" (list . "nats-auth" 63)) .Values.nats.auth.existingSecret }}
{{- end }}

{{/*
Copies of the history stream: config.historyReplicas, or (0) 3 with a
bundled NATS of 3 or more servers, else 1.
*/}}
{{- define "herald.historyReplicas" -}}
{{- $r := int .Values.config.historyReplicas -}}
{{- if gt $r 0 -}}
{{- $r -}}
{{- else if and .Values.nats.enabled (ge (int .Values.nats.replicas) 3) -}}
3
{{- else -}}
1
{{- end -}}
{{- end }}

{{/* The bundled NATS's nats.conf (its ConfigMap, and the StatefulSet's
     checksum of it). */}}
{{- define "herald.nats.conf" -}}
{{- $fullname := include "herald.nats.fullname" . -}}
port: {{ .Values.nats.clientPort }}
http_port: {{ .Values.nats.monitorPort }}
# The pod's name, quoted in the env (see NATS_SERVER_NAME in the StatefulSet).
server_name: $NATS_SERVER_NAME
pid_file: /var/run/nats/nats.pid
# Room for Herald's largest message (config.maxMessageBytes) plus its
# headers; never below NATS's default of 1 MiB.
max_payload: {{ max 1048576 (add (int64 .Values.config.maxMessageBytes) 4096) | int64 }}
# nats-server refuses less than 30s.
lame_duck_duration: {{ .Values.nats.lameDuckDuration | quote }}
lame_duck_grace_period: 10s
{{- if .Values.nats.auth.enabled }}
# Only clients with the password (Herald) may connect.
authorization {
  user: {{ .Values.nats.auth.user | quote }}
  password: $NATS_PASSWORD
}
{{- end }}
{{- if .Values.nats.jetstream.enabled }}
# The history store (config.history), on this server's volume.
jetstream {
  store_dir: /data
  max_file_store: {{ include "herald.nats.maxFileStore" . }}
  max_memory_store: {{ .Values.nats.jetstream.maxMemoryStore }}
}
{{- end }}
{{- if .Values.nats.tls.enabled }}
tls {
  cert_file: /etc/nats-tls/tls.crt
  key_file: /etc/nats-tls/tls.key
}
{{- end }}
{{- if gt (int .Values.nats.replicas) 1 }}
# Routes between the servers. A server joins only with the route
# password: each URL below carries it ($NATS_ROUTE_<n>, built in the
# pod's env from the Secret), and this block asks it of every server
# that connects, so a stray nats-server cannot join and publish.
cluster {
  name: {{ include "herald.fullname" . | quote }}
  port: {{ .Values.nats.clusterPort }}
  authorization {
    user: route
    password: $NATS_ROUTE_PASSWORD
  }
  {{- if .Values.nats.tls.enabled }}
  # Routes are TLS too, verified both ways against ca.crt.
  tls {
    cert_file: /etc/nats-tls/tls.crt
    key_file: /etc/nats-tls/tls.key
    ca_file: /etc/nats-tls/ca.crt
  }
  {{- end }}
  {{- if .Values.nats.noAdvertise }}
  # Clients are not told the servers' own addresses: they stay on the Service.
  no_advertise: true
  {{- end }}
  routes: [
    {{- range $i := until (int .Values.nats.replicas) }}
    $NATS_ROUTE_{{ $i }}
    {{- end }}
  ]
}
{{- end }}
{{- end }}

{{/* Two maps as one YAML map, never a key twice (kustomize and Flux refuse
     duplicate keys): the first wins. Called with (list first second). */}}
{{- define "herald.mergeMaps" -}}
{{- $m := merge (deepCopy (index . 0)) (deepCopy (index . 1)) -}}
{{- if $m }}{{ toYaml $m }}{{ end -}}
{{- end }}

{{/* Refuses extra labels that would change a selector's: the selector
     would no longer match the pods. Called with (list selector extra "what"). */}}
{{- define "herald.checkLabels" -}}
{{- $sel := index . 0 -}}
{{- range $k, $v := index . 1 -}}
{{- if and (hasKey $sel $k) (ne (toString $v) (index $sel $k)) -}}
{{- fail (printf "%s may not set %s (%s): the chart's selector uses it (%s)" (index $ 2) $k (toString $v) (index $sel $k)) -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/*
The Deployment's grace period: everything between the preStop hook and the
process's exit fits in it. After preStopSeconds and the drain
(config.drainSeconds) herald waits up to 5 s for the sessions to end, 5 s
for HTTP requests in flight, 5 s for the NATS flush and 5 s for the NATS
connection to close (broker/src/server.rs, node/mod.rs, cluster/bus.rs):
20 s, and 5 s more for the rest of its stop. terminationGracePeriodSeconds 0
derives it with 5 s to spare; a set value below what the waits need is
refused, since the kubelet's SIGKILL would cut the flush of what clients
published last.
*/}}
{{- define "herald.terminationGracePeriodSeconds" -}}
{{- $need := add (int .Values.preStopSeconds) (int .Values.config.drainSeconds) 25 -}}
{{- $set := int .Values.terminationGracePeriodSeconds -}}
{{- if not $set -}}
{{- add $need 5 -}}
{{- else if lt $set $need -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least preStopSeconds + config.drainSeconds + 25 = %d: after the drain herald waits up to 5 s each for sessions, HTTP requests, the NATS flush and the NATS close, then stops; or set 0 to derive it" $set $need) -}}
{{- else -}}
{{- $set -}}
{{- end -}}
{{- end }}

{{/* The NATS pods' grace period: nats.terminationGracePeriodSeconds, which
     must exceed lame duck mode (nats.lameDuckDuration, 30s or more, in s or
     m as the schema takes it) plus its 10 s grace period, or the kubelet's
     SIGKILL cuts the clients still to move and the JetStream flush. */}}
{{- define "herald.nats.terminationGracePeriodSeconds" -}}
{{- $ldm := .Values.nats.lameDuckDuration -}}
{{- $seconds := trimSuffix "s" (trimSuffix "m" $ldm) | int -}}
{{- if hasSuffix "m" $ldm }}{{ $seconds = mul $seconds 60 }}{{ end -}}
{{- $set := int .Values.nats.terminationGracePeriodSeconds -}}
{{- if le $set (add $seconds 10 | int) -}}
{{- fail (printf "nats.terminationGracePeriodSeconds (%d) must exceed nats.lameDuckDuration (%s = %d s) plus its 10 s grace period: set it to %d or more" $set $ldm $seconds (add $seconds 11)) -}}
{{- end -}}
{{- $set -}}
{{- end }}

{{/* Bytes in a Kubernetes quantity (10Gi) or a NATS size (8GB, binary as
     nats-server reads it), or a plain number. */}}
{{- define "herald.bytes" -}}
{{- $n := regexFind "^[0-9]+" . | int64 -}}
{{- $unit := regexFind "[A-Za-z]+$" . -}}
{{- $scale := dict "" 1 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "KB" 1024 "MB" 1048576 "GB" 1073741824 "TB" 1099511627776 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 -}}
{{- mul $n (index $scale $unit) -}}
{{- end }}

{{/*
Bytes in a Kubernetes quantity (512Mi, 1.5Gi, 0.5Gi, 1e9, 1G, 100m, or a
plain number), rounded up to a whole byte as Kubernetes does: decimal
fractions, exponents, binary (Ki..Ei) and decimal (k..E, m) suffixes, in
integer arithmetic. Fails on what is no quantity; `what` names the value.
Called with (list quantity "what").
*/}}
{{- define "herald.quantityBytes" -}}
{{- $v := index . 0 -}}
{{- $what := index . 1 -}}
{{- if or (kindIs "float64" $v) (kindIs "int64" $v) (kindIs "int" $v) -}}
{{- if or (lt (float64 $v) 0.0) (ne (float64 $v) (float64 (int64 $v))) -}}
{{- fail (printf "%s (%v) must be a whole, positive number of bytes or a quantity such as 512Mi" $what $v) -}}
{{- end -}}
{{- int64 $v -}}
{{- else -}}
{{- $q := toString $v -}}
{{- if not (regexMatch `^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[mkMGTPE]|[eE][+-]?[0-9]+)?$` $q) -}}
{{- fail (printf "%s (%s) is no Kubernetes quantity (e.g. 512Mi, 1.5Gi, 1G, 1e9)" $what $q) -}}
{{- end -}}
{{- $num := regexReplaceAll `^\+?([0-9]*\.?[0-9]*).*$` $q "${1}" -}}
{{- $suffix := trimPrefix $num (trimPrefix "+" $q) -}}
{{- $int := regexReplaceAll `\..*$` $num "" -}}
{{- $frac := regexReplaceAll `^[0-9]*\.?` $num "" -}}
{{- if not (contains "." $num) }}{{ $frac = "" }}{{ end -}}
{{- /* The value is digits × 10^exp10 × mult. */ -}}
{{- $digits := printf "%s%s" $int $frac | trimPrefix "0" | default "0" -}}
{{- $digits = regexReplaceAll `^0+` $digits "" | default "0" -}}
{{- $exp10 := sub 0 (len $frac) | int -}}
{{- $mult := 1 | int64 -}}
{{- $binary := dict "Ki" 1 "Mi" 2 "Gi" 3 "Ti" 4 "Pi" 5 "Ei" 6 -}}
{{- $decimal := dict "m" -3 "k" 3 "M" 6 "G" 9 "T" 12 "P" 15 "E" 18 -}}
{{- if hasKey $binary $suffix -}}
{{- range until (index $binary $suffix | int) }}{{ $mult = mul $mult 1024 }}{{ end -}}
{{- else if hasKey $decimal $suffix -}}
{{- $exp10 = add $exp10 (index $decimal $suffix) | int -}}
{{- else if $suffix -}}
{{- $exp10 = add $exp10 (trimPrefix "+" (substr 1 -1 $suffix) | atoi) | int -}}
{{- end -}}
{{- $n := mul (atoi $digits | int64) $mult -}}
{{- if ge $exp10 0 -}}
{{- range until $exp10 }}{{ $n = mul $n 10 }}{{ end -}}
{{- $n -}}
{{- else -}}
{{- $d := 1 | int64 -}}
{{- range until (sub 0 $exp10 | int) }}{{ $d = mul $d 10 }}{{ end -}}
{{- div (add $n (sub $d 1)) $d -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* GOMEMLIMIT of a NATS server: 80% of its memory limit. A limit too small
     to run a server is refused (100m is a tenth of a byte: 100Mi meant?). */}}
{{- define "herald.nats.gomemlimit" -}}
{{- $bytes := include "herald.quantityBytes" (list . "nats.resources.limits.memory") | int64 -}}
{{- if lt $bytes 16777216 -}}
{{- fail (printf "nats.resources.limits.memory (%v) is only %d bytes: nats-server needs at least 16Mi" . $bytes) -}}
{{- end -}}
{{- /* 80%, without overflowing int64 for the largest limits. */ -}}
{{- add (mul (div $bytes 10) 8) (div (mul (mod $bytes 10) 8) 10) -}}
{{- end }}

{{/* JetStream's max_file_store: nats.jetstream.maxFileStore, or (empty) 90%
     of the volume, in bytes: a file system holds less than its nominal size
     (metadata, ext4's reserved blocks), and a store as big as the volume
     fills the disk before JetStream's own limit stops it. */}}
{{- define "herald.nats.maxFileStore" -}}
{{- .Values.nats.jetstream.maxFileStore | default (include "herald.nats.storeRoom" .) -}}
{{- end }}

{{/* 90% of the volume (nats.jetstream.storageSize), in bytes. */}}
{{- define "herald.nats.storeRoom" -}}
{{- div (mul (include "herald.bytes" .Values.nats.jetstream.storageSize | int64) 9) 10 -}}
{{- end }}

{{/* Refuses history settings the bundled NATS cannot keep: the node would
     answer /readyz 200 with "history: jetstream stream unavailable". */}}
{{- define "herald.checkHistory" -}}
{{- $js := .Values.nats.jetstream -}}
{{- if and .Values.nats.enabled .Values.config.history -}}
{{- if not $js.enabled -}}
{{- fail "config.history needs JetStream: the bundled NATS has nats.jetstream.enabled false (turn it on, or leave config.history empty)" -}}
{{- end -}}
{{- $store := include "herald.bytes" (include "herald.nats.maxFileStore" .) | int64 -}}
{{- if gt (int64 .Values.config.historyBytes) $store -}}
{{- fail (printf "config.historyBytes (%d) exceeds nats.jetstream.maxFileStore (%s = %d bytes): each server holding a copy of the history stream must fit all of it" (int64 .Values.config.historyBytes) (include "herald.nats.maxFileStore" .) $store) -}}
{{- end -}}
{{- $copies := include "herald.historyReplicas" . | int -}}
{{- if gt $copies (int .Values.nats.replicas) -}}
{{- fail (printf "config.historyReplicas (%d) exceeds nats.replicas (%d): a stream keeps each copy on another server" $copies (int .Values.nats.replicas)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.nats.enabled $js.enabled -}}
{{- $room := include "herald.nats.storeRoom" . | int64 -}}
{{- $store := include "herald.bytes" (include "herald.nats.maxFileStore" .) | int64 -}}
{{- if gt $store $room -}}
{{- fail (printf "nats.jetstream.maxFileStore (%s = %d bytes) exceeds 90%% of nats.jetstream.storageSize (%s: %d bytes): the file system holds less than the volume's size, and the disk would fill before JetStream's limit; lower it or leave it empty for 90%% of the volume" (include "herald.nats.maxFileStore" .) $store $js.storageSize $room) -}}
{{- end -}}
{{- end -}}
{{- end }}
