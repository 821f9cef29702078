"""Bazel 4.2.3 fetches an `http_archive` through ExpBuild's Remote Asset API.

`--experimental_remote_downloader` makes Bazel ask the server's Fetch service for every
download; the archive is served by a small HTTP server on 127.0.0.1 that records who came.
The build must succeed with the archive's file in its output, every HTTP request must come
from ExpBuild (none from Bazel itself), and `asset_fetches` must say who fetched what. After
`bazel clean --expunge` (and with Bazel's repository cache off) the second build is answered
from the CAS: no new HTTP request.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import tarfile

import asyncpg
import pytest

from tests.asset_http import AssetHttpServer
from tests.conftest import with_database
from tests.test_bazel import Bazel, bazel_exe, cluster, copy_tree  # noqa: F401 - fixtures

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

HELLO = b"hello from an archive fetched through ExpBuild\n"


def archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in {
            "fetched/BUILD.bazel": b'exports_files(["hello.txt"])\n',
            "fetched/WORKSPACE": b"",
            "fetched/hello.txt": HELLO,
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def add_http_archive(workspace, url: str, sha256: str) -> None:
    with open(workspace / "WORKSPACE", "a") as f:
        f.write(
            '\nload("@bazel_tools//tools/build_defs/repo:http.bzl", "http_archive")\n\n'
            "http_archive(\n"
            '    name = "fetched",\n'
            f'    urls = ["{url}"],\n'
            f'    sha256 = "{sha256}",\n'
            '    strip_prefix = "fetched",\n'
            ")\n"
        )
    (workspace / "asset").mkdir()
    (workspace / "asset" / "BUILD").write_text(
        "genrule(\n"
        '    name = "uses_fetched",\n'
        '    srcs = ["@fetched//:hello.txt"],\n'
        '    outs = ["uses_fetched.txt"],\n'
        '    cmd = "cat $< > $@",\n'
        ")\n"
    )


async def fetch_rows(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch("SELECT * FROM asset_fetches ORDER BY id")
    finally:
        await conn.close()


def test_bazel_fetches_http_archive_through_remote_asset_api(
    bazel_exe,  # noqa: F811
    cluster,  # noqa: F811
    postgres_admin_url,
    tmp_path,
):
    body = archive()
    with AssetHttpServer(files={"/fetched.tar.gz": body}) as http:
        bazel = Bazel(bazel_exe, copy_tree(tmp_path / "bazel"), tmp_path)
        add_http_archive(
            bazel.workspace, http.url("/fetched.tar.gz"), hashlib.sha256(body).hexdigest()
        )
        endpoint = f"grpc://127.0.0.1:{cluster.port}"
        flags = [
            f"--experimental_remote_downloader={endpoint}",
            f"--remote_cache={endpoint}",
            "--repository_cache=",  # every fetch goes to the downloader
            "--remote_timeout=120",
        ]
        try:
            first = bazel.run("build", *flags, "//asset:uses_fetched")
            assert first.returncode == 0, first.describe() + cluster.logs()
            output = bazel.bazel_bin(*flags) / "asset" / "uses_fetched.txt"
            assert output.read_bytes() == HELLO
            seen = http.requests_for("/fetched.tar.gz")
            assert seen, "the archive was never downloaded"
            assert all(r.user_agent.startswith("ExpBuild-remote-asset/") for r in seen), [
                r.user_agent for r in seen
            ]

            clean = bazel.run("clean", "--expunge")
            assert clean.returncode == 0, clean.describe()
            second = bazel.run("build", *flags, "//asset:uses_fetched")
            assert second.returncode == 0, second.describe() + cluster.logs()
            assert output.read_bytes() == HELLO
            assert len(http.requests_for("/fetched.tar.gz")) == len(seen), "fetched twice"
        finally:
            bazel.shutdown()

    rows = asyncio.run(fetch_rows(with_database(postgres_admin_url, cluster.database)))
    assert [r["outcome"] for r in rows] == ["downloaded", "cached"], rows
    for row in rows:
        assert row["uris"] == [http.url("/fetched.tar.gz")]
        assert row["requested_by"].startswith(("ipv4:127.0.0.1:", "ipv6:[::1]:"))
        assert row["tool"] and row["tool"].startswith("bazel"), row["tool"]
