"""The xDS side: versioned snapshots, a cache that wakes streams, and the ADS server."""
