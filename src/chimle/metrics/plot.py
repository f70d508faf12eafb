"""The picture of an evaluation report (`chimle evaluate` writes it as OUT.png), drawn with Pillow.

    from chimle.metrics.plot import report_plot
    report_plot(report).save("eval.png")

Left: one point per input and method, its best-of-n LPIPS to the ground truth (x, lower is better: some sample
came close) against the LPIPS diversity of its samples (y: how different they are); single-output methods (the
baselines, all codes zero) sit on y = 0. A method that explores the input's possibilities and still reaches the
truth fills the upper left. Right: precision, recall, density and coverage of every method, grouped by metric.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
INK, GRID = (30, 30, 30), (225, 225, 225)
PANEL = (520, 420)  # size of each panel, px
MARGIN = (64, 40, 20, 56)  # left, top, right, bottom of the plotting area inside a panel, px
MANIFOLD = ("precision", "recall", "density", "coverage")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _centred(draw: ImageDraw.ImageDraw, xy, text: str, font) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text((xy[0] - (right - left) / 2, xy[1] - (bottom - top) / 2), text, fill=INK, font=font)


def _ticks(peak: float, most: int = 5) -> list[float]:
    """Round tick values 0, step, ... up to the first at or above `peak`, at most `most` steps."""
    raw = max(peak, 1e-9) / most
    step = min(m * 10.0**e for e in range(-6, 6) for m in (1, 2, 2.5, 5) if m * 10.0**e >= raw)
    return [i * step for i in range(math.ceil(peak / step - 1e-9) + 1)] if peak > 0 else [0.0, step]


class Axes:
    """A plotting area inside a panel, mapping data (x, y) to pixels, with ticks and labels."""

    def __init__(self, draw: ImageDraw.ImageDraw, origin, x_ticks, y_ticks, title: str, x_label: str, y_label: str):
        self.draw, (self.ox, self.oy) = draw, origin
        self.left, self.top = self.ox + MARGIN[0], self.oy + MARGIN[1]
        self.right, self.bottom = self.ox + PANEL[0] - MARGIN[2], self.oy + PANEL[1] - MARGIN[3]
        self.x_ticks, self.y_ticks = x_ticks, y_ticks
        small = _font(12)
        for y in y_ticks:
            py = self.py(y)
            draw.line([(self.left, py), (self.right, py)], fill=GRID)
            draw.text((self.ox + 4, py - 7), f"{y:g}", fill=INK, font=small)
        for x in x_ticks or []:
            px = self.px(x)
            draw.line([(px, self.top), (px, self.bottom)], fill=GRID)
            _centred(draw, (px, self.bottom + 10), f"{x:g}", small)
        draw.rectangle([self.left, self.top, self.right, self.bottom], outline=INK)
        draw.text((self.ox + 8, self.oy + 8), title, fill=INK, font=_font(15))
        _centred(draw, ((self.left + self.right) / 2, self.oy + PANEL[1] - 14), x_label, small)
        draw.text((self.left + 4, self.top + 4), y_label, fill=INK, font=small)

    def px(self, x: float) -> float:
        lo, hi = self.x_ticks[0], self.x_ticks[-1]
        return self.left + (self.right - self.left) * (x - lo) / (hi - lo)

    def py(self, y: float) -> float:
        lo, hi = self.y_ticks[0], self.y_ticks[-1]
        return self.bottom - (self.bottom - self.top) * (y - lo) / (hi - lo)


def per_input_points(report: dict) -> dict[str, list[tuple[float, float]]]:
    """(best-of-n LPIPS, LPIPS diversity) of every input, by method key; diversity 0 for a single output."""
    points: dict[str, list[tuple[float, float]]] = {key: [] for key in report["methods"]}
    for rows in report["per_input"].values():
        for key, row in rows.items():
            points[key].append((min(row["lpips"]), row.get("diversity_lpips") or 0.0))
    return points


def _scatter(draw, origin, report: dict, colours: dict) -> None:
    points = per_input_points(report)
    xs = [x for p in points.values() for x, _ in p]
    ys = [y for p in points.values() for _, y in p]
    x_ticks = _ticks(max(xs) * 1.05)
    axes = Axes(draw, origin, x_ticks, _ticks(max(ys + [0.01]) * 1.1), "Per input: fidelity against diversity",
                "best-of-n LPIPS to the ground truth (lower is better)", "LPIPS diversity of its samples")
    for key, pts in points.items():
        for x, y in pts:
            cx, cy = axes.px(x), axes.py(y)
            draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colours[key], outline=INK)


def _bars(draw, origin, report: dict, colours: dict) -> None:
    methods = report["methods"]
    values = [m[name] for m in methods.values() for name in MANIFOLD if m.get(name) is not None]
    axes = Axes(draw, origin, None, _ticks(max(values + [1.0]) * 1.05), "Precision, recall, density, coverage",
                "", "")
    small = _font(12)
    slot = (axes.right - axes.left) / len(MANIFOLD)
    width = (slot - 16) / max(len(methods), 1)
    for g, name in enumerate(MANIFOLD):
        start = axes.left + g * slot + 8
        _centred(draw, (start + slot / 2 - 8, axes.bottom + 12), name, small)
        for b, (key, m) in enumerate(methods.items()):
            if m.get(name) is None:
                continue
            x0, top = start + b * width, axes.py(m[name])
            draw.rectangle([x0 + 1, top, x0 + width - 1, axes.bottom], fill=colours[key])
            _centred(draw, (x0 + width / 2, top - 8), f"{m[name]:.2f}", _font(10))
    # Two sets from one distribution: density about 1 (Naeem et al. 2020); a dashed line there.
    y = axes.py(1.0)
    for x in range(int(axes.left), int(axes.right), 8):
        draw.line([(x, y), (x + 4, y)], fill=INK)


def _legend(draw, report: dict, colours: dict, top: int) -> None:
    font, x = _font(13), 12
    for key, m in report["methods"].items():
        draw.rectangle([x, top + 4, x + 12, top + 16], fill=colours[key], outline=INK)
        draw.text((x + 18, top + 2), m["label"], fill=INK, font=font)
        left, _, right, _ = draw.textbbox((0, 0), m["label"], font=font)
        x += right - left + 40


def report_plot(report: dict) -> Image.Image:
    """The two panels side by side, with a legend of the methods under them."""
    colours = {key: COLOURS[i % len(COLOURS)] for i, key in enumerate(report["methods"])}
    image = Image.new("RGB", (2 * PANEL[0], PANEL[1] + 28), "white")
    draw = ImageDraw.Draw(image)
    _scatter(draw, (0, 0), report, colours)
    _bars(draw, (PANEL[0], 0), report, colours)
    _legend(draw, report, colours, PANEL[1])
    return image
