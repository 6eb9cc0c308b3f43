"""The fleet: backends and their drains (registry), discovery and resolution, the state file."""
