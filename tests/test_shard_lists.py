"""Shard list files: ``pipe:`` lines run only when asked for, and a list that includes itself
(directly or through other lists) is one clear error naming the chain of files.

Lists are read for real: local files, symlinks, and fetched lists through fsspec's in-memory
file system (the same ``fsspec.open`` path an ``s3://`` or ``https://`` list takes).
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import fsspec
import pytest
from megaclass.data.config import DataConfig
from megaclass.data.shards import ShardSpecError, expand_shards, open_shard
from megaclass.pipelines.config import load_config


def _write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def memory_dir():
    """A fresh folder on fsspec's in-memory file system, removed afterwards."""
    root = f"memory://megaclass-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _put(url: str, *lines: str) -> str:
    with fsspec.open(url, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return url


# ------------------------------------------------------------------ pipe: in list files


def test_pipe_line_in_a_local_list_is_refused_by_default_naming_file_line_and_option(tmp_path):
    lst = _write(tmp_path / "list.txt", "# shards", "/x/0.tar", "", "pipe:curl -s http://h/1.tar")
    with pytest.raises(ShardSpecError) as e:
        expand_shards(str(lst))
    msg = str(e.value)
    assert f"{lst}, line 4" in msg
    assert "'pipe:curl -s http://h/1.tar'" in msg
    assert "data.allow_pipe_in_lists=true" in msg


def test_pipe_line_in_a_list_is_allowed_with_the_option_and_runs(tmp_path):
    shard = tmp_path / "a.tar"
    shard.write_bytes(b"tar bytes")
    lst = _write(tmp_path / "list.txt", "/x/0.tar", f"pipe:cat {shard}")
    urls = expand_shards(str(lst), allow_pipe_in_lists=True)
    assert urls == ["/x/0.tar", f"pipe:cat {shard}"]
    with open_shard(urls[1]) as f:  # the command really is what runs
        assert f.read() == b"tar bytes"


def test_pipe_in_the_spec_itself_stays_allowed(tmp_path):
    lst = _write(tmp_path / "list.txt", "/x/{0..1}.tar")
    assert expand_shards(f"pipe:cat /y/z.tar::{lst}") == [
        "pipe:cat /y/z.tar",
        "/x/0.tar",
        "/x/1.tar",
    ]


def test_pipe_hidden_in_a_brace_pattern_of_a_list_is_refused(tmp_path):
    lst = _write(tmp_path / "list.txt", "{/x/0.tar,pipe:sh -c id}")
    with pytest.raises(ShardSpecError, match=re.escape(f"{lst}, line 1: 'pipe:sh -c id'")):
        expand_shards(str(lst))


def test_pipe_in_a_nested_list_is_refused_naming_the_inner_file(tmp_path):
    inner = _write(tmp_path / "inner.txt", "/y/0.tar", "pipe:cat /y/1.tar")
    outer = _write(tmp_path / "outer.txt", "/x/0.tar", str(inner))
    with pytest.raises(ShardSpecError, match=re.escape(f"{inner}, line 2: 'pipe:cat /y/1.tar'")):
        expand_shards(str(outer))
    assert expand_shards(str(outer), allow_pipe_in_lists=True) == [
        "/x/0.tar",
        "/y/0.tar",
        "pipe:cat /y/1.tar",
    ]


def test_pipe_line_in_a_fetched_list_is_refused(memory_dir):
    url = _put(f"{memory_dir}/list.txt", "s3://b/0.tar", "pipe:aws s3 cp s3://b/1.tar -")
    with pytest.raises(ShardSpecError, match=re.escape(f"{url}, line 2")):
        expand_shards(url)
    assert expand_shards(url, allow_pipe_in_lists=True)[1] == "pipe:aws s3 cp s3://b/1.tar -"


def test_data_config_option_defaults_to_refusing_and_loads_from_overrides():
    assert DataConfig().allow_pipe_in_lists is False
    assert load_config(None, []).data.allow_pipe_in_lists is False
    assert load_config(None, ["data.allow_pipe_in_lists=true"]).data.allow_pipe_in_lists is True


# ------------------------------------------------------------------ cycles


def test_list_including_itself_is_a_cycle_error(tmp_path):
    a = _write(tmp_path / "a.txt", "/x/0.tar", str(tmp_path / "a.txt"))
    with pytest.raises(ShardSpecError) as e:
        expand_shards(str(a))
    assert str(e.value) == (
        f"shard list cycle: {a} -> {a} (a list file includes itself; remove line 2 of {a})"
    )


def test_cycle_through_other_lists_names_the_whole_chain(tmp_path):
    a, b, c = (tmp_path / f"{n}.txt" for n in "abc")
    _write(a, "/x/a.tar", str(b))
    _write(b, "/x/b.tar", str(c))
    _write(c, "# back to the start", str(a))
    with pytest.raises(ShardSpecError) as e:
        expand_shards(f"/x/first.tar::{a}")
    assert str(e.value) == (
        f"shard list cycle: {a} -> {b} -> {c} -> {a} "
        f"(a list file includes itself through other lists; remove line 2 of {c})"
    )


def test_cycle_through_another_spelling_or_a_symlink_is_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.txt").symlink_to(tmp_path / "sub" / "real.txt")
    _write(tmp_path / "sub" / "real.txt", "/x/0.tar", "./link.txt")
    with pytest.raises(ShardSpecError, match=r"shard list cycle: sub/real\.txt -> \./link\.txt"):
        expand_shards("sub/real.txt")


def test_cycle_in_fetched_lists_is_found(memory_dir):
    a, b = f"{memory_dir}/a.txt", f"{memory_dir}/b.txt"
    _put(a, "s3://b/0.tar", b)
    _put(b, a)
    with pytest.raises(ShardSpecError, match=re.escape(f"shard list cycle: {a} -> {b} -> {a}")):
        expand_shards(a)


def test_a_list_named_twice_without_a_cycle_is_fine(tmp_path):
    shared = _write(tmp_path / "shared.txt", "/s/{0..1}.tar")
    top = _write(tmp_path / "top.txt", str(shared), "/t/0.tar", str(shared))
    assert expand_shards(f"{top}::{shared}") == [
        "/s/0.tar", "/s/1.tar", "/t/0.tar", "/s/0.tar", "/s/1.tar", "/s/0.tar", "/s/1.tar",
    ]  # fmt: skip
