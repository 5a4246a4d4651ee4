# The kuberlhf operator: kopf + the Kubernetes client, no torch / ray / deepspeed.
# Build from the repository root:
#   docker build -f images/operator.Dockerfile -t kuberlhf/operator:0.1.0 .

# Build the project's wheel in a throwaway stage so no source tree is left in the final image.
FROM python:3.11.14-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kuberlhf ./kuberlhf
COPY operator ./operator
COPY workers ./workers
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11.14-slim-bookworm
# Bytecode cannot be written on the read-only root filesystem the chart mounts; don't try.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
# Only the operator extra: the operator never imports the training stack.
RUN pip install --no-cache-dir "$(ls /wheels/kuberlhf-*.whl)[operator]" \
    && rm -rf /wheels \
    && useradd --uid 1000 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin kuberlhf
USER 1000:1000
WORKDIR /tmp
EXPOSE 8080 9090
ENTRYPOINT ["kuberlhf", "operator"]
