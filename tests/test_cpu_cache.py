"""fastrnn._cpu_cache: the L2 size the small-batch split rules read."""
import pytest

from fastrnn import _cpu_cache


@pytest.mark.parametrize("text,size", [("2048K", 2 << 20), ("1M", 1 << 20), ("512K\n", 512 << 10),
                                       ("65536", 65536), ("", 0), ("big", 0), ("K", 0)])
def test_sizes_as_sysfs_writes_them(text, size):
    assert _cpu_cache._parse_size(text) == size


def test_the_environment_overrides_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.setattr(_cpu_cache, "_l2", None)
    monkeypatch.setenv("FASTRNN_L2_BYTES", "1536K")
    assert _cpu_cache.l2_bytes() == 1536 << 10
    monkeypatch.setattr(_cpu_cache, "_l2", None)
    monkeypatch.setenv("FASTRNN_L2_BYTES", "lots")
    with pytest.raises(ValueError, match="FASTRNN_L2_BYTES.*'lots'"):
        _cpu_cache.l2_bytes()


def test_an_unreadable_sysfs_means_unknown(monkeypatch, tmp_path):
    monkeypatch.setattr(_cpu_cache, "_SYSFS", str(tmp_path / "absent"))
    assert _cpu_cache._read_sysfs() == 0
    index = tmp_path / "index2"
    index.mkdir()
    (index / "level").write_text("2\n")
    (index / "type").write_text("Unified\n")
    (index / "size").write_text("2048K\n")
    monkeypatch.setattr(_cpu_cache, "_SYSFS", str(tmp_path))
    assert _cpu_cache._read_sysfs() == 2 << 20


@pytest.mark.parametrize("text,count", [("0", 1), ("0-1", 2), ("0-1,4", 3), ("0,2,4-7", 6),
                                        ("", 0), ("x", 0)])
def test_cpu_lists_as_sysfs_writes_them(text, count):
    assert _cpu_cache._count_cpus(text) == count


def test_an_l2_shared_by_smt_siblings_is_theirs_in_equal_parts(monkeypatch, tmp_path):
    index = tmp_path / "index2"
    index.mkdir()
    for name, text in (("level", "2"), ("type", "Unified"), ("size", "2048K"),
                       ("shared_cpu_list", "0,64")):
        (index / name).write_text(text + "\n")
    monkeypatch.setattr(_cpu_cache, "_SYSFS", str(tmp_path))
    assert _cpu_cache._read_sysfs() == 1 << 20


@pytest.mark.parametrize("value,ok", [(None, True), ("0", True), ("1", True), ("false", False),
                                      ("", False), (" 0", False), ("1 ", False)])
def test_fastrnn_amx_is_0_or_1(value, ok, monkeypatch):
    if value is None:
        monkeypatch.delenv("FASTRNN_AMX", raising=False)
    else:
        monkeypatch.setenv("FASTRNN_AMX", value)
    if ok:
        _cpu_cache.check_amx_setting()
    else:
        with pytest.raises(ValueError, match="FASTRNN_AMX.*'0'"):
            _cpu_cache.check_amx_setting()
