"""A simulated vLLM Whisper engine: vLLM's API and metrics over a queueing model of a GPU."""
