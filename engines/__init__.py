"""Speech engines with vLLM's HTTP surface: a simulated GPU for load, a CPU Whisper for real speech."""
