# One image for every app service; compose picks the mode with `command:`
# (`db upgrade`, `worker ingest`, ...) after the `recsys` entrypoint.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# libgomp1: the `implicit` wheels load OpenMP at run time and slim does not ship it.
# libsuitesparse-dev, gcc, libc6-dev: scikit-sparse (sparse_ease's Cholesky) has no wheel and
# compiles against CHOLMOD at install; the CHOLMOD libraries stay for run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libsuitesparse-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Only what the package needs; README.md is pyproject's `readme`.
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY dashboard ./dashboard
RUN pip install . && rm -rf build ./*.egg-info

# Non-root; /data and /models are made here so the named volumes start owned by it.
RUN useradd --system --uid 10001 --create-home --home-dir /home/recsys recsys \
    && mkdir -p /data /models \
    && chown recsys:recsys /data /models
USER recsys

ENV DATA_PATH=/data \
    MODEL_PATH=/models

ENTRYPOINT ["recsys"]
CMD ["--help"]
