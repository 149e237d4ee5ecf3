"""The Files service's hand-encoded bulk messages are exactly protobuf's bytes.

The agent passes Upload's data and Download's chunks without protobuf message objects (each
copy of a payload costs ~0.2 s per 50 MiB under TCG, agent/server.py); a wrong length prefix
would corrupt every copy, so the encoding is compared with protobuf's own at the varint
boundaries.
"""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError

from boxlite_core.agent.server import _download_chunk, _upload_chunk
from boxlite_core.proto import agent_pb2 as pb

SIZES = [0, 1, 127, 128, 16383, 16384, 2_097_151, 2_097_152, 1024 * 1024]


@pytest.mark.parametrize("size", SIZES)
def test_download_chunk_is_protobufs_encoding(size):
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    assert _download_chunk(data) == pb.DownloadChunk(data=data).SerializeToString()
    assert pb.DownloadChunk.FromString(_download_chunk(data)).data == data


@pytest.mark.parametrize("size", SIZES[1:])
def test_data_only_upload_chunk_is_read_in_place(size):
    data = b"\x12" * size  # payload bytes that look like the tag must not confuse it
    got = _upload_chunk(pb.UploadChunk(data=data).SerializeToString())
    assert isinstance(got, memoryview) and got == data


@pytest.mark.parametrize(
    "message",
    [
        pb.UploadChunk(),
        pb.UploadChunk(dest="/srv/x", manifest=b"dx\0fx/a"),
        pb.UploadChunk(target_dir="/srv/in", data=b"tar"),
        pb.UploadChunk(dest="/d", data=b"both"),
    ],
    ids=["empty", "dest+manifest", "target_dir+data", "dest+data"],
)
def test_other_upload_chunks_are_parsed(message):
    got = _upload_chunk(message.SerializeToString())
    assert isinstance(got, pb.UploadChunk) and got == message


def test_truncated_data_only_message_is_left_to_protobuf():
    raw = pb.UploadChunk(data=b"abcdef").SerializeToString()[:-2]
    with pytest.raises(DecodeError):
        _upload_chunk(raw)
