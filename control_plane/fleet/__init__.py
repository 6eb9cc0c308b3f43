"""The fleet: backends and their drains (registry), discovery and resolution (the resolved fleet),
the state file (local_store) or etcd (etcd_state)."""
