"""Digits to train on: MNIST read strictly from IDX or ``.npz`` files (downloaded
and checksummed when missing), or an embedded stand-in that needs no network.

Example::

    >>> data = torchblocks.cli.data.load_mnist()
    >>> data.train_images.shape, data.train_labels.dtype
    (torch.Size([60000, 784]), torch.int64)
"""

from torchblocks.cli.data.idx import DataFileError, gunzip, parse_idx
from torchblocks.cli.data.mnist import (DIGITS, MNIST, Archive, DataSetSpec, Digits, DownloadError, FileSpec,
                                    MissingDataError, default_data_dir, download, load_directory, load_mnist)

__all__ = ["DIGITS", "MNIST", "Archive", "DataFileError", "DataSetSpec", "Digits", "DownloadError", "FileSpec",
           "MissingDataError", "default_data_dir", "download", "gunzip", "load_directory", "load_mnist", "parse_idx"]
