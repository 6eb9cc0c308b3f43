"""What every engine shares: vLLM's request parsing, error shape, response formats and metrics."""
