# One image for every app service; compose picks the mode with `command:`
# (`db upgrade`, `worker ingest`, ...) after the `recsys` entrypoint.
#
# Three stages: `deps` compiles and installs the locked dependency tree (requirements.lock,
# the same file `make` installs the venv from) into /opt/venv; `app` builds the project's
# own wheel; the runtime stage copies both onto a slim base with only the run-time
# libraries. The lock is copied before any code, so a code change rebuilds neither the
# dependency layers nor the runtime's copy of /opt/venv.

FROM python:3.11-slim AS deps

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# scikit-sparse (sparse_ease's Cholesky) has no wheel and compiles against CHOLMOD, so
# this stage alone has the compiler and the SuiteSparse headers (and Python's own headers
# when the base image lacks them).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libsuitesparse-dev \
    && { [ -f "$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
         || apt-get install -y --no-install-recommends python3-dev; } \
    && rm -rf /var/lib/apt/lists/*

COPY requirements.lock /tmp/requirements.lock
# The venv has no pip of its own (the base image's pip installs into it, `--python`), and
# the test suites bundled inside numpy, scipy, pandas and pyarrow go: nothing runs them.
RUN python -m venv --without-pip /opt/venv \
    && pip --python /opt/venv/bin/python install --no-deps -r /tmp/requirements.lock \
    && find /opt/venv/lib/python3*/site-packages/numpy /opt/venv/lib/python3*/site-packages/scipy \
         /opt/venv/lib/python3*/site-packages/pandas /opt/venv/lib/python3*/site-packages/pyarrow \
         -depth -type d -name tests -exec rm -rf {} +

FROM python:3.11-slim AS app

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the package needs; README.md is pyproject's `readme`.
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY recsys ./recsys
COPY dashboard ./dashboard
RUN pip wheel --no-deps --wheel-dir /dist .

FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# libgomp1: the `implicit` wheels load OpenMP at run time and slim does not ship it.
# libcholmod3: the CHOLMOD shared library scikit-sparse links against (Debian 12's
# SuiteSparse 5; it pulls AMD, COLAMD, METIS and BLAS/LAPACK).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libcholmod3 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

COPY --from=deps /opt/venv /opt/venv

# The project itself, without dependencies: the layers above stay cached across code changes.
COPY --from=app /dist /tmp/dist
RUN pip --python /opt/venv/bin/python install --no-cache-dir --no-deps /tmp/dist/*.whl \
    && rm -rf /tmp/dist

# Non-root; /data and /models are made here so the named volumes start owned by it.
RUN useradd --system --uid 10001 --create-home --home-dir /home/recsys recsys \
    && mkdir -p /data /models \
    && chown recsys:recsys /data /models
USER recsys
WORKDIR /home/recsys

ENV DATA_PATH=/data \
    MODEL_PATH=/models

ENTRYPOINT ["recsys"]
CMD ["--help"]
