"""Real vLLM engines: how the gateway launches them, and a CPU build of vLLM for tests."""
