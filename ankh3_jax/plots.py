"""Figures of the result pages, drawn with matplotlib (Agg canvas, no pyplot state):
panels of line curves and panels of per-group means with error bars, saved as SVG text.
Series keep one colour across panels and figures when the same `names` order is passed.
"""
import io
import math
from typing import Sequence

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
           "#000000")
PANEL_SIZE = (3.4, 2.5)  # inches per panel
# Same bytes for the same figure: fixed ids, no date, text kept as text.
_SVG_SETTINGS = {"svg.hashsalt": "ankh3_jax", "svg.fonttype": "none"}


def _finite(values) -> list:
  return [v for v in values if v is not None and math.isfinite(v)]


def _grid(title: str, names: Sequence[str], num_panels: int, columns: int):
  """(figure, axes list, {name: colour}): a grid of panels under a title and a legend."""
  columns = max(1, min(columns, num_panels))
  rows = max(1, -(-num_panels // columns))
  fig = Figure(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows + 0.8),
               layout="constrained")
  FigureCanvasAgg(fig)
  axes = list(fig.subplots(rows, columns, squeeze=False).flat)
  for extra in axes[num_panels:]:
    extra.remove()
  colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
  fig.suptitle(title, fontweight="bold")
  handles = [Line2D([], [], color=colors[n], lw=6, label=n) for n in names]
  if handles:
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6),
               frameon=False, fontsize="small")
  return fig, axes[:num_panels], colors


def line_panels(title: str, panels: Sequence[tuple], names: Sequence[str], *,
                x_label: str = "", y_label: str = "", columns: int = 3) -> Figure:
  """Line charts. `panels`: [(panel title, {series name: [(x, y), ...]})]; series
  missing from a panel are skipped, non-finite points dropped, a lone point drawn as a
  dot; `names` orders the legend and colours."""
  fig, axes, colors = _grid(title, names, len(panels), columns)
  for ax, (panel_title, series) in zip(axes, panels):
    ax.set_title(panel_title, fontsize="medium")
    ax.grid(True, color="#e0e0e0", lw=0.8)
    ax.set_xlabel(x_label, fontsize="small")
    ax.set_ylabel(y_label, fontsize="small")
    for name in names:
      points = [(x, y) for x, y in series.get(name, ())
                if math.isfinite(x) and math.isfinite(y)]
      if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, color=colors[name], lw=1.6, label=name,
                marker="o" if len(points) == 1 else None, ms=4)
  return fig


def point_panels(title: str, panels: Sequence[tuple], names: Sequence[str], *,
                 columns: int = 4) -> Figure:
  """A mean with an error bar per group, and the individual values as small dots.

  `panels`: [(panel title, {name: (mean, spread, values)}, reference)]: `spread` is the
  half-length of the error bar (e.g. a standard deviation; None: no bar), `values` the
  numbers the mean is of (e.g. one per seed); `reference` is None or (label, value),
  e.g. a trivial baseline: a dashed line when it falls inside the groups' range, else a
  note in the panel (the axis is not stretched to it, so small differences stay
  visible).
  """
  fig, axes, colors = _grid(title, names, len(panels), columns)
  for ax, (panel_title, groups, reference) in zip(axes, panels):
    ax.set_title(panel_title, fontsize="medium")
    ax.grid(True, axis="y", color="#e0e0e0", lw=0.8)
    ax.set_xticks([])
    values = [v for name in names if name in groups
              for v in _finite([*groups[name][2], groups[name][0] - (groups[name][1] or 0),
                                groups[name][0] + (groups[name][1] or 0)])] or [0.0, 1.0]
    low, high = min(values), max(values)
    pad = (high - low) * 0.1 or abs(high) * 0.05 or 0.05
    ticks = ax.yaxis.get_major_locator().tick_values(low - pad, high + pad)
    bottom, top = min(ticks[0], low - pad), max(ticks[-1], high + pad)  # round ends
    ax.set_ylim(bottom, top)
    ax.set_xlim(-0.5, max(len(names), 1) - 0.5)
    if reference is not None and bottom <= reference[1] <= top:
      ax.axhline(reference[1], color="#888", ls="--", lw=1)
      ax.annotate(reference[0], (1, reference[1]), xycoords=("axes fraction", "data"),
                  xytext=(-3, 3), textcoords="offset points", ha="right",
                  fontsize="x-small", color="#666")
    elif reference is not None:
      ax.text(0.98, 0.97, f"{reference[0]}: {reference[1]:.4g} (off scale)",
              transform=ax.transAxes, ha="right", va="top", fontsize="x-small",
              color="#666")
    for i, name in enumerate(names):
      if name not in groups or not _finite(groups[name][2]):
        continue
      mean, spread, seeds = groups[name]
      seeds = _finite(seeds)
      bar = spread if spread and math.isfinite(spread) else None
      ax.errorbar([i], [mean], yerr=bar, color=colors[name], fmt="o", ms=7, elinewidth=2,
                  capsize=0, label=f"{name}: {mean:.4f}"
                  + ("" if spread is None else f" +- {spread:.4f}") + f" (n={len(seeds)})")
      offsets = [0.15 + (j - (len(seeds) - 1) / 2) * 0.06 for j in range(len(seeds))]
      ax.scatter([i + dx for dx in offsets], seeds, s=8, color=colors[name], alpha=0.55)
  return fig


def svg_text(fig: Figure) -> str:
  """The figure as SVG text, the same for the same figure (no date, fixed ids)."""
  buffer = io.StringIO()
  with matplotlib.rc_context(_SVG_SETTINGS):
    fig.savefig(buffer, format="svg", metadata={"Date": None})
  return buffer.getvalue()
