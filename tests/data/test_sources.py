"""Data files by path or URL (tasks/data/sources.py): checked once, identified, fetched at most
once."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest

from trainflow.tasks.cache.keys import file_digest
from trainflow.tasks.data.sources import DataFile
from trainflow.tasks.errors import InputError


@pytest.fixture
def remote() -> str:
    base = f"memory://sources-{uuid.uuid4().hex}"
    fs, path = fsspec.core.url_to_fs(base)
    fs.pipe_file(f"{path}/a.csv", b"x,y\n1,2\n")
    fs.pipe_file(f"{path}/same.csv", b"x,y\n1,2\n")
    yield base
    fs.rm(path, recursive=True)


def test_a_local_file_is_known_by_its_content_whatever_is_asked(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"x,y\n1,2\n")
    with DataFile(str(path)) as file:
        assert (
            file.identity("content") == file.identity("version") == {"content": file_digest(path)}
        )
        assert file.local_path() == str(path)


def test_a_remote_file_by_content_equals_a_local_copy_and_is_fetched_once(tmp_path, remote):
    (tmp_path / "a.csv").write_bytes(b"x,y\n1,2\n")
    with DataFile(f"{remote}/a.csv") as file, DataFile(str(tmp_path / "a.csv")) as local:
        assert file.identity("content") == local.identity("content")
        copy = file.local_path()
        assert file.local_path() == copy and Path(copy).read_bytes() == b"x,y\n1,2\n"
    assert not Path(copy).exists()  # the download goes with the context


def test_version_identity_prefers_the_stores_version_fields(remote):
    with DataFile(f"{remote}/a.csv") as file:
        file.info = {**file.info, "ETag": '"abc"', "LastModified": "yesterday"}
        assert file.identity("version") == {"version": 'ETag="abc"', "url": f"{remote}/a.csv"}
        file.info = {**file.info, "VersionId": "v7"}
        assert file.identity("version")["version"] == "VersionId=v7"
        assert file._copy is None  # nothing was downloaded to know that


def test_without_version_metadata_the_version_identity_is_the_content(remote):
    with DataFile(f"{remote}/a.csv") as file:
        file.info = {"name": file.path, "size": file.size, "type": "file"}
        assert "content" in file.identity("version")


@pytest.mark.parametrize(
    ("name", "message"),
    [("missing.csv", "not found"), (".", "is a directory"), ("empty.csv", "file is empty")],
)
def test_unusable_files_are_one_line_errors_naming_the_file(tmp_path, name, message):
    (tmp_path / "empty.csv").write_bytes(b"")
    url = str(tmp_path / name)
    with pytest.raises(InputError, match=f"data file '{url}': {message}"):
        DataFile(url)
