"""Real processes for tests and benchmarks alike: engines, control planes and Envoys on free
ports, readiness with deadlines, no process left behind (processes.py); speech clips made with
espeak-ng and sox (speech.py)."""
