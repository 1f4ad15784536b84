# syntax=docker/dockerfile:1
# gated-serve image. CPU by default; for CUDA build from a CUDA runtime base that has Python 3.11
# and point pip at the matching torch wheels, e.g.
#   docker build --build-arg BASE_IMAGE=<cuda-runtime-image-with-python3.11> \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t gated-serve:cuda .
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
# The +cpu wheel ranks above PyPI's 2.13.0 for `torch==2.13.0`, so pip never pulls the CUDA
# build (several GB) into a CPU image; a CUDA build swaps this index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Optional package sources of the building machine (deploy/image/build.sh passes its pip's):
# a folder of wheels mounted into the build, an index mirror, the certificate authority its
# network needs. Unset: PyPI with the base image's certificates.
ARG PIP_FIND_LINKS
ARG PIP_INDEX_URL
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL}
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Same order as `make install`: torch alone first, so the project's dependency resolution finds
# the pinned wheel already installed. tests/deploy/test_dockerfile.py runs these commands.
RUN python -m pip install torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
RUN python -m pip install .

FROM ${BASE_IMAGE} AS runtime
# HOME on /tmp: the user has no home directory, and /tmp is the only writable mount under
# Kubernetes' readOnlyRootFilesystem (deploy/k8s).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    GATED_HOST=0.0.0.0 \
    GATED_PORT=8000 \
    GATED_GRPC_PORT=8001 \
    GATED_MODEL_REPOSITORY=/models
# A fixed numeric uid so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gated
COPY --from=build /opt/venv /opt/venv
# The shipped model is the default repository; mount another repository over /models to serve
# other models (each <name>/ sub-folder is one model). Owned by root: the server only reads it.
COPY models/pretrained/ /models/
USER 10001
WORKDIR /tmp
# REST (V2 HTTP/JSON) on 8000, gRPC (inference.GRPCInferenceService) on 8001.
EXPOSE 8000 8001
# slim has no curl; the readiness endpoint answers 503 while loading and while draining.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('GATED_PORT', '8000'), timeout=2).status == 200 else 1)"]
ENTRYPOINT ["gated", "serve"]
