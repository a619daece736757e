# Two images from one dependency tree; compose picks each service's mode with `command:`
# (`db upgrade`, `worker ingest`, ...) after the `recsys` entrypoint.
#   default (last stage): everything; the workers, bootstrap and the dashboard.
#   `--target serve`: the same locked versions minus the training and evaluation
#     libraries (deploy/serve-image-excludes.txt); serve, Flower, beat, the policy and
#     the migration, none of which imports them.
#
# Stages: `deps` compiles and installs the locked dependency tree (requirements.lock, the
# same file `make` installs the venv from) into /opt/venv; `serve-deps` uninstalls the
# excluded distributions from a copy of it; `app` builds the project's own wheel; each
# image copies its venv and the wheel onto a slim base with only the run-time libraries.
# The lock is copied before any code, so a code change rebuilds neither the dependency
# layers nor the images' copies of /opt/venv.

FROM python:3.11-slim AS deps

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# scikit-sparse (sparse_ease's Cholesky) has no wheel and compiles against CHOLMOD, so
# this stage alone has the compiler and the SuiteSparse headers (and Python's own headers
# when the base image lacks them); binutils for `strip`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libsuitesparse-dev binutils \
    && { [ -f "$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
         || apt-get install -y --no-install-recommends python3-dev; } \
    && rm -rf /var/lib/apt/lists/*

COPY requirements.lock /tmp/requirements.lock
# The venv has no pip of its own (the base image's pip installs into it, `--python`).
# Then what nothing runs goes: the packages' bundled test suites, and the debug symbols
# of their shared libraries (llvmlite's and pyarrow's are most of their size). The
# libraries auditwheel vendored into `<name>.libs` folders keep theirs: patchelf has
# rewritten their headers, and strip moves segments the loader then rejects.
RUN python -m venv --without-pip /opt/venv \
    && pip --python /opt/venv/bin/python install --no-deps -r /tmp/requirements.lock \
    && cd /opt/venv/lib/python3*/site-packages \
    && find numpy scipy pandas pyarrow numba llvmlite matplotlib mpl_toolkits -depth -type d \
         -name tests -exec rm -rf {} + \
    && find . -name '*.so*' -type f -not -path './*.libs/*' -exec strip --strip-unneeded {} +

# The serve image's venv: the full one without the excluded distributions, each named
# with its version checked against the lock; `pip check` fails the build when a package
# left needs one of them.
FROM deps AS serve-deps
COPY deploy/serve-image-excludes.txt /tmp/serve-image-excludes.txt
RUN grep -v '^#' /tmp/serve-image-excludes.txt | xargs pip --python /opt/venv/bin/python \
        uninstall -y \
    && pip --python /opt/venv/bin/python check

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

# What both images share: the non-root user (/data and /models are made here so the
# named volumes start owned by it) and the environment.
FROM python:3.11-slim AS runtime

ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    DATA_PATH=/data \
    MODEL_PATH=/models

RUN useradd --system --uid 10001 --create-home --home-dir /home/recsys recsys \
    && mkdir -p /data /models \
    && chown recsys:recsys /data /models
WORKDIR /home/recsys
ENTRYPOINT ["recsys"]
CMD ["--help"]

FROM runtime AS serve

COPY --from=serve-deps /opt/venv /opt/venv
# The project itself, without dependencies: the layers above stay cached across code changes.
COPY --from=app /dist /tmp/dist
RUN pip --python /opt/venv/bin/python install --no-cache-dir --no-deps /tmp/dist/*.whl \
    && rm -rf /tmp/dist
USER recsys

FROM runtime

# libgomp1: the `implicit` wheels load OpenMP at run time and slim does not ship it.
# libcholmod3: the CHOLMOD shared library scikit-sparse links against (Debian 12's
# SuiteSparse 5; it pulls AMD, COLAMD, METIS and BLAS/LAPACK). apt's package caches
# (/var/cache/apt/*.bin, 75 MB) go with the lists.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libcholmod3 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/cache/apt/*.bin

COPY --from=deps /opt/venv /opt/venv
COPY --from=app /dist /tmp/dist
RUN pip --python /opt/venv/bin/python install --no-cache-dir --no-deps /tmp/dist/*.whl \
    && rm -rf /tmp/dist
USER recsys
