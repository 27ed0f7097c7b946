"""PNG line plots through matplotlib, an optional dependency (``pip install torchblocks[plot]``)."""

import importlib.util
from typing import Dict, Sequence, Tuple

# One line: x values, y values, matplotlib format string ("C0-o": first colour, solid, dots).
Series = Tuple[Sequence[float], Sequence[float], str]


def has_matplotlib() -> bool:
    """Whether plots can be drawn."""
    return importlib.util.find_spec("matplotlib") is not None


def require_matplotlib(option: str) -> None:
    """Raise before any work starts when ``option`` asks for a plot and matplotlib is missing."""
    if not has_matplotlib():
        raise RuntimeError(f"{option} needs matplotlib, which is not installed: pip install 'torchblocks[plot]'")


def save_line_plots(path: str, title: str, subtitle: str, xlabel: str, panels: Dict[str, Dict[str, Series]],
                    xscale: str = "linear") -> None:
    """One PNG at ``path``: a row of panels sharing the x axis, one per ``panels`` entry.

    Args:
        path: the PNG file to write.
        title, subtitle: the figure's title, and a smaller line under it (or "").
        xlabel: the label of every panel's x axis.
        panels: panel y label -> {line label -> (xs, ys, format)}.
        xscale: ``"linear"`` or ``"log"``.

    Example::

        >>> save_line_plots("loss.png", "MNIST", "", "epoch",
        ...                 {"loss": {"torchblocks": ([1, 2], [0.3, 0.1], "-o")}})
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot, ticker

    figure, axes = pyplot.subplots(1, len(panels), figsize=(max(7.0, 5.5 * len(panels)), 4.2), squeeze=False)
    for axis, (ylabel, lines) in zip(axes[0], panels.items()):
        for label, (xs, ys, style) in lines.items():
            axis.plot(xs, ys, style, label=label)
        axis.set_xscale(xscale)
        if xscale == "linear":
            axis.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"{title}\n{subtitle}" if subtitle else title)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    pyplot.close(figure)
