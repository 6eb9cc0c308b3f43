"""Who may use the gateway: API keys (and, as they come, their quotas and lanes)."""
