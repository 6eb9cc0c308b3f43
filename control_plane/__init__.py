"""whisper-gateway's control plane: turns the fleet of Whisper engines into Envoy configuration."""
