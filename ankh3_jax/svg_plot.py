"""Small SVG charts written as text (no plotting dependency): panels of line curves and
panels of per-group points with error bars. Series keep one colour across panels and
charts when the same `names` order is passed.
"""
import math
from typing import Sequence
from xml.sax.saxutils import escape

# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
           "#000000")
PANEL_WIDTH, PANEL_HEIGHT = 320, 230
MARGIN = {"left": 52, "right": 12, "top": 26, "bottom": 40}
LEGEND_HEIGHT = 24
TITLE_HEIGHT = 26


def nice_ticks(low: float, high: float, count: int = 5) -> list:
  """About `count` round tick values (1, 2 or 5 x 10^k apart) covering [low, high]."""
  if not (math.isfinite(low) and math.isfinite(high)):
    raise ValueError(f"axis range must be finite, got [{low}, {high}]")
  if high <= low:
    high = low + (abs(low) or 1.0) * 0.1
  raw = (high - low) / max(count - 1, 1)
  power = 10 ** math.floor(math.log10(raw))
  step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
  first = math.floor(low / step + 1e-9) * step
  ticks = []
  value = first
  while value < high + step * 0.999:
    ticks.append(round(value, 12))
    value += step
  return ticks


def _tick_label(value: float, ticks: Sequence[float]) -> str:
  step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
  decimals = max(0, -math.floor(math.log10(step) + 1e-9))
  return f"{value:.{decimals}f}"


def _text(x: float, y: float, body: str, anchor: str = "middle", size: int = 11,
          extra: str = "") -> str:
  return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}"'
          f'{extra}>{escape(body)}</text>')


class _Canvas:
  """Collects SVG elements for a grid of panels under a title and a legend."""

  def __init__(self, title: str, names: Sequence[str], num_panels: int, columns: int):
    self.columns = max(1, min(columns, num_panels))
    self.rows = -(-num_panels // self.columns)
    self.width = self.columns * PANEL_WIDTH
    self.top = TITLE_HEIGHT + LEGEND_HEIGHT
    self.height = self.top + self.rows * PANEL_HEIGHT
    self.colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    self.parts = [_text(self.width / 2, 18, title, size=14, extra=' font-weight="bold"')]
    self._legend(names)

  def _legend(self, names: Sequence[str]) -> None:
    x = 10.0
    y = TITLE_HEIGHT + 12
    for name in names:
      self.parts.append(f'<rect x="{x:.1f}" y="{y - 8:.1f}" width="12" height="8" '
                        f'fill="{self.colors[name]}"/>')
      self.parts.append(_text(x + 16, y, name, anchor="start"))
      x += 28 + 6.5 * len(name)

  def panel_box(self, index: int):
    """(left, top, width, height) of the plot area of panel `index`."""
    col, row = index % self.columns, index // self.columns
    left = col * PANEL_WIDTH + MARGIN["left"]
    top = self.top + row * PANEL_HEIGHT + MARGIN["top"]
    return (left, top, PANEL_WIDTH - MARGIN["left"] - MARGIN["right"],
            PANEL_HEIGHT - MARGIN["top"] - MARGIN["bottom"])

  def axes(self, index: int, title: str, y_ticks: Sequence[float], y_of,
           x_ticks: Sequence[tuple] = (), x_label: str = "", y_label: str = "") -> None:
    """Frame, title, y grid with labels and x tick labels [(x position, label)]."""
    left, top, width, height = self.panel_box(index)
    self.parts.append(_text(left + width / 2, top - 9, title, size=12))
    for tick in y_ticks:
      y = y_of(tick)
      self.parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + width}" y2="{y:.1f}" '
                        'stroke="#e0e0e0" stroke-width="1"/>')
      self.parts.append(_text(left - 5, y + 4, _tick_label(tick, y_ticks), anchor="end",
                              size=10))
    self.parts.append(f'<rect x="{left}" y="{top}" width="{width}" height="{height}" '
                      'fill="none" stroke="#444" stroke-width="1"/>')
    for x, label in x_ticks:
      self.parts.append(_text(x, top + height + 14, label, size=10))
    if x_label:
      self.parts.append(_text(left + width / 2, top + height + 30, x_label, size=10))
    if y_label:
      cx, cy = left - 40, top + height / 2
      self.parts.append(_text(cx, cy, y_label, size=10,
                              extra=f' transform="rotate(-90 {cx:.1f} {cy:.1f})"'))

  def svg(self) -> str:
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" '
            f'height="{self.height}" viewBox="0 0 {self.width} {self.height}" '
            'font-family="Helvetica, Arial, sans-serif">')
    background = f'<rect width="{self.width}" height="{self.height}" fill="white"/>'
    return "\n".join([head, background, *self.parts, "</svg>"]) + "\n"


def _scale(low: float, high: float, pixel_low: float, pixel_high: float):
  span = (high - low) or 1.0
  return lambda v: pixel_low + (v - low) / span * (pixel_high - pixel_low)


def _finite(values) -> list:
  return [v for v in values if v is not None and math.isfinite(v)]


def line_panels(title: str, panels: Sequence[tuple], names: Sequence[str], *,
                x_label: str = "", y_label: str = "", columns: int = 3) -> str:
  """SVG of line charts. `panels`: [(panel title, {series name: [(x, y), ...]})]; series
  missing from a panel are skipped; `names` orders the legend and colours."""
  canvas = _Canvas(title, names, len(panels), columns)
  for index, (panel_title, series) in enumerate(panels):
    points = [p for name in names for p in series.get(name, ())]
    xs, ys = _finite(p[0] for p in points), _finite(p[1] for p in points)
    if not xs:
      xs, ys = [0.0, 1.0], [0.0, 1.0]
    y_ticks = nice_ticks(min(ys), max(ys))
    x_ticks = nice_ticks(min(xs), max(xs), count=6)
    left, top, width, height = canvas.panel_box(index)
    x_of = _scale(x_ticks[0], x_ticks[-1], left, left + width)
    y_of = _scale(y_ticks[0], y_ticks[-1], top + height, top)
    canvas.axes(index, panel_title, y_ticks, y_of,
                [(x_of(t), _tick_label(t, x_ticks)) for t in x_ticks], x_label, y_label)
    for name in names:
      line = [(x_of(x), y_of(y)) for x, y in series.get(name, ())
              if math.isfinite(x) and math.isfinite(y)]
      if not line:
        continue
      color = canvas.colors[name]
      if len(line) == 1:  # a lone point: a polyline would not show
        canvas.parts.append(f'<circle cx="{line[0][0]:.1f}" cy="{line[0][1]:.1f}" r="3" '
                            f'fill="{color}"><title>{escape(name)}</title></circle>')
        continue
      coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in line)
      canvas.parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" '
                          f'stroke-width="1.6"><title>{escape(name)}</title></polyline>')
  return canvas.svg()


def _bar_ends(mean: float, spread) -> list:
  return [mean - spread, mean + spread] if spread else [mean]


def point_panels(title: str, panels: Sequence[tuple], names: Sequence[str], *,
                 columns: int = 4) -> str:
  """SVG of a mean with an error bar per group, and the individual values as small dots.

  `panels`: [(panel title, {name: (mean, spread, values)}, reference)]: `spread` is the
  half-length of the error bar (e.g. a standard deviation), `values` the numbers the
  mean is of (e.g. one per seed); `reference` is None or (label, value), e.g. a trivial
  baseline: a dashed line when it falls inside the groups' range, else a note under the
  panel title (the axis is not stretched to it, so small differences stay visible).
  """
  canvas = _Canvas(title, names, len(panels), columns)
  for index, (panel_title, groups, reference) in enumerate(panels):
    values = [v for name in names if name in groups
              for v in _finite([*groups[name][2], *_bar_ends(*groups[name][:2])])]
    values = values or [0.0, 1.0]
    low, high = min(values), max(values)
    pad = (high - low) * 0.1 or abs(high) * 0.05 or 0.05
    y_ticks = nice_ticks(low - pad, high + pad)
    left, top, width, height = canvas.panel_box(index)
    y_of = _scale(y_ticks[0], y_ticks[-1], top + height, top)
    slot = width / max(len(names), 1)
    canvas.axes(index, panel_title, y_ticks, y_of)
    if reference is not None and y_ticks[0] <= reference[1] <= y_ticks[-1]:
      y = y_of(reference[1])
      canvas.parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + width}" '
                          f'y2="{y:.1f}" stroke="#888" stroke-dasharray="4 3"/>')
      canvas.parts.append(_text(left + width - 3, y - 3, reference[0], anchor="end",
                                size=9, extra=' fill="#666"'))
    elif reference is not None:
      canvas.parts.append(_text(left + width - 3, top + 11,
                                f"{reference[0]}: {reference[1]:.4g} (off scale)",
                                anchor="end", size=9, extra=' fill="#666"'))
    for i, name in enumerate(names):
      if name not in groups or not _finite(groups[name][2]):
        continue
      mean, spread, seeds = groups[name]
      seeds = _finite(seeds)
      x = left + slot * (i + 0.5)
      color = canvas.colors[name]
      if spread and math.isfinite(spread):
        canvas.parts.append(f'<line x1="{x:.1f}" y1="{y_of(mean - spread):.1f}" '
                            f'x2="{x:.1f}" y2="{y_of(mean + spread):.1f}" '
                            f'stroke="{color}" stroke-width="2"/>')
      for j, value in enumerate(seeds):
        dx = (j - (len(seeds) - 1) / 2) * 4
        canvas.parts.append(f'<circle cx="{x + 9 + dx:.1f}" cy="{y_of(value):.1f}" r="2" '
                            f'fill="{color}" fill-opacity="0.55"/>')
      shown = f"{mean:.4f}" if spread is None else f"{mean:.4f} +- {spread:.4f}"
      label = f"{name}: {shown} (n={len(seeds)})"
      canvas.parts.append(f'<circle cx="{x:.1f}" cy="{y_of(mean):.1f}" r="4.5" '
                          f'fill="{color}"><title>{escape(label)}</title></circle>')
  return canvas.svg()


