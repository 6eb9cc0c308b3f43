"""xDS type URLs, and the order in which an ADS stream sends them (make before break)."""

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

# Clusters first, their endpoints next, the certificates they and the listeners name (SDS), then
# listeners, then the routes that point at clusters.
SEND_ORDER = (CLUSTER, ENDPOINT, SECRET, LISTENER, ROUTE)
# Types Envoy subscribes to by wildcard; every response carries all of them.
WILDCARD_TYPES = frozenset({CLUSTER, LISTENER})

SHORT_NAMES = {CLUSTER: "CDS", ENDPOINT: "EDS", SECRET: "SDS", LISTENER: "LDS", ROUTE: "RDS"}

# Envoy's endpoint metadata namespace that selects a cluster's transport socket (TLS to an engine).
TLS_MATCH_NAMESPACE = "envoy.transport_socket_match"
