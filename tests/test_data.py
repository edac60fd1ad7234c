"""Data loaders on tiny files in the official formats; checksums, markers, downloads, MNIST-1D caching."""
from __future__ import annotations

import functools
import gzip
import http.server
import os
import pickle
import random
import re
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import batchgap.data as data
from batchgap.data import cifar, files, mnist, mnist1d
from batchgap.errors import UserError
from data_fixtures import (
    cifar_members,
    fake_cifar_arrays,
    fake_mnist1d_arrays,
    fake_mnist_arrays,
    idx_bytes,
    install_fake_data,
    py2_pickle,
    trust_files,
    write_fake_cifar10,
    write_fake_cifar100,
    write_fake_mnist,
    write_fake_mnist1d,
    write_gzip,
    write_tar_gz,
)

OLD_NS = 1_500_000_000 * 10**9  # a fixed past mtime (2017), so marker tests never depend on the clock


def flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def assert_images_equal(loaded: torch.Tensor, expected_uint8: np.ndarray) -> None:
    assert loaded.dtype == torch.float32
    assert 0.0 <= loaded.min() and loaded.max() <= 1.0
    assert np.array_equal(np.rint(loaded.numpy() * 255).astype(np.uint8), expected_uint8)


# --- data directory ------------------------------------------------------------------------------


def test_data_dir_argument_wins_over_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHGAP_DATA", str(tmp_path / "env"))
    assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


def test_data_dir_from_environment_then_default(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHGAP_DATA", str(tmp_path / "env"))
    assert data.resolve_data_dir() == tmp_path / "env"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BATCHGAP_DATA", "")
    assert data.resolve_data_dir() == tmp_path / "home" / ".cache" / "batchgap" / "data"
    monkeypatch.delenv("BATCHGAP_DATA")
    assert data.resolve_data_dir(None) == tmp_path / "home" / ".cache" / "batchgap" / "data"


# --- registry --------------------------------------------------------------------------------------


def test_registry_names_and_rows():
    assert set(data.DATASETS) == {"mnist1d", "mnist", "cifar10", "cifar100"}
    rows = {row.name: row for row in data.list_datasets()}
    assert rows.keys() == data.DATASETS.keys()
    assert rows["mnist1d"].needs_files is False and rows["cifar100"].needs_files is True
    assert all(row.description for row in rows.values())


@pytest.mark.parametrize("call", [data.load_dataset, data.download])
def test_unknown_dataset_is_a_user_error_listing_choices(call, tmp_path):
    with pytest.raises(UserError,
                       match=r"dataset: unknown value 'cifar'.*cifar10.*allowed: cifar10, cifar100, mnist, mnist1d"):
        call("cifar", tmp_path)


def test_mnist1d_needs_no_download(tmp_path):
    assert data.download("mnist1d", tmp_path) == []
    assert not any(tmp_path.iterdir())


# --- MNIST -----------------------------------------------------------------------------------------


def test_mnist_round_trip(tmp_path, monkeypatch):
    paths = write_fake_mnist(tmp_path, n_train=30, n_test=12, seed=3)
    assert [p.parent for p in paths] == [tmp_path / "mnist"] * 4
    trust_files(monkeypatch, paths)
    ds = data.load_dataset("mnist", tmp_path)
    a = fake_mnist_arrays(30, 12, seed=3)
    assert ds.train.x.shape == (30, 1, 28, 28) and ds.test.x.shape == (12, 1, 28, 28)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert_images_equal(ds.train.x, a.x_train)
    assert_images_equal(ds.test.x, a.x_test)
    assert ds.train.y.dtype == torch.int64 and torch.equal(ds.train.y, torch.from_numpy(a.y_train))
    assert torch.equal(ds.test.y, torch.from_numpy(a.y_test))
    assert ds.info["files"] == {p.name: files.md5sum(p) for p in paths}


def test_fake_images_carry_a_learnable_signal(tmp_path, monkeypatch):
    install_fake_data(monkeypatch, tmp_path, names=("mnist",), n_train=200, n_test=100)
    ds = data.load_dataset("mnist")  # via $BATCHGAP_DATA
    means = torch.stack([ds.train.x[ds.train.y == c].mean(0) for c in range(10)]).flatten(1)
    nearest = torch.cdist(ds.test.x.flatten(1), means).argmin(1)
    assert (nearest == ds.test.y).float().mean() > 0.9


def test_idx_parser_reads_big_endian_dims():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(mnist.parse_idx(idx_bytes(array, 2051), 2051, 3), array)
    with pytest.raises(mnist.IdxError, match="magic number 2049, expected 2051"):
        mnist.parse_idx(idx_bytes(array, 2049), 2051, 3)
    with pytest.raises(mnist.IdxError, match="23 data bytes"):
        mnist.parse_idx(idx_bytes(array, 2051)[:-1], 2051, 3)
    with pytest.raises(mnist.IdxError, match="header"):
        mnist.parse_idx(b"\x00\x00\x08", 2051, 3)


def test_mnist_missing_file_names_file_directory_and_remedy(tmp_path, monkeypatch):
    paths = write_fake_mnist(tmp_path, n_train=10, n_test=10)
    trust_files(monkeypatch, paths)
    paths[3].unlink()
    with pytest.raises(UserError) as e:
        data.load_dataset("mnist", tmp_path)
    message = str(e.value)
    assert "t10k-labels-idx1-ubyte.gz not found in " + str(tmp_path / "mnist") in message
    assert "batchgap data download mnist" in message and "--data-dir" in message and "BATCHGAP_DATA" in message
    assert "\n" not in message


def test_official_checksums_reject_fake_files(tmp_path):
    write_fake_mnist(tmp_path, n_train=10, n_test=10)
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte.gz is corrupt \(md5 [0-9a-f]{32}, expected f68b3c2d"):
        data.load_dataset("mnist", tmp_path)


def test_official_checksum_table():
    assert files.CHECKSUMS["cifar-10-python.tar.gz"] == "c58f30108f718f92721af3b95e74349a"
    assert files.CHECKSUMS["cifar-100-python.tar.gz"] == "eb9058c3a382ffc7106e4002c42a8d85"
    assert set(files.CHECKSUMS) == {
        *mnist.REMOTE.filenames, *cifar.CIFAR10.remote.filenames, *cifar.CIFAR100.remote.filenames
    }


def test_flipped_byte_fails_the_checksum(tmp_path, monkeypatch):
    paths = write_fake_mnist(tmp_path, n_train=10, n_test=10)
    trust_files(monkeypatch, paths)
    flip_byte(paths[0], 100)
    with pytest.raises(UserError, match=r"mnist/train-images-idx3-ubyte.gz is corrupt \(md5 .*re-download"):
        data.load_dataset("mnist", tmp_path)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-30]), "not a complete gzip file"),
        (lambda p: p.write_bytes(b"not gzip at all"), "not a complete gzip file"),
        (lambda p: write_gzip(p, idx_bytes(np.zeros((2, 28, 28), np.uint8), 2049)), "magic number 2049, expected 2051"),
        (lambda p: write_gzip(p, idx_bytes(np.zeros((2, 27, 28), np.uint8), 2051)), r"images are \(27, 28\)"),
        (lambda p: write_gzip(p, idx_bytes(np.zeros((9, 28, 28), np.uint8), 2051)), "10 labels for 9 images"),
    ],
)
def test_malformed_mnist_with_matching_checksum_is_corrupt(tmp_path, monkeypatch, damage, reason):
    paths = write_fake_mnist(tmp_path, n_train=10, n_test=10)
    damage(paths[0])
    trust_files(monkeypatch, paths)  # the checksum passes: the parser must catch it
    with pytest.raises(UserError, match=f"train-(images|labels)-idx.-ubyte.gz is corrupt .*{reason}"):
        data.load_dataset("mnist", tmp_path)


def test_labels_out_of_range_are_corrupt(tmp_path, monkeypatch):
    paths = write_fake_mnist(tmp_path, n_train=10, n_test=10)
    write_gzip(paths[3], idx_bytes(np.full(10, 10, np.uint8), 2049))
    trust_files(monkeypatch, paths)
    with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte.gz is corrupt \(label 10 outside 0..9\)"):
        data.load_dataset("mnist", tmp_path)


# --- CIFAR -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, writer, num_classes, n_train, n_test",
    [("cifar10", write_fake_cifar10, 10, 17, 6), ("cifar100", write_fake_cifar100, 100, 23, 9)],
)
def test_cifar_round_trip(tmp_path, monkeypatch, name, writer, num_classes, n_train, n_test):
    paths = writer(tmp_path, n_train=n_train, n_test=n_test, seed=5)
    assert [p.parent for p in paths] == [tmp_path / name]
    trust_files(monkeypatch, paths)
    ds = data.load_dataset(name, tmp_path)
    a = fake_cifar_arrays(num_classes, n_train, n_test, seed=5)
    assert ds.train.x.shape == (n_train, 3, 32, 32) and ds.test.x.shape == (n_test, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == num_classes
    assert_images_equal(ds.train.x, a.x_train)  # also checks the batches are concatenated in order 1..5
    assert_images_equal(ds.test.x, a.x_test)
    assert ds.train.y.dtype == torch.int64
    assert torch.equal(ds.train.y, torch.from_numpy(a.y_train)) and torch.equal(ds.test.y, torch.from_numpy(a.y_test))


def test_cifar_pixels_are_channel_major():
    """Row i of b"data" is 1024 red, 1024 green, 1024 blue values, each row-major over 32x32."""
    row = np.zeros((1, 3072), np.uint8)
    row[0, 1024 + 32 * 5 + 7] = 200  # green, y=5, x=7
    raw = pickle.dumps({b"data": row, b"labels": [3]}, protocol=2)
    images, labels = cifar.parse_batch(raw, b"labels", 10)
    assert images.shape == (1, 3, 32, 32) and images[0, 1, 5, 7] == 200 and images.sum() == 200
    assert labels.tolist() == [3] and labels.dtype == np.int64


def test_cifar_batches_pickled_by_python3_also_load():
    """Protocol 2 from Python 3 rebuilds bytes with _codecs.encode; the allowlist accepts that too."""
    images = np.arange(2 * 3072, dtype=np.uint64).reshape(2, 3072).astype(np.uint8)
    for raw in (pickle.dumps({b"data": images, b"labels": [0, 9]}, protocol=2),
                py2_pickle({b"data": images, b"labels": [0, 9]})):
        x, y = cifar.parse_batch(raw, b"labels", 10)
        assert np.array_equal(x.reshape(2, -1), images) and y.tolist() == [0, 9]
    assert b"_codecs" in pickle.dumps({b"data": images}, protocol=2) and b"_codecs" not in py2_pickle({b"data": images})


def test_cifar_unpickler_refuses_code(tmp_path, monkeypatch):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    path = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    write_tar_gz(path, {m: pickle.dumps(Evil()) for m in (*cifar.CIFAR10.train_members, *cifar.CIFAR10.test_members)})
    trust_files(monkeypatch, [path])
    with pytest.raises(UserError,
                       match=r"is corrupt \(cifar-10-batches-py/data_batch_1: pickle references (posix|nt).system"):
        data.load_dataset("cifar10", tmp_path)


def _cifar_members(**changes: bytes | None) -> dict[str, bytes]:
    """Members of a valid fake CIFAR-10 archive, with ``member=None`` removed and others replaced."""
    members = cifar_members(cifar.CIFAR10, fake_cifar_arrays(10, 10, 5))
    for short, payload in changes.items():
        name = f"cifar-10-batches-py/{short}"
        if payload is None:
            del members[name]
        else:
            members[name] = payload
    return members


def _batch(data_: np.ndarray, labels: list[int]) -> bytes:
    return pickle.dumps({b"data": data_, b"labels": labels})


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "not a complete tar.gz archive"),
        (lambda p: p.write_bytes(b"\x1f\x8b" + b"\x00" * 100), "not a complete tar.gz archive"),
        (lambda p: write_gzip(p, b"plain text, not a tar"), "not a complete tar.gz archive"),
        (lambda p: write_tar_gz(p, _cifar_members(test_batch=None)), "member cifar-10-batches-py/test_batch missing"),
        (lambda p: write_tar_gz(p, _cifar_members(data_batch_3=b"\x80\x02garbage")), "data_batch_3: unreadable pickle"),
        (lambda p: write_tar_gz(p, _cifar_members(data_batch_2=_batch(np.zeros((2, 3072), np.uint8), [1]))),
         r"data_batch_2: \(1,\) labels"),
        (lambda p: write_tar_gz(p, _cifar_members(data_batch_2=_batch(np.zeros((2, 3072), np.float32), [1, 2]))),
         "data is float32"),
        (lambda p: write_tar_gz(p, _cifar_members(data_batch_2=_batch(np.zeros((2, 3072), np.uint8), [1, 10]))),
         r"labels outside 0..9"),
        (lambda p: write_tar_gz(p, _cifar_members(data_batch_2=pickle.dumps([1, 2]))), "must be a dict"),
    ],
    ids=["truncated", "bad-gzip", "not-tar", "no-member", "bad-pickle", "label-count", "dtype", "label-range",
         "not-dict"],
)
def test_malformed_cifar_with_matching_checksum_is_corrupt(tmp_path, monkeypatch, damage, reason):
    (path,) = write_fake_cifar10(tmp_path, n_train=10, n_test=5)
    damage(path)
    trust_files(monkeypatch, [path])
    with pytest.raises(UserError) as e:
        data.load_dataset("cifar10", tmp_path)
    assert f"{path} is corrupt" in str(e.value) and "re-download" in str(e.value)
    assert re.search(reason, str(e.value)), str(e.value)


def test_cifar_checksum_mismatch_and_missing_archive(tmp_path):
    with pytest.raises(UserError, match=r"cifar-100-python.tar.gz not found in .*cifar100; "
                                        r"get it with `batchgap data download cifar100`"):
        data.load_dataset("cifar100", tmp_path)
    write_fake_cifar100(tmp_path, n_train=5, n_test=5)
    with pytest.raises(UserError, match=r"corrupt \(md5 [0-9a-f]{32}, expected eb9058c3a382ffc7106e4002c42a8d85\)"):
        data.load_dataset("cifar100", tmp_path)


# --- verification markers --------------------------------------------------------------------------


def count_md5(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = files.md5sum
    monkeypatch.setattr(files, "md5sum", lambda p: calls.append(p) or real(p))
    return calls


def test_marker_skips_the_hash_until_the_file_changes(tmp_path, monkeypatch):
    (path,) = write_fake_cifar10(tmp_path, n_train=5, n_test=5)
    trust_files(monkeypatch, [path])
    os.utime(path, ns=(OLD_NS, OLD_NS))
    calls = count_md5(monkeypatch)
    first = data.load_dataset("cifar10", tmp_path)
    assert calls == [path] and (path.parent / f".{path.name}.verified").is_file()
    second = data.load_dataset("cifar10", tmp_path)
    assert calls == [path] and torch.equal(first.train.x, second.train.x)  # no second hash
    flip_byte(path, 40)  # same size; then an mtime that differs, as any later write gives
    os.utime(path, ns=(OLD_NS + 10**9, OLD_NS + 10**9))
    with pytest.raises(UserError, match="corrupt .*md5"):
        data.load_dataset("cifar10", tmp_path)
    assert len(calls) == 2


def test_marker_is_tied_to_the_expected_checksum(tmp_path, monkeypatch):
    (path,) = write_fake_cifar10(tmp_path, n_train=5, n_test=5)
    os.utime(path, ns=(OLD_NS, OLD_NS))
    trust_files(monkeypatch, [path])
    files.verify(path, "cifar10")
    monkeypatch.setitem(files.CHECKSUMS, path.name, "0" * 32)  # a table change must not be masked by the marker
    with pytest.raises(UserError, match="expected 0000"):
        files.verify(path, "cifar10")


def test_no_marker_for_a_file_hashed_within_a_second_of_its_mtime(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(b"x")
    os.utime(path, ns=(OLD_NS, OLD_NS))
    files._write_marker(path, "abc", hashed_at_ns=OLD_NS + 10**6)
    assert not (tmp_path / f".{path.name}.verified").exists()
    files._write_marker(path, "abc", hashed_at_ns=OLD_NS + 2 * 10**9)
    assert (tmp_path / f".{path.name}.verified").exists()


# --- downloads against a local server ----------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        self.server.requests.append(self.path)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A directory served over HTTP on 127.0.0.1 (ephemeral port): (directory, base url, request log)."""
    root = tmp_path / "served"
    root.mkdir()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root))
    )
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/", server.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _serve_fake(root: Path, writer, monkeypatch, **sizes) -> list[Path]:
    """Write fake files under ``root/<name>/``, trust them, and return their paths."""
    paths = writer(root, **sizes)
    trust_files(monkeypatch, paths)
    return paths


def test_download_then_load_equals_served_data(tmp_path, monkeypatch, served):
    root, url, requests = served
    served_paths = _serve_fake(root, write_fake_mnist, monkeypatch, n_train=20, n_test=10)
    target = tmp_path / "data"
    got = data.download("mnist", target, base_url=url + "mnist")
    assert got == [target / "mnist" / p.name for p in served_paths]
    assert all(g.read_bytes() == p.read_bytes() for g, p in zip(got, served_paths))
    assert sorted(requests) == sorted(f"/mnist/{p.name}" for p in served_paths)
    loaded, original = data.load_dataset("mnist", target), data.load_dataset("mnist", root)
    assert torch.equal(loaded.train.x, original.train.x) and torch.equal(loaded.test.y, original.test.y)
    assert data.download("mnist", target, base_url=url + "mnist") == got
    assert len(requests) == 4  # files already present and verified are not fetched again


def test_load_with_download_fetches_missing_files(tmp_path, monkeypatch, served):
    root, url, requests = served
    _serve_fake(root, write_fake_cifar10, monkeypatch, n_train=10, n_test=5)
    monkeypatch.setattr(cifar, "CIFAR10",
                        replace(cifar.CIFAR10, remote=replace(cifar.CIFAR10.remote, base_url=url + "cifar10/")))
    ds = data.load_dataset("cifar10", tmp_path / "data", download=True)
    assert len(ds.train) == 10 and requests == ["/cifar10/cifar-10-python.tar.gz"]


def test_download_with_wrong_checksum_leaves_nothing(tmp_path, monkeypatch, served):
    root, url, _ = served
    (path,) = _serve_fake(root, write_fake_cifar100, monkeypatch, n_train=5, n_test=5)
    monkeypatch.setitem(files.CHECKSUMS, path.name, "f" * 32)
    target = tmp_path / "data"
    with pytest.raises(UserError,
                       match=r"cifar100: download of .* has md5 [0-9a-f]{32}, expected f{32}; nothing was saved"):
        data.download("cifar100", target, base_url=url + "cifar100/")
    assert list((target / "cifar100").iterdir()) == []


def test_download_of_a_missing_url_is_a_user_error(tmp_path, served):
    _, url, _ = served
    target = tmp_path / "data"
    with pytest.raises(UserError, match=r"cifar10: could not download "
                                        r"http://127.0.0.1:\d+/nowhere/cifar-10-python.tar.gz: HTTP 404"):
        data.download("cifar10", target, base_url=url + "nowhere")
    assert list((target / "cifar10").iterdir()) == []


def test_download_replaces_a_corrupt_file(tmp_path, monkeypatch, served):
    root, url, requests = served
    (src,) = _serve_fake(root, write_fake_cifar10, monkeypatch, n_train=5, n_test=5)
    dest = tmp_path / "data" / "cifar10" / src.name
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"half a file")
    data.download("cifar10", tmp_path / "data", base_url=url + "cifar10")
    assert dest.read_bytes() == src.read_bytes() and len(requests) == 1


# --- MNIST-1D ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist1d_first_load(tmp_path_factory):
    """One real generation (seconds), with the global RNG states around it recorded."""
    data_dir = tmp_path_factory.mktemp("mnist1d-data")
    np.random.seed(1234)
    random.seed(99)
    before = (np.random.get_state(), random.getstate())
    ds = data.load_dataset("mnist1d", data_dir)
    after = (np.random.get_state(), random.getstate())
    return data_dir, ds, before, after


def test_mnist1d_shapes_and_labels(mnist1d_first_load):
    _, ds, _, _ = mnist1d_first_load
    assert ds.train.x.shape == (4000, 40) and ds.test.x.shape == (1000, 40)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    assert ds.input_shape == (40,) and ds.num_classes == 10
    assert set(ds.train.y.tolist()) == set(range(10)) and set(ds.test.y.tolist()) == set(range(10))
    assert ds.info["args"]["seed"] == 42 and ds.info["args"]["num_samples"] == 5000


def test_mnist1d_leaves_global_rng_untouched(mnist1d_first_load):
    _, _, (np_before, py_before), (np_after, py_after) = mnist1d_first_load
    assert np_before[0] == np_after[0] and np.array_equal(np_before[1], np_after[1]) and np_before[2:] == np_after[2:]
    assert py_before == py_after


def test_mnist1d_rng_restored_even_when_generation_fails(tmp_path, monkeypatch):
    import mnist1d.data as source

    def failing(args):
        np.random.seed(0)
        random.seed(0)
        raise RuntimeError("boom")

    monkeypatch.setattr(source, "make_dataset", failing)
    np.random.seed(7)
    before = np.random.get_state()[1].copy(), random.getstate()
    with pytest.raises(RuntimeError, match="boom"):
        data.load_dataset("mnist1d", tmp_path)
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]


def test_mnist1d_cache_is_reused_and_identical(mnist1d_first_load, monkeypatch):
    import mnist1d.data as source

    data_dir, first, _, _ = mnist1d_first_load
    monkeypatch.setattr(source, "make_dataset", lambda *a, **k: pytest.fail("regenerated despite a valid cache"))
    second = data.load_dataset("mnist1d", data_dir)
    assert torch.equal(first.train.x, second.train.x) and torch.equal(first.train.y, second.train.y)
    assert torch.equal(first.test.x, second.test.x) and torch.equal(first.test.y, second.test.y)
    assert Path(second.info["cache"]) == data_dir / "mnist1d" / "mnist1d-default.npz"


def _fake_generator(calls: list):
    def make_dataset(args):
        calls.append(args.seed)
        a = fake_mnist1d_arrays(8, 4)
        return {"x": a.x_train.astype(np.float64), "y": a.y_train, "x_test": a.x_test, "y_test": a.y_test, "t": None}

    return make_dataset


@pytest.mark.parametrize(
    "spoil",
    [
        lambda p: p.write_bytes(p.read_bytes()[:200]),
        lambda p: p.write_bytes(b"garbage"),
        lambda p: mnist1d.write_cache(p, dict(zip(("x", "y", "x_test", "y_test"), fake_mnist1d_arrays(8, 4))),
                                      {"args": {**mnist1d.generator_args(), "seed": 43}}),
        lambda p: mnist1d.write_cache(p, {"x": np.zeros((3, 40), np.float64), "y": np.zeros(3, np.int64),
                                          "x_test": np.zeros((1, 40), np.float32), "y_test": np.zeros(1, np.int64)},
                                      {"args": mnist1d.generator_args()}),
    ],
    ids=["truncated", "garbage", "stale-args", "wrong-dtype"],
)
def test_mnist1d_bad_cache_is_regenerated(tmp_path, monkeypatch, spoil):
    import mnist1d.data as source

    calls: list = []
    monkeypatch.setattr(source, "make_dataset", _fake_generator(calls))
    data.load_dataset("mnist1d", tmp_path)
    cache = tmp_path / "mnist1d" / "mnist1d-default.npz"
    spoil(cache)
    ds = data.load_dataset("mnist1d", tmp_path)
    assert calls == [42, 42] and len(ds.train) == 8 and ds.train.x.dtype == torch.float32
    assert mnist1d.read_cache(cache, mnist1d.generator_args()) is not None
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temporary files left


def test_fake_mnist1d_cache_is_loaded_without_generation(tmp_path, monkeypatch):
    import mnist1d.data as source

    monkeypatch.setattr(source, "make_dataset", lambda *a, **k: pytest.fail("generated"))
    write_fake_mnist1d(tmp_path, n_train=50, n_test=20)
    ds = data.load_dataset("mnist1d", tmp_path)
    assert ds.train.x.shape == (50, 40) and ds.test.x.shape == (20, 40) and "fake" in ds.info["source"]


def test_install_fake_data_serves_every_dataset(tmp_path, monkeypatch):
    install_fake_data(monkeypatch, tmp_path, n_train=100, n_test=50)
    for name, spec in data.DATASETS.items():
        ds = data.load_dataset(name)
        assert (len(ds.train), len(ds.test)) == (100, 50), name
        assert ds.input_shape == ds.train.x.shape[1:] and int(ds.train.y.max()) < ds.num_classes


def test_gzip_writer_is_deterministic(tmp_path):
    a = write_gzip(tmp_path / "a" / "f.gz", b"payload")
    b = write_gzip(tmp_path / "b" / "f.gz", b"payload")
    assert a.read_bytes() == b.read_bytes() and gzip.decompress(a.read_bytes()) == b"payload"
