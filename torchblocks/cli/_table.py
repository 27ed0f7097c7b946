"""Aligned plain-text tables, for every report the command line prints."""

from typing import Sequence


def format_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """``header`` over a rule over ``body``, columns padded to their widest cell.

    Example::

        >>> print(format_table(("run", "accuracy"), [("torchblocks", "0.9801")]))
        run          accuracy
        -----------  --------
        torchblocks  0.9801
    """
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """The same table as GitHub markdown.

    Example::

        >>> print(format_markdown(("run", "accuracy"), [("torchblocks", "0.9801")]))
        | run | accuracy |
        | --- | --- |
        | torchblocks | 0.9801 |
    """
    lines = [header, ["---"] * len(header), *body]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)
