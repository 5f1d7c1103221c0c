"""Acceptance tests of the test S3 server (versitygw) through boto3."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError, EndpointConnectionError
from infra import S3Server

pytestmark = pytest.mark.s3

MiB = 1024 * 1024


def test_put_list_get(s3_client, s3_bucket):
    s3_client.put_object(Bucket=s3_bucket, Key="a/one.txt", Body=b"hello")
    s3_client.put_object(Bucket=s3_bucket, Key="a/two.txt", Body=b"world!")
    s3_client.put_object(Bucket=s3_bucket, Key="b/three.txt", Body=b"")

    listed = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="a/")
    assert [(o["Key"], o["Size"]) for o in listed["Contents"]] == [("a/one.txt", 5), ("a/two.txt", 6)]
    assert s3_client.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 3
    assert s3_client.get_object(Bucket=s3_bucket, Key="a/two.txt")["Body"].read() == b"world!"
    with pytest.raises(ClientError) as err:
        s3_client.get_object(Bucket=s3_bucket, Key="missing")
    assert err.value.response["Error"]["Code"] == "NoSuchKey"


def test_multipart_upload_round_trips_with_the_same_sha256(s3_client, s3_bucket):
    data = os.urandom(24 * MiB + 12345)
    digest = hashlib.sha256(data).hexdigest()

    # Explicit multipart API, 8 MiB parts, with S3's own SHA256 checksums.
    upload = s3_client.create_multipart_upload(Bucket=s3_bucket, Key="big.bin", ChecksumAlgorithm="SHA256")
    parts = []
    for number, offset in enumerate(range(0, len(data), 8 * MiB), start=1):
        part = s3_client.upload_part(
            Bucket=s3_bucket, Key="big.bin", UploadId=upload["UploadId"], PartNumber=number,
            Body=data[offset : offset + 8 * MiB], ChecksumAlgorithm="SHA256",
        )
        parts.append({"PartNumber": number, "ETag": part["ETag"], "ChecksumSHA256": part["ChecksumSHA256"]})
    assert len(parts) == 4
    s3_client.complete_multipart_upload(
        Bucket=s3_bucket, Key="big.bin", UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    head = s3_client.head_object(Bucket=s3_bucket, Key="big.bin")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-4")  # a multipart object
    got = s3_client.get_object(Bucket=s3_bucket, Key="big.bin")["Body"].read()
    assert hashlib.sha256(got).hexdigest() == digest

    # boto3's managed transfer (what the project's store code uses) splits it on its own.
    config = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    s3_client.upload_fileobj(io.BytesIO(data), s3_bucket, "big2.bin", Config=config)
    out = io.BytesIO()
    s3_client.download_fileobj(s3_bucket, "big2.bin", out, Config=config)
    assert hashlib.sha256(out.getvalue()).hexdigest() == digest
    assert s3_client.head_object(Bucket=s3_bucket, Key="big2.bin")["ETag"].strip('"').endswith("-5")


def test_conditional_put_writes_once(s3_client, s3_bucket):
    s3_client.put_object(Bucket=s3_bucket, Key="_MANIFEST.json", Body=b"{}", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        s3_client.put_object(Bucket=s3_bucket, Key="_MANIFEST.json", Body=b"{2}", IfNoneMatch="*")
    assert err.value.response["Error"]["Code"] == "PreconditionFailed"
    assert s3_client.get_object(Bucket=s3_bucket, Key="_MANIFEST.json")["Body"].read() == b"{}"


def test_server_stop_and_restart_keeps_endpoint_and_data(s3_server, s3_client, s3_bucket):
    s3_client.put_object(Bucket=s3_bucket, Key="kept", Body=b"still here")
    endpoint = s3_server.endpoint_url
    s3_server.stop()
    assert not s3_server.running
    with pytest.raises(EndpointConnectionError):
        s3_server.client().get_object(Bucket=s3_bucket, Key="kept")
    s3_server.start()
    assert s3_server.endpoint_url == endpoint
    assert s3_client.get_object(Bucket=s3_bucket, Key="kept")["Body"].read() == b"still here"


def test_a_second_server_is_independent_and_leaves_nothing_behind(s3_server):
    other = S3Server()
    try:
        other.start()
        assert other.endpoint_url != s3_server.endpoint_url
        s3 = other.client()
        s3.create_bucket(Bucket="private")
        assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["private"]
        pid, workdir = other._proc.pid, other.workdir
    finally:
        other.teardown()
    assert not workdir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
