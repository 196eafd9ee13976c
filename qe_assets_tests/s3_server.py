"""A real S3-compatible server on a loopback port: moto in server mode, its own process, reached
through boto3 exactly as AWS, MinIO or R2 would be (endpoint from AWS_ENDPOINT_URL_S3)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from qe_assets_tests.conftest import free_port, wait_until_serving

# Test credentials: moto accepts any; the value is distinctive so a test can prove it never
# reaches a log, an error or the store's metadata.
ACCESS_KEY = "AKIATESTPUBLISH0001"
SECRET_KEY = "publish-secret-never-logged-0123456789"


class S3Server:
    def __init__(self, workdir: Path, *, check_credentials: bool = False) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        # moto checks signatures against the IAM users it knows only when told to: then every
        # key is wrong (no user was ever created).
        self.check_credentials = check_credentials

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.workdir / "moto.log", "wb")  # noqa: SIM115 - kept for the process's life
        env = {**os.environ}
        if self.check_credentials:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        wait_until_serving(
            self.process,
            lambda: socket.create_connection(("127.0.0.1", self.port), 0.5).close(),
            OSError,
            "moto server",
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def environment(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str) -> dict[str, bytes]:
        client = self.client()
        listing = client.list_objects_v2(Bucket=bucket).get("Contents", [])
        return {
            o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listing
        }
