"""torchblocks.cli.data: strict IDX and npz parsing, checksums, download, and the embedded fallback.

Every file here is written by the test itself; the network is never touched
(``urllib.request.urlopen`` is replaced wherever a download could start).
"""

import dataclasses
import gzip
import hashlib
import io
import os
import struct
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from torchblocks.cli import data
from torchblocks.cli._progress import ProgressBar
from torchblocks.cli.data import mnist

SPLITS = {"train": 10, "test": 4}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of ubyte ``array``: magic 0x0000 08 <ndim>, big-endian sizes, values."""
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def small_arrays(seed=0):
    """Four ubyte arrays in MNIST's layout: 10 training and 4 test images of 3x2 pixels."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in SPLITS.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, 3, 2), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 10, count, dtype=np.uint8)
    return arrays


def write_set(directory, arrays, compress=False, corrupt=None):
    """Write ``arrays`` as the four IDX files; return the DataSetSpec whose checksums
    match them. ``corrupt`` maps a role to a function of the file's bytes,
    applied after the checksums are taken."""
    files = {}
    for role, spec in mnist.MNIST.files.items():
        raw = idx_bytes(arrays[role])
        stored = gzip.compress(raw, mtime=0) if compress else raw
        files[role] = data.FileSpec(spec.name, sha256(raw), sha256(stored) if compress else None)
        if corrupt and role in corrupt:
            stored = corrupt[role](stored)
        (directory / (spec.name + (".gz" if compress else ""))).write_bytes(stored)
    return data.DataSetSpec("small", files, npz=data.FileSpec("mnist.npz", "0" * 64))


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_idx_set_loads_as_scaled_flat_tensors(tmp_path, compress):
    arrays = small_arrays()
    spec = write_set(tmp_path, arrays, compress)
    loaded = data.load_directory(str(tmp_path), spec)
    assert loaded.image_shape == (3, 2)
    assert loaded.train_images.dtype == torch.float32 and loaded.train_labels.dtype == torch.int64
    expected = torch.from_numpy(arrays["train_images"].reshape(10, 6).astype(np.float32)) / 255
    torch.testing.assert_close(loaded.train_images, expected, rtol=0, atol=0)
    assert loaded.test_labels.tolist() == arrays["test_labels"].tolist()
    assert "10 training and 4 test images of 3x2 pixels" in loaded.describe()


def test_a_recompressed_file_passes_by_its_content(tmp_path):
    arrays = small_arrays()
    spec = write_set(tmp_path, arrays, compress=True)
    name = spec.files["train_labels"].name + ".gz"
    (tmp_path / name).write_bytes(gzip.compress(idx_bytes(arrays["train_labels"]), compresslevel=1, mtime=12345))
    assert data.load_directory(str(tmp_path), spec).train_labels.tolist() == arrays["train_labels"].tolist()


def test_parse_idx_reads_every_declared_type():
    values = np.arange(6, dtype=">i4").reshape(2, 3)
    blob = struct.pack(">HBB2I", 0, 0x0C, 2, 2, 3) + values.tobytes()
    assert data.parse_idx(blob, "ints").tolist() == values.tolist()


@pytest.mark.parametrize("blob, message", [
    (b"", "not an IDX file"),
    (b"\x1f\x8b\x08\x01" + bytes(8), "must start with two zero bytes"),
    (b"\x00\x00\x07\x01" + bytes(8), "unknown IDX type code 0x07"),
    (struct.pack(">HBB3I", 0, 8, 3, 1, 1, 1) + b"\x00",
     "wrong magic number 2051: it declares 3 dimension(s), expected 1"),
    (struct.pack(">HBB", 0, 8, 1) + b"\x00\x00", "truncated header"),
    (struct.pack(">HBBI", 0, 8, 1, 5) + bytes(4), "truncated: its header declares shape (5,)"),
    (struct.pack(">HBBI", 0, 8, 1, 5) + bytes(6), "has trailing bytes"),
], ids=["empty", "nonzero-magic", "unknown-type", "images-as-labels", "short-header", "truncated", "trailing"])
def test_parse_idx_rejects_what_its_header_does_not_describe(blob, message):
    with pytest.raises(data.DataFileError, match="labels-file") as error:
        data.parse_idx(blob, "labels-file", ndim=1)
    assert message in str(error.value)


@pytest.mark.parametrize("role, corrupt, message", [
    ("train_images", lambda blob: blob[:-7], "truncated: its header declares shape (10, 3, 2)"),
    ("train_labels", lambda blob: b"\x00\x00\x08\x03" + blob[4:], "wrong magic number 2051"),
    ("test_images", lambda blob: b"\x08\x03" + blob[2:], "not an IDX file"),
], ids=["truncated", "labels-with-image-magic", "wrong-magic"])
def test_a_bad_file_is_named_in_the_error(tmp_path, role, corrupt, message):
    arrays = small_arrays()
    spec = write_set(tmp_path, arrays)
    path = tmp_path / spec.files[role].name
    bad = corrupt(path.read_bytes())
    path.write_bytes(bad)
    spec.files[role] = data.FileSpec(spec.files[role].name, sha256(bad))
    with pytest.raises(data.DataFileError, match=str(path)) as error:
        data.load_directory(str(tmp_path), spec)
    assert message in str(error.value)


def test_a_truncated_gzip_file_is_named_in_the_error(tmp_path):
    spec = write_set(tmp_path, small_arrays(), compress=True, corrupt={"test_labels": lambda blob: blob[:-9]})
    path = tmp_path / (spec.files["test_labels"].name + ".gz")
    with pytest.raises(data.DataFileError, match=f"{path}: truncated gzip data"):
        data.load_directory(str(tmp_path), spec)


@pytest.mark.parametrize("split", ["train", "test"])
def test_label_and_image_counts_must_match(tmp_path, split):
    arrays = small_arrays()
    arrays[f"{split}_labels"] = arrays[f"{split}_labels"][:-1]
    spec = write_set(tmp_path, arrays)
    count = SPLITS[split]
    with pytest.raises(data.DataFileError,
                       match=f"labels-idx1-ubyte holds {count - 1:,} labels but .*images-idx3-ubyte holds {count:,}"):
        data.load_directory(str(tmp_path), spec)


def test_labels_must_be_digits_and_images_must_agree_in_shape(tmp_path):
    arrays = small_arrays()
    arrays["train_labels"][3] = 10
    with pytest.raises(data.DataFileError, match="labels must be 0..9, found 10"):
        data.load_directory(str(tmp_path), write_set(tmp_path, arrays))
    arrays = small_arrays()
    arrays["test_images"] = np.zeros((4, 2, 3), dtype=np.uint8)
    with pytest.raises(data.DataFileError, match=r"holds \(3, 2\) images but .* holds \(2, 3\)"):
        data.load_directory(str(tmp_path), write_set(tmp_path, arrays))


def test_checksum_failure_names_the_file_and_both_digests(tmp_path):
    spec = write_set(tmp_path, small_arrays(), corrupt={"train_images": lambda blob: blob[:-1] + b"\x01"})
    path = tmp_path / spec.files["train_images"].name
    with pytest.raises(data.DataFileError, match=f"{path}: checksum mismatch") as error:
        data.load_directory(str(tmp_path), spec)
    assert spec.files["train_images"].sha256 in str(error.value)
    assert sha256(path.read_bytes()) in str(error.value)


def test_a_corrupt_mnist_file_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    for spec in mnist.MNIST.files.values():
        (tmp_path / spec.name).write_bytes(b"\x00\x00\x08\x01" + bytes(8))
    with pytest.raises(data.DataFileError, match="train-images-idx3-ubyte: checksum mismatch"):
        data.load_mnist(str(tmp_path))


def write_npz(path, arrays, **renamed):
    buffer = io.BytesIO()
    keys = {"train_images": "x_train", "train_labels": "y_train", "test_images": "x_test", "test_labels": "y_test"}
    np.savez(buffer, **{renamed.get(keys[role], keys[role]): array for role, array in arrays.items()})
    path.write_bytes(buffer.getvalue())
    return data.DataSetSpec("small", mnist.MNIST.files, npz=data.FileSpec(path.name, sha256(buffer.getvalue())))


def test_npz_loads_like_the_idx_files(tmp_path):
    arrays = small_arrays()
    from_npz = data.load_directory(str(tmp_path), write_npz(tmp_path / "mnist.npz", arrays))
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    from_idx = data.load_directory(str(idx_dir), write_set(idx_dir, arrays))
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(from_npz, field), getattr(from_idx, field))
    assert from_npz.source == str(tmp_path / "mnist.npz")


def test_npz_errors(tmp_path):
    arrays = small_arrays()
    spec = write_npz(tmp_path / "mnist.npz", arrays, x_test="images")
    with pytest.raises(data.DataFileError, match="mnist.npz: missing array.s. x_test"):
        data.load_directory(str(tmp_path), spec)
    (tmp_path / "mnist.npz").write_bytes(b"not a zip")
    spec = data.DataSetSpec("small", mnist.MNIST.files, npz=data.FileSpec("mnist.npz", sha256(b"not a zip")))
    with pytest.raises(data.DataFileError, match="mnist.npz: not a readable .npz file"):
        data.load_directory(str(tmp_path), spec)
    with pytest.raises(data.DataFileError, match="mnist.npz: checksum mismatch"):
        data.load_directory(str(tmp_path), mnist.MNIST)
    arrays["train_labels"] = arrays["train_labels"][:3]
    with pytest.raises(data.DataFileError, match=r"mnist.npz \(train_labels\) holds 3 labels"):
        data.load_directory(str(tmp_path), write_npz(tmp_path / "mnist.npz", arrays))


def test_missing_files_are_listed(tmp_path):
    spec = write_set(tmp_path, small_arrays())
    os.remove(tmp_path / spec.files["test_labels"].name)
    with pytest.raises(data.MissingDataError, match="missing t10k-labels-idx1-ubyte$"):
        data.load_directory(str(tmp_path), spec)


def _no_network(url, *args, **kwargs):
    _no_network.urls.append(getattr(url, "full_url", url))
    raise urllib.error.URLError("network access is switched off in this test")


@pytest.fixture
def default_dir(tmp_path, monkeypatch):
    """No directory named by the user: the default cache, under tmp_path."""
    monkeypatch.delenv("TORCHBLOCKS_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "torchblocks" / "mnist"


def test_no_files_and_no_network_fall_back_to_the_embedded_digits(default_dir, monkeypatch):
    _no_network.urls = []
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    loaded = data.load_mnist()
    assert loaded.name == "scikit-learn 8x8 digits" and loaded.image_shape == (8, 8)
    assert "could not download" in loaded.note and "network access is switched off" in loaded.note
    assert "using the embedded scikit-learn 8x8 digits instead" in loaded.note
    assert _no_network.urls == ([mirror + "train-images-idx3-ubyte.gz" for mirror in mnist.MNIST.mirrors]
                                + [archive.url for archive in mnist.MNIST.archives])
    with pytest.raises(data.MissingDataError, match="could not download"):
        data.load_mnist(fallback=False)


def test_no_download_means_no_network_access(default_dir, monkeypatch):
    _no_network.urls = []
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    assert data.load_mnist(download_missing=False).name == "scikit-learn 8x8 digits"
    assert _no_network.urls == []


@pytest.mark.parametrize("download", [True, False], ids=["download", "no-download"])
def test_a_named_directory_must_hold_mnist_or_receive_it(tmp_path, monkeypatch, download):
    """A typo in --data-dir is an error, never the embedded digits; and the
    directory is not left behind."""
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    typo = tmp_path / "mnsit"
    with pytest.raises(data.MissingDataError, match=f"MNIST is not in {typo}"):
        data.load_mnist(str(typo), download_missing=download)
    assert not typo.exists()
    monkeypatch.setenv("TORCHBLOCKS_DATA_DIR", str(typo))  # named through the environment too
    with pytest.raises(data.MissingDataError):
        data.load_mnist(download_missing=download)


@pytest.mark.parametrize("named", [True, False], ids=["named", "default"])
def test_a_corrupt_file_is_an_error_even_when_the_others_are_missing(tmp_path, monkeypatch, default_dir, named):
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    directory = tmp_path / "data" if named else default_dir
    directory.mkdir(parents=True)
    (directory / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + bytes(20))
    with pytest.raises(data.DataFileError, match=f"{directory / 'train-images-idx3-ubyte'}: checksum mismatch"):
        data.load_mnist(str(directory) if named else None)
    (directory / "train-images-idx3-ubyte").unlink()
    (directory / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(range(256)) * 8)[:40])
    with pytest.raises(data.DataFileError, match="t10k-labels-idx1-ubyte.gz: truncated"):
        data.load_mnist(str(directory) if named else None, download_missing=False)


def test_embedded_digits_pass_their_checksums_and_hold_every_class():
    digits = data.load_directory(mnist.EMBEDDED_DIR, mnist.DIGITS)
    assert digits.train_images.shape == (1437, 64) and digits.test_images.shape == (360, 64)
    assert 0 <= digits.train_images.min() and digits.train_images.max() == 1
    for labels in (digits.train_labels, digits.test_labels):
        assert torch.bincount(labels, minlength=10).min() > 30


class FakeResponse(io.BytesIO):
    """What urlopen returns: a readable body with headers."""

    def __init__(self, body: bytes):
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body))}


def serve(files, failing=()):
    """An urlopen that serves ``files`` (url -> bytes) and refuses the hosts in ``failing``."""
    def urlopen(url, timeout=None):
        assert timeout is not None, "a download must not wait forever"
        if url.startswith(tuple(failing)):
            raise urllib.error.URLError("connection refused")
        return FakeResponse(files[url])
    return urlopen


def test_download_tries_each_mirror_and_keeps_only_checked_files(tmp_path, monkeypatch):
    arrays = small_arrays()
    source = tmp_path / "source"
    source.mkdir()
    spec = write_set(source, arrays, compress=True)
    spec = data.DataSetSpec("small", spec.files, mirrors=("http://down.example/", "http://up.example/"))
    served = {f"http://up.example/{s.name}.gz": (source / f"{s.name}.gz").read_bytes() for s in spec.files.values()}
    monkeypatch.setattr(urllib.request, "urlopen", serve(served, failing=("http://down.example/",)))
    cache = tmp_path / "cache"
    progress = io.StringIO()
    data.download(str(cache), spec, stream=progress)
    assert sorted(os.listdir(cache)) == sorted(f"{s.name}.gz" for s in spec.files.values())
    assert "downloading train-images-idx3-ubyte.gz [" in progress.getvalue()
    assert data.load_directory(str(cache), spec).train_labels.tolist() == arrays["train_labels"].tolist()


def test_a_download_that_fails_its_checksum_leaves_nothing_behind(tmp_path, monkeypatch):
    spec = write_set(tmp_path, small_arrays(), compress=True)
    spec = data.DataSetSpec("small", spec.files, mirrors=("http://bad.example/",))
    served = {f"http://bad.example/{s.name}.gz": b"\x1f\x8b tampered" for s in spec.files.values()}
    monkeypatch.setattr(urllib.request, "urlopen", serve(served))
    cache = tmp_path / "cache"
    with pytest.raises(data.DataFileError, match="train-images-idx3-ubyte.gz: checksum mismatch"):
        data.download(str(cache), spec, stream=io.StringIO())
    assert os.listdir(cache) == []


def tgz_bytes(members):
    """A gzipped tar holding ``members`` (name -> bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buffer.getvalue()


def archive_set(tmp_path, members=None):
    """The small set as IDX files, a spec whose mirrors are all down and
    whose one archive (``members``, by default the four raw files under
    package/data/) is served: ``(arrays, spec, urlopen)``."""
    arrays = small_arrays()
    source = tmp_path / "source"
    source.mkdir()
    spec = write_set(source, arrays)
    if members is None:
        members = {f"package/data/{s.name}": (source / s.name).read_bytes() for s in spec.files.values()}
    blob = tgz_bytes(members)
    archive = data.Archive("http://registry.example/small.tgz", sha256(blob), "package/data/")
    spec = data.DataSetSpec("small", spec.files, mirrors=("http://down.example/",), archives=(archive,))
    return arrays, spec, serve({archive.url: blob}, failing=("http://down.example/",))


def test_with_every_mirror_down_the_missing_files_come_from_the_archive(tmp_path, monkeypatch):
    arrays, spec, urlopen = archive_set(tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    cache = tmp_path / "cache"
    cache.mkdir()
    present = spec.files["train_images"].name + ".gz"
    (cache / present).write_bytes(gzip.compress((tmp_path / "source" / spec.files["train_images"].name).read_bytes()))
    progress = io.StringIO()
    data.download(str(cache), spec, stream=progress)
    others = [s.name for role, s in spec.files.items() if role != "train_images"]
    assert sorted(os.listdir(cache)) == sorted([present, *others])
    assert "downloading small.tgz [" in progress.getvalue()
    loaded = data.load_directory(str(cache), spec)
    assert loaded.test_labels.tolist() == arrays["test_labels"].tolist()
    assert loaded.train_images.shape == (10, 6)


@pytest.mark.parametrize("problem", ["tampered", "missing"])
def test_an_archive_member_that_fails_its_checksum_is_not_kept(tmp_path, monkeypatch, problem):
    arrays = small_arrays()
    names = [s.name for s in mnist.MNIST.files.values()]
    members = {f"package/data/{name}": idx_bytes(arrays[role]) for name, role in zip(names, mnist.MNIST.files)}
    if problem == "tampered":
        members["package/data/t10k-images-idx3-ubyte"] = b"\x00\x00\x08\x03 tampered"
    else:
        del members["package/data/t10k-images-idx3-ubyte"]
    _, spec, urlopen = archive_set(tmp_path, members)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    cache = tmp_path / "cache"
    message = "t10k-images-idx3-ubyte: checksum mismatch" if problem == "tampered" else "not the archive it should be"
    with pytest.raises(data.DataFileError, match=f"http://registry.example/small.tgz: .*{message}"):
        data.download(str(cache), spec, stream=io.StringIO())
    assert sorted(os.listdir(cache)) == ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]


def test_an_archive_that_fails_its_checksum_leaves_nothing_behind(tmp_path, monkeypatch):
    _, spec, _ = archive_set(tmp_path)
    archive = dataclasses.replace(spec.archives[0], sha256="0" * 64)
    spec = dataclasses.replace(spec, archives=(archive,))
    monkeypatch.setattr(urllib.request, "urlopen", serve({archive.url: b"\x1f\x8b tampered"},
                                                         failing=("http://down.example/",)))
    cache = tmp_path / "cache"
    with pytest.raises(data.DataFileError, match="small.tgz: checksum mismatch"):
        data.download(str(cache), spec, stream=io.StringIO())
    assert os.listdir(cache) == []


def test_with_mirrors_and_archives_down_every_url_tried_is_named(tmp_path, monkeypatch):
    _, spec, _ = archive_set(tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", serve({}, failing=("http://",)))
    with pytest.raises(data.DownloadError) as raised:
        data.download(str(tmp_path / "cache"), spec, stream=io.StringIO())
    assert str(raised.value) == ("could not download train-images-idx3-ubyte.gz: "
                                 "http://down.example/train-images-idx3-ubyte.gz: connection refused; "
                                 "http://registry.example/small.tgz: connection refused")


def test_a_download_error_names_only_the_file_that_could_not_be_had(tmp_path, monkeypatch):
    source = tmp_path / "source"
    source.mkdir()
    spec = write_set(source, small_arrays(), compress=True)
    spec = data.DataSetSpec("small", spec.files, mirrors=("http://down.example/", "http://up.example/"))
    first = spec.files["train_images"].name + ".gz"
    monkeypatch.setattr(urllib.request, "urlopen", serve({f"http://up.example/{first}": (source / first).read_bytes()},
                                                         failing=("http://down.example/", "http://up.example/t10k",
                                                                  "http://up.example/train-labels")))
    with pytest.raises(data.DownloadError) as raised:
        data.download(str(tmp_path / "cache"), spec, stream=io.StringIO())
    assert str(raised.value).startswith("could not download train-labels-idx1-ubyte.gz: ")
    assert "train-images" not in str(raised.value)


def test_default_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHBLOCKS_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.default_data_dir() == str(tmp_path / "torchblocks" / "mnist")
    monkeypatch.setenv("TORCHBLOCKS_DATA_DIR", "/data/mnist")
    assert data.default_data_dir() == "/data/mnist"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_redraws_on_a_terminal_and_writes_one_line_elsewhere():
    log = io.StringIO()
    bar = ProgressBar(4, label="epoch 1/1", stream=log)
    for step in range(1, 5):
        assert not bar.due()
        bar.update(step, "loss 1.0")
    bar.close(4, "loss 0.5")
    assert log.getvalue() == "epoch 1/1 [==============================] 4/4 loss 0.5\n"
    terminal = Terminal()
    bar = ProgressBar(4, label="epoch 1/1", stream=terminal, width=4, interval=0)
    bar.update(1, "loss 1.0")
    bar.close(4, "loss 0.5")
    assert terminal.getvalue() == "\r\x1b[Kepoch 1/1 [=>  ] 1/4 loss 1.0\r\x1b[Kepoch 1/1 [====] 4/4 loss 0.5\n"
