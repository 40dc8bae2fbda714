# syntax=docker/dockerfile:1
# The cliplens service: `cliplens serve` on port 8000, as a non-root user.
#
# CPU by default: torch and torchvision come from PyTorch's CPU wheel index
# (https://download.pytorch.org/whl/cpu), a few hundred MB instead of the CUDA build's gigabytes.
# GPU: build with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 (the CUDA
# runtime ships inside those wheels; the host needs the NVIDIA driver and Container Toolkit), or use
# docker-compose.gpu.yml, which does that and reserves the GPU for the container.
FROM python:3.11.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# MALLOC_MMAP_THRESHOLD_: decoded photos are large short-lived buffers; with glibc's adaptive
# threshold the heap keeps them and RSS creeps up (measured in the soak test), with a fixed 128 KiB
# threshold they go back to the system at once and RSS stays flat.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_MMAP_THRESHOLD_=131072 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# `.` = the server only; the GPU variant builds `.[gpu]` (NVML, for the GPU gauges).
ARG PACKAGE=.
# torch first, from the chosen wheel index, so that installing the project finds it satisfied.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch torchvision
COPY pyproject.toml README.md ./
COPY src ./src
# The plain package: the server only. The `experiment` extra (demo, experiment: httpx, rich,
# matplotlib, fake GCS) is not in the image; the compose `photos` step's corpus generator needs none of it.
# /data: where the compose stack's one-shot `photos` step writes the sample corpus;
# ~/.cache: open_clip / Hugging Face weights (a named volume in compose, so they download once).
RUN pip install "${PACKAGE}" \
    && useradd --create-home --uid 10001 cliplens \
    && mkdir -p /data /home/cliplens/.cache \
    && chown cliplens:cliplens /data /home/cliplens/.cache

USER cliplens
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["cliplens", "serve", "--host", "0.0.0.0", "--port", "8000"]
