"""xDS type URLs, and the order in which an ADS stream sends them (make before break)."""

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# Clusters first, their endpoints next, then listeners, then the routes that point at clusters.
SEND_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
# Types Envoy subscribes to by wildcard; every response carries all of them.
WILDCARD_TYPES = frozenset({CLUSTER, LISTENER})

SHORT_NAMES = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS"}
