"""An S3-compatible server for tests: moto's server (a test dependency) on 127.0.0.1 in its own process
group, stopped through that group only. Any access key works against it; the ones in `env` are what the
AWS SDKs (and pyarrow) read from the environment, so the processes that talk to it get them that way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.conftest import free_port

MOTO_SERVER = Path(sys.executable).with_name("moto_server")


class S3Server:
    env = {"AWS_ACCESS_KEY_ID": "perfusion-test", "AWS_SECRET_ACCESS_KEY": "perfusion-test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def __init__(self, start_timeout_s: float = 60.0):
        self.port = free_port()
        self.log = open(Path(tempfile.mkdtemp(prefix="moto")) / "moto_server.log", "w")
        self.process = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)],
                                        env={**os.environ, **self.env}, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=2).read()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start; see {self.log.name}")
                time.sleep(0.3)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def uri(self, bucket: str, prefix: str) -> str:
        """s3://bucket/prefix with this server named in the query, the way a user points at their endpoint."""
        return f"s3://{bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http"

    def create_bucket(self, bucket: str) -> None:
        self.filesystem(allow_bucket_creation=True).create_dir(bucket)

    def filesystem(self, **options):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=self.env["AWS_ACCESS_KEY_ID"], secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
                                 endpoint_override=self.endpoint, scheme="http", region="us-east-1", **options)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under bucket/prefix."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(f"{bucket}/{prefix}".rstrip("/"), recursive=True, allow_not_found=True)
        return sorted(info.path for info in self.filesystem().get_file_info(selector) if info.type == pafs.FileType.File)

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)
        self.log.close()
