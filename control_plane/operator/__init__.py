"""The operator's side: the admin API, its OpenAPI document, status, metrics, the status page."""
