"""Remote Asset API (Fetch, Push) against a real server, real Postgres and a real HTTP
server on 127.0.0.1: downloads verified against checksum.sri and bounded in size, answers
from pushed or earlier-fetched assets without a download, failures in the response status
with nothing left behind, and every fetch recorded in `asset_fetches`."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import replace

import asyncpg
import grpc
import pytest
from google.rpc import code_pb2

from expbuild.client.cas import CasClient
from expbuild.client.tree import serialize
from expbuild.config import AssetSettings
from expbuild.digest import Digest, digest_of
from expbuild.proto import remote_asset_pb2 as ra_pb2
from expbuild.proto import remote_asset_pb2_grpc as ra_grpc
from expbuild.proto import remote_execution_pb2 as re_pb2
from tests.asset_http import AssetHttpServer
from tests.serving import running_server, server_settings

pytestmark = pytest.mark.e2e

ARCHIVE = b"pretend this is a tarball\n" * 1000
MAX_DOWNLOAD = 64 * 1024


def sri(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}-{base64.b64encode(hashlib.new(algorithm, data).digest()).decode()}"


def checksum(data: bytes) -> ra_pb2.Qualifier:
    return ra_pb2.Qualifier(name="checksum.sri", value=sri(data))


@pytest.fixture
def http():
    with AssetHttpServer(
        files={"/archive.tar.gz": ARCHIVE, "/big": b"x" * (MAX_DOWNLOAD + 1)}
    ) as server:
        yield server


@pytest.fixture
async def server(database_url, tmp_path):
    settings = server_settings(tmp_path / "cas")
    settings = replace(settings, asset=AssetSettings(max_download_size=MAX_DOWNLOAD))
    async with running_server(settings, database_url) as app:
        yield app


async def fetches(database_url) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch("SELECT * FROM asset_fetches ORDER BY id")
    finally:
        await conn.close()


def tool_metadata(invocation: str):
    metadata = re_pb2.RequestMetadata(
        tool_details=re_pb2.ToolDetails(tool_name="asset-test", tool_version="1.0"),
        tool_invocation_id=invocation,
    )
    return (("build.bazel.remote.execution.v2.requestmetadata-bin", metadata.SerializeToString()),)


def temp_files(server) -> list:
    return [p for p in server.store.tmp_dir.iterdir() if p.name.startswith("asset-")]


async def test_fetch_blob_downloads_verifies_and_records(server, channel, http, database_url):
    fetch = ra_grpc.FetchStub(channel)
    reply = await fetch.FetchBlob(
        ra_pb2.FetchBlobRequest(uris=[http.url("/archive.tar.gz")], qualifiers=[checksum(ARCHIVE)]),
        metadata=tool_metadata("inv-1"),
    )
    assert reply.status.code == code_pb2.OK, reply.status.message
    assert Digest.from_proto(reply.blob_digest) == digest_of(ARCHIVE)
    assert reply.uri == http.url("/archive.tar.gz")
    assert reply.digest_function == re_pb2.DigestFunction.SHA256
    assert await CasClient(channel).read(digest_of(ARCHIVE)) == ARCHIVE
    [seen] = http.requests_for("/archive.tar.gz")
    assert seen.user_agent.startswith("ExpBuild-remote-asset/")

    [row] = await fetches(database_url)
    assert row["outcome"] == "downloaded"
    assert row["uri"] == http.url("/archive.tar.gz")
    assert row["digest"] == str(digest_of(ARCHIVE))
    assert row["bytes_downloaded"] == len(ARCHIVE)
    assert json.loads(row["qualifiers"]) == {"checksum.sri": sri(ARCHIVE)}
    assert row["requested_by"].startswith("ipv4:127.0.0.1:")
    assert (row["tool"], row["tool_invocation_id"]) == ("asset-test 1.0", "inv-1")
    assert temp_files(server) == []


async def test_second_fetch_is_answered_from_the_cas(server, channel, http, database_url):
    fetch = ra_grpc.FetchStub(channel)
    request = ra_pb2.FetchBlobRequest(
        uris=[http.url("/archive.tar.gz")], qualifiers=[checksum(ARCHIVE)]
    )
    first = await fetch.FetchBlob(request)
    second = await fetch.FetchBlob(request)
    # Another URI, same checksum: the checksum names the content, whatever the URI.
    mirror = await fetch.FetchBlob(
        ra_pb2.FetchBlobRequest(
            uris=["http://mirror.invalid/archive.tar.gz"], qualifiers=[checksum(ARCHIVE)]
        )
    )
    assert first.blob_digest == second.blob_digest == mirror.blob_digest
    assert mirror.status.code == code_pb2.OK, mirror.status.message
    assert len(http.requests_for("/archive.tar.gz")) == 1
    assert [r["outcome"] for r in await fetches(database_url)] == [
        "downloaded",
        "cached",
        "cached",
    ]


async def test_fetch_without_checksum_is_keyed_by_uri(server, channel, http):
    fetch = ra_grpc.FetchStub(channel)
    request = ra_pb2.FetchBlobRequest(uris=[http.url("/archive.tar.gz")])
    assert (await fetch.FetchBlob(request)).status.code == code_pb2.OK
    assert (await fetch.FetchBlob(request)).status.code == code_pb2.OK
    assert len(http.requests_for("/archive.tar.gz")) == 1


async def test_checksum_mismatch_stores_nothing(server, channel, http, database_url):
    fetch = ra_grpc.FetchStub(channel)
    reply = await fetch.FetchBlob(
        ra_pb2.FetchBlobRequest(
            uris=[http.url("/archive.tar.gz")], qualifiers=[checksum(b"something else")]
        )
    )
    assert reply.status.code == code_pb2.NOT_FOUND
    assert "checksum.sri asks for" in reply.status.message
    assert not await server.store.has(digest_of(ARCHIVE))
    assert temp_files(server) == []
    [row] = await fetches(database_url)
    assert row["outcome"] == "failed" and "checksum.sri" in row["error"]
    # Nothing was recorded as an asset: the same URI without a checksum downloads again.
    again = await fetch.FetchBlob(ra_pb2.FetchBlobRequest(uris=[http.url("/archive.tar.gz")]))
    assert again.status.code == code_pb2.OK
    assert len(http.requests_for("/archive.tar.gz")) == 2


async def test_other_sri_algorithms_are_checked(server, channel, http):
    fetch = ra_grpc.FetchStub(channel)
    good = ra_pb2.Qualifier(name="checksum.sri", value=sri(ARCHIVE, "sha512"))
    reply = await fetch.FetchBlob(
        ra_pb2.FetchBlobRequest(uris=[http.url("/archive.tar.gz")], qualifiers=[good])
    )
    assert reply.status.code == code_pb2.OK, reply.status.message
    bad = ra_pb2.Qualifier(name="checksum.sri", value=sri(b"nope", "sha384"))
    reply = await fetch.FetchBlob(
        ra_pb2.FetchBlobRequest(uris=[http.url("/archive.tar.gz")], qualifiers=[bad])
    )
    assert reply.status.code == code_pb2.NOT_FOUND


async def test_download_over_the_size_bound_is_refused(server, channel, http):
    reply = await ra_grpc.FetchStub(channel).FetchBlob(
        ra_pb2.FetchBlobRequest(uris=[http.url("/big")])
    )
    assert reply.status.code == code_pb2.RESOURCE_EXHAUSTED
    assert "max_download_size" in reply.status.message
    assert temp_files(server) == []


async def test_uris_are_tried_in_order(server, channel, http):
    reply = await ra_grpc.FetchStub(channel).FetchBlob(
        ra_pb2.FetchBlobRequest(
            uris=[http.url("/gone"), "ftp://example.invalid/x", http.url("/archive.tar.gz")],
            qualifiers=[checksum(ARCHIVE)],
        )
    )
    assert reply.status.code == code_pb2.OK, reply.status.message
    assert reply.uri == http.url("/archive.tar.gz")


async def test_every_uri_failing_says_why_for_each(server, channel, http, database_url):
    reply = await ra_grpc.FetchStub(channel).FetchBlob(
        ra_pb2.FetchBlobRequest(uris=[http.url("/gone"), "ftp://example.invalid/x"])
    )
    assert reply.status.code != code_pb2.OK
    assert "HTTP 404" in reply.status.message and "'ftp'" in reply.status.message
    [row] = await fetches(database_url)
    assert row["outcome"] == "failed"


async def test_http_header_qualifier_is_sent_and_never_stored(server, channel, http, database_url):
    header = ra_pb2.Qualifier(name="http_header:Authorization", value="Bearer s3cret")
    reply = await ra_grpc.FetchStub(channel).FetchBlob(
        ra_pb2.FetchBlobRequest(uris=[http.url("/archive.tar.gz")], qualifiers=[header])
    )
    assert reply.status.code == code_pb2.OK, reply.status.message
    [seen] = http.requests_for("/archive.tar.gz")
    assert seen.headers.get("Authorization") == "Bearer s3cret"
    conn = await asyncpg.connect(database_url)
    try:
        dump = str(await conn.fetch("SELECT * FROM assets")) + str(
            await conn.fetch("SELECT * FROM asset_fetches")
        )
    finally:
        await conn.close()
    assert "s3cret" not in dump


@pytest.mark.parametrize(
    ("uris", "qualifiers", "needle"),
    [
        ([], [], "uris is empty"),
        (["http://x.invalid/a"], [("resource_type", "application/x-git")], "not supported"),
        (["http://x.invalid/a"], [("checksum.sri", "md5-AAAA")], "algorithm"),
        (["http://x.invalid/a"], [("checksum.sri", "sha256-!!")], "not base64"),
        (["http://x.invalid/a"], [("checksum.sri", "sha256-AAAA")], "32 bytes"),
        (
            ["http://x.invalid/a"],
            [("bazel.canonical_id", "a"), ("bazel.canonical_id", "b")],
            "given twice",
        ),
    ],
)
async def test_malformed_fetch_is_invalid_argument(server, channel, uris, qualifiers, needle):
    request = ra_pb2.FetchBlobRequest(
        uris=uris, qualifiers=[ra_pb2.Qualifier(name=n, value=v) for n, v in qualifiers]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ra_grpc.FetchStub(channel).FetchBlob(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in caught.value.details()


async def test_pushed_blob_answers_fetch_without_download(server, channel, http):
    content = b"pushed content\n"
    await CasClient(channel).upload({digest_of(content): content})
    uri = http.url("/never-served")
    canonical = ra_pb2.Qualifier(name="bazel.canonical_id", value="v1")
    await ra_grpc.PushStub(channel).PushBlob(
        ra_pb2.PushBlobRequest(
            uris=[uri], qualifiers=[canonical], blob_digest=digest_of(content).to_proto()
        )
    )
    fetch = ra_grpc.FetchStub(channel)
    reply = await fetch.FetchBlob(ra_pb2.FetchBlobRequest(uris=[uri], qualifiers=[canonical]))
    assert reply.status.code == code_pb2.OK, reply.status.message
    assert Digest.from_proto(reply.blob_digest) == digest_of(content)
    assert http.requests == []
    # Other qualifiers are another asset.
    other = ra_pb2.Qualifier(name="bazel.canonical_id", value="v2")
    reply = await fetch.FetchBlob(ra_pb2.FetchBlobRequest(uris=[uri], qualifiers=[other]))
    assert reply.status.code == code_pb2.NOT_FOUND


async def test_push_of_content_missing_from_the_cas_is_refused(server, channel):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ra_grpc.PushStub(channel).PushBlob(
            ra_pb2.PushBlobRequest(
                uris=["http://x.invalid/a"], blob_digest=digest_of(b"never uploaded").to_proto()
            )
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not in the CAS" in caught.value.details()


async def test_push_and_fetch_directory(server, channel):
    leaf = b"leaf\n"
    root = re_pb2.Directory(
        files=[re_pb2.FileNode(name="leaf.txt", digest=digest_of(leaf).to_proto())]
    )
    await CasClient(channel).upload(
        {digest_of(leaf): leaf, digest_of(serialize(root)): serialize(root)}
    )
    uri = "https://example.invalid/tree.tar.gz"
    await ra_grpc.PushStub(channel).PushDirectory(
        ra_pb2.PushDirectoryRequest(
            uris=[uri], root_directory_digest=digest_of(serialize(root)).to_proto()
        )
    )
    fetch = ra_grpc.FetchStub(channel)
    reply = await fetch.FetchDirectory(ra_pb2.FetchDirectoryRequest(uris=[uri]))
    assert reply.status.code == code_pb2.OK, reply.status.message
    assert Digest.from_proto(reply.root_directory_digest) == digest_of(serialize(root))
    # A directory nobody pushed is not downloaded: the answer says so.
    unknown = await fetch.FetchDirectory(
        ra_pb2.FetchDirectoryRequest(uris=["https://example.invalid/other.tar.gz"])
    )
    assert unknown.status.code == code_pb2.NOT_FOUND
    assert "PushDirectory" in unknown.status.message


async def test_evicted_content_is_downloaded_again(server, channel, http):
    fetch = ra_grpc.FetchStub(channel)
    request = ra_pb2.FetchBlobRequest(
        uris=[http.url("/archive.tar.gz")], qualifiers=[checksum(ARCHIVE)]
    )
    assert (await fetch.FetchBlob(request)).status.code == code_pb2.OK
    server.store.path_of(digest_of(ARCHIVE)).unlink()  # what eviction does
    reply = await fetch.FetchBlob(request)
    assert reply.status.code == code_pb2.OK, reply.status.message
    assert len(http.requests_for("/archive.tar.gz")) == 2
    assert await server.store.has(digest_of(ARCHIVE))


async def test_caller_without_download_right_gets_only_known_assets(pool, tmp_path):
    """The domain rule behind the scopes: a read-only caller is answered from known assets,
    and told PERMISSION_DENIED (in the status) instead of causing a download."""
    from expbuild.assets.catalog import BLOB, AssetCatalog, Caller, FetchRequest
    from expbuild.assets.qualifiers import parse_qualifiers
    from expbuild.cas.store import FileStore
    from expbuild.errors import PermissionDenied

    store = FileStore(tmp_path / "cas", fsync=False)
    catalog = AssetCatalog(pool, store, AssetSettings())
    content = b"known\n"
    await store.put(digest_of(content), content)
    no_qualifiers = parse_qualifiers([])
    await catalog.push(
        "", BLOB, ["http://x.invalid/known"], no_qualifiers, digest_of(content), None
    )
    reader = Caller("reader", may_download=False)

    known = await catalog.fetch(
        FetchRequest("", BLOB, ["http://x.invalid/known"], no_qualifiers), reader
    )
    assert known.digest == digest_of(content) and not known.downloaded
    with pytest.raises(PermissionDenied, match="cas:write"):
        await catalog.fetch(FetchRequest("", BLOB, ["http://x.invalid/new"], no_qualifiers), reader)


async def test_scopes_with_auth_on(database_url, tmp_path, http):
    """cas:read may fetch what is known but not cause a download; cas:write may; Push needs
    cas:write; requested_by is the token's name."""
    from tests.secured import channel as secured_channel
    from tests.secured import make_token, secured_settings

    settings = secured_settings(tmp_path / "cas")
    async with running_server(settings, database_url) as app:
        reader = await make_token(app.pool, "reader", "cas:read")
        writer = await make_token(app.pool, "writer", "cas:read", "cas:write")
        request = ra_pb2.FetchBlobRequest(
            uris=[http.url("/archive.tar.gz")], qualifiers=[checksum(ARCHIVE)]
        )
        async with secured_channel(app, reader) as ch:
            denied = await ra_grpc.FetchStub(ch).FetchBlob(request)
            assert denied.status.code == code_pb2.PERMISSION_DENIED, denied.status
            assert "cas:write" in denied.status.message
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await ra_grpc.PushStub(ch).PushBlob(
                    ra_pb2.PushBlobRequest(
                        uris=["http://x.invalid/a"], blob_digest=digest_of(ARCHIVE).to_proto()
                    )
                )
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert http.requests == []
        async with secured_channel(app, writer) as ch:
            fetched = await ra_grpc.FetchStub(ch).FetchBlob(request)
            assert fetched.status.code == code_pb2.OK, fetched.status
        async with secured_channel(app, reader) as ch:
            cached = await ra_grpc.FetchStub(ch).FetchBlob(request)
            assert cached.status.code == code_pb2.OK, cached.status
        rows = await fetches(database_url)
        assert [(r["requested_by"], r["outcome"]) for r in rows] == [
            ("reader", "failed"),
            ("writer", "downloaded"),
            ("reader", "cached"),
        ]


async def test_v2_10_asset_digest_function_other_than_sha256_is_refused(server, channel):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ra_grpc.FetchStub(channel).FetchBlob(
            ra_pb2.FetchBlobRequest(
                uris=["http://x.invalid/a"], digest_function=re_pb2.DigestFunction.BLAKE3
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "BLAKE3" in caught.value.details()


async def test_push_under_a_wrong_checksum_is_refused(server, channel, http):
    """A blob pushed under checksum.sri answers every fetch with that checksum, so the
    push is checked; a wrong one could otherwise hand anyone's download other bytes."""
    content = b"honest bytes\n"
    await CasClient(channel).upload({digest_of(content): content})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ra_grpc.PushStub(channel).PushBlob(
            ra_pb2.PushBlobRequest(
                uris=["http://x.invalid/a"],
                qualifiers=[checksum(ARCHIVE)],
                blob_digest=digest_of(content).to_proto(),
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not match" in caught.value.details()
    # So a fetch with that checksum still downloads the real content.
    reply = await ra_grpc.FetchStub(channel).FetchBlob(
        ra_pb2.FetchBlobRequest(uris=[http.url("/archive.tar.gz")], qualifiers=[checksum(ARCHIVE)])
    )
    assert Digest.from_proto(reply.blob_digest) == digest_of(ARCHIVE)


async def test_redirects_keep_headers_on_the_same_host_only_and_stay_http(server, channel):
    header = ra_pb2.Qualifier(name="http_header:Authorization", value="Bearer s3cret")
    with AssetHttpServer(files={"/real": ARCHIVE}) as other:
        with AssetHttpServer(
            files={"/real": ARCHIVE},
            redirects={
                "/same": "/real",
                "/away": other.url("/real"),
                "/ftp": "ftp://127.0.0.1/real",
            },
        ) as http:
            fetch = ra_grpc.FetchStub(channel)
            for path in ("/same", "/away"):
                reply = await fetch.FetchBlob(
                    ra_pb2.FetchBlobRequest(uris=[http.url(path)], qualifiers=[header])
                )
                assert reply.status.code == code_pb2.OK, reply.status
            ftp = await fetch.FetchBlob(ra_pb2.FetchBlobRequest(uris=[http.url("/ftp")]))
            [same] = http.requests_for("/real")
    assert same.headers.get("Authorization") == "Bearer s3cret"
    [away] = other.requests_for("/real")
    assert "Authorization" not in away.headers
    assert ftp.status.code == code_pb2.UNAVAILABLE and "not http or https" in ftp.status.message
