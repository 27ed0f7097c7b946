"""PNG line plots through matplotlib, an optional dependency (``pip install torchblocks[plot]``)."""

import importlib.util
import math
from typing import Dict, Optional, Sequence, Tuple, Union

# One line: x values, y values, a matplotlib format string ("C0-o": first
# colour, solid, dots), and optionally more line properties (e.g. {"markersize": 9}).
Series = Union[Tuple[Sequence[float], Sequence[float], str],
               Tuple[Sequence[float], Sequence[float], str, Dict[str, object]]]


def has_matplotlib() -> bool:
    """Whether plots can be drawn."""
    return importlib.util.find_spec("matplotlib") is not None


def require_matplotlib(option: str) -> None:
    """Raise before any work starts when ``option`` asks for a plot and matplotlib is missing."""
    if not has_matplotlib():
        raise RuntimeError(f"{option} needs matplotlib, which is not installed: pip install 'torchblocks[plot]'")


def save_line_plots(path: str, title: str, subtitle: str, xlabel: str, panels: Dict[str, Dict[str, Series]],
                    xscale: str = "linear", columns: Optional[int] = None, y_from_zero: bool = False,
                    integer_x: bool = False) -> None:
    """One PNG at ``path``: a grid of panels, one per ``panels`` entry, ``columns`` to a row (default: one row).

    Args:
        path: the PNG file to write.
        title, subtitle: the figure's title, and a smaller line under it (or "").
        xlabel: the label of every panel's x axis.
        panels: panel y label -> {line label -> (xs, ys, format)}.
        xscale: ``"linear"`` or ``"log"``.
        columns: panels per row.
        y_from_zero: start every y axis at 0 (for throughputs and sizes).
        integer_x: tick exactly the x values (integers such as epochs).

    Example::

        >>> save_line_plots("loss.png", "MNIST", "", "epoch",
        ...                 {"loss": {"torchblocks": ([1, 2], [0.3, 0.1], "-o")}})
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot, ticker

    columns = columns or len(panels)
    rows = math.ceil(len(panels) / columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(max(7.0, 5.0 * columns), 0.6 + 3.8 * rows), squeeze=False)
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    for axis, (ylabel, lines) in zip(axes.flat, panels.items()):
        for label, (xs, ys, style, *options) in lines.items():
            axis.plot(xs, ys, style, label=label, **(options[0] if options else {}))
        axis.set_xscale(xscale)
        if integer_x:
            axis.set_xticks(sorted({x for xs, *_ in lines.values() for x in xs}))
        elif xscale == "linear":
            axis.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        if y_from_zero:
            axis.set_ylim(bottom=0)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(f"{title}\n{subtitle}" if subtitle else title)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    pyplot.close(figure)
