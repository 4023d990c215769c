"""Draws the Grafana dashboard charts/monsoon/dashboards/monsoon.json as one PNG, from a real
Prometheus, because no Grafana can run here.

For every panel it evaluates the panel's own PromQL targets over the time window with
Prometheus' HTTP API (/api/v1/query_range), after substituting the dashboard's template
variables the way Grafana does (a query variable `label_values(metric{...}, label)` set to All
becomes the regex of every value Prometheus knows, `(a|b)`; `$__rate_interval`, `$__interval`,
`$__range` from the step and the scrape interval), and draws the panel where its gridPos puts it
(24 columns), with its title, unit, series named by legendFormat, and "no data" where a query
returns nothing. A query Prometheus refuses is a bug in the dashboard: the panel shows the error
and the script exits 1.

    render.py --prometheus http://127.0.0.1:9090 --start UNIX --end UNIX --out docs/dashboard.png
              [--events events.json] [--dashboard charts/monsoon/dashboards/monsoon.json]

--events names a JSON list of {"time": unix, "text": "..."} drawn as annotations (dashed
vertical lines), as Grafana draws annotations.
"""

import argparse
import datetime as dt
import json
import math
import re
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# Grafana's dark theme and its classic palette, so the picture reads like the real thing.
BG = "#111217"
PANEL = "#181b1f"
BORDER = "#2c3235"
TEXT = "#ccccdc"
DIM = "#8e8e9a"
ANNOTATION = "#E0B400"
PALETTE = ["#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9",
           "#705DA0", "#37872D", "#FADE2A", "#447EBC", "#C15C17", "#890F02", "#0A437C"]

# Grafana's grid: 24 columns; a height unit is 30 px plus an 8 px gap.
COLS = 24
ROW_PX = 30
GAP_PX = 8
WIDTH_PX = 1600
DPI = 100


class Prometheus:
    def __init__(self, url):
        self.url = url.rstrip("/")

    def get(self, path, params):
        q = urllib.parse.urlencode(params, doseq=True)
        req = urllib.request.Request(f"{self.url}{path}?{q}")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        if body.get("status") != "success":
            raise QueryError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def version(self):
        try:
            return self.get("/api/v1/status/buildinfo", {})["version"]
        except (QueryError, KeyError):
            return ""

    def scrape_interval(self):
        """The smallest scrape interval of the configured jobs (Grafana's data source setting)."""
        cfg = self.get("/api/v1/status/config", {})["yaml"]
        found = [parse_duration(m) for m in re.findall(r"scrape_interval:\s*(\S+)", cfg)]
        return min(found) if found else 15.0


class QueryError(Exception):
    pass


def parse_duration(s):
    total = 0.0
    for n, u in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", s):
        total += int(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}[u]
    return total


def prom_duration(seconds):
    seconds = int(round(seconds))
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def substitute(expr, variables):
    """Grafana's variable syntaxes: $name, ${name}, ${name:format} (format ignored), [[name]]."""

    def value(name):
        if name not in variables:
            raise QueryError(f"unknown template variable ${name}")
        return variables[name]

    expr = re.sub(r"\$\{(\w+)(?::\w+)?\}", lambda m: value(m.group(1)), expr)
    expr = re.sub(r"\[\[(\w+)\]\]", lambda m: value(m.group(1)), expr)
    # \w+ takes the whole name, so $__rate_interval is never read as $__rate.
    return re.sub(r"\$(\w+)", lambda m: value(m.group(1)), expr)


def resolve_variables(dashboard, prom, start, end, step, scrape):
    """The value Grafana would give each template variable, with every query variable at All."""
    rng = end - start
    variables = {
        "__interval": prom_duration(step),
        "__interval_ms": str(int(step * 1000)),
        # Grafana: max($__interval + scrape interval, 4 * scrape interval).
        "__rate_interval": prom_duration(max(step + scrape, 4 * scrape)),
        "__range": prom_duration(rng),
        "__range_s": str(int(rng)),
        "__range_ms": str(int(rng * 1000)),
    }
    shown = []
    for var in dashboard.get("templating", {}).get("list", []):
        name, kind = var["name"], var.get("type")
        if kind == "datasource":
            variables[name] = "prometheus"
            continue
        if kind in ("constant", "textbox"):
            variables[name] = str(var.get("query", ""))
            continue
        if kind == "custom":  # "a,b,c" at All
            values = [v.strip() for v in str(var.get("query", "")).split(",") if v.strip()]
            variables[name] = "(" + "|".join(regex_escape(v) for v in values) + ")" if values else ".*"
            continue
        if kind != "query":
            variables[name] = ".*"
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((?:(.*),\s*)?(\w+)\)\s*", query)
        if not m:
            raise QueryError(f"variable ${name}: only label_values(...) is understood, not {query!r}")
        selector, label = m.group(1), m.group(2)
        params = {"start": start, "end": end}
        if selector:
            params["match[]"] = substitute(selector, variables)
        values = prom.get(f"/api/v1/label/{label}/values", params)
        # Grafana's "All" for a multi-value Prometheus variable: (v1|v2), each regex-escaped;
        # with no values at all, .* (what a custom allValue would say).
        variables[name] = "(" + "|".join(regex_escape(v) for v in values) + ")" if values else ".*"
        shown.append(f"{var.get('label') or name}: All ({', '.join(values) if values else 'none'})")
    return variables, shown


def regex_escape(value):
    """Grafana's escaping of a value in a regex inside a PromQL string: each special character
    gets a backslash, itself escaped for the string literal."""
    return "".join("\\\\" + c if c in "\\^$*+?.()|{}[]" else c for c in value)


def legend(fmt, metric, expr):
    if not fmt or fmt == "__auto":
        name = metric.get("__name__", "")
        labels = ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items()) if k != "__name__")
        return f"{name}{{{labels}}}" if labels or name else expr
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt)


# --- units, as Grafana formats them on an axis

def si(v, unit=""):
    a = abs(v)
    for f, p in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if a >= f:
            return f"{v / f:.3g} {p}{unit}".rstrip()
    return f"{v:.3g} {unit}".rstrip() if v != int(v) or a < 1e3 else f"{int(v)} {unit}".rstrip()


def fmt_seconds(v):
    a = abs(v)
    if a == 0:
        return "0 s"
    if a < 1:
        return f"{v * 1000:.3g} ms"
    if a < 60:
        return f"{v:.3g} s"
    if a < 3600:
        return f"{v / 60:.3g} min"
    return f"{v / 3600:.3g} hour"


def formatter(unit):
    if unit == "s":
        return fmt_seconds
    if unit == "ms":
        return lambda v: fmt_seconds(v / 1000)
    if unit == "percentunit":
        return lambda v: f"{v * 100:.3g}%"
    if unit == "percent":
        return lambda v: f"{v:.3g}%"
    if unit in ("ops", "reqps", "wps", "rps"):
        return lambda v: si(v, {"ops": "ops/s", "reqps": "req/s", "wps": "wp/s", "rps": "rp/s"}[unit])
    if unit == "bytes":
        return lambda v: si(v, "B")
    return lambda v: si(v)


def draw(dashboard, prom, start, end, step, events, note, out):
    scrape = prom.scrape_interval()
    variables, shown = resolve_variables(dashboard, prom, start, end, step, scrape)
    panels = dashboard.get("panels", [])
    rows = max((p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels), default=1)
    header_px = 84 + (14 if events else 0)
    footer_px = 58
    height_px = header_px + rows * (ROW_PX + GAP_PX) + footer_px
    fig = plt.figure(figsize=(WIDTH_PX / DPI, height_px / DPI), dpi=DPI, facecolor=BG)
    px_w = 1.0 / WIDTH_PX
    px_h = 1.0 / height_px
    col_px = (WIDTH_PX - GAP_PX) / COLS
    tz = dt.timezone.utc

    t_start = dt.datetime.fromtimestamp(start, tz)
    t_end = dt.datetime.fromtimestamp(end, tz)
    fig.text(GAP_PX * px_w, 1 - 22 * px_h, dashboard.get("title", ""), color=TEXT, fontsize=17,
             fontweight="bold", va="center")
    fig.text(GAP_PX * px_w, 1 - 48 * px_h, "    ".join(shown) or "", color=DIM, fontsize=10, va="center")
    fig.text(1 - GAP_PX * px_w, 1 - 22 * px_h,
             f"{t_start:%Y-%m-%d %H:%M:%S} to {t_end:%H:%M:%S} UTC   step {prom_duration(step)}",
             color=DIM, fontsize=10, va="center", ha="right")
    if events:
        # The annotations, numbered as on the dashed lines; as many lines as they need.
        marks = [f"{i}  {e['text']} {dt.datetime.fromtimestamp(e['time'], tz):%H:%M:%S}" for i, e in enumerate(events, 1)]
        lines, line = [], "annotations (dashed lines):"
        for m in marks:
            if len(line) + len(m) > 200:
                lines.append(line)
                line = ""
            line += ("     " if line else "") + m
        lines.append(line)
        for i, text in enumerate(lines):
            fig.text(GAP_PX * px_w, 1 - (66 + 14 * i) * px_h, text, color=ANNOTATION, fontsize=8.5, va="center")

    errors = []
    for p in panels:
        g = p["gridPos"]
        x0 = GAP_PX + g["x"] * col_px
        w = g["w"] * col_px - GAP_PX
        y_top = header_px + g["y"] * (ROW_PX + GAP_PX)
        h = g["h"] * (ROW_PX + GAP_PX) - GAP_PX
        title = p.get("title", "")
        if p.get("type") == "row":
            fig.text(x0 * px_w, 1 - (y_top + 15) * px_h, title, color=TEXT, fontsize=12, fontweight="bold")
            continue
        # The panel: a box with its title, the plot inside, the legend below it.
        box = fig.add_axes([x0 * px_w, 1 - (y_top + h) * px_h, w * px_w, h * px_h])
        box.set_facecolor(PANEL)
        box.set_xticks([])
        box.set_yticks([])
        for s in box.spines.values():
            s.set_color(BORDER)
        box.text(8 / w, 1 - 16 / h, title, color=TEXT, fontsize=10.5, fontweight="bold",
                 transform=box.transAxes, va="center")

        series, panel_errors = [], []
        for t in p.get("targets", []):
            if t.get("hide"):
                continue
            try:
                expr = substitute(t["expr"], variables)
                data = prom.get("/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step})
            except QueryError as e:
                panel_errors.append(f"{t.get('refId', '')}: {e}")
                continue
            for r in data["result"]:
                xs = [dt.datetime.fromtimestamp(float(ts), tz) for ts, _ in r["values"]]
                ys = [float(v) for _, v in r["values"]]
                series.append((legend(t.get("legendFormat"), r["metric"], t["expr"]), xs, ys))
        errors.extend(f"{title}: {e}" for e in panel_errors)

        n_legend = len(series)
        legend_px = 0 if not series else 18 * math.ceil(n_legend / max(1, int(w // 260)))
        plot_left, plot_right = 62, 14
        plot_top, plot_bottom = 30, 24 + legend_px
        ax = fig.add_axes([(x0 + plot_left) * px_w, 1 - (y_top + h - plot_bottom) * px_h,
                           (w - plot_left - plot_right) * px_w, (h - plot_top - plot_bottom) * px_h])
        ax.set_facecolor(PANEL)
        for s in ax.spines.values():
            s.set_visible(False)
        ax.tick_params(colors=DIM, labelsize=8, length=0)
        ax.grid(True, color=BORDER, linewidth=0.6)
        ax.set_xlim(t_start, t_end)
        ax.xaxis.set_major_locator(mdates.MinuteLocator(byminute=range(0, 60, 2), tz=tz))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=tz))
        defaults = p.get("fieldConfig", {}).get("defaults", {})
        unit = defaults.get("unit", "short")
        f = formatter(unit)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos, f=f: f(v)))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, min_n_ticks=3))
        for i, e in enumerate(events, 1):
            at = dt.datetime.fromtimestamp(e["time"], tz)
            ax.axvline(at, color=ANNOTATION, linewidth=0.8, linestyle=(0, (4, 3)), alpha=0.7)
            ax.text(at, 1.0, f" {i}", color=ANNOTATION, fontsize=7, va="top", ha="left",
                    transform=ax.get_xaxis_transform())

        if panel_errors:
            ax.set_yticks([])
            ax.text(0.5, 0.5, "query error:\n" + "\n".join(panel_errors), color="#F2495C", fontsize=9,
                    ha="center", va="center", transform=ax.transAxes, wrap=True)
        elif not series or all(all(math.isnan(y) for y in ys) for _, _, ys in series):
            ax.set_yticks([])
            ax.text(0.5, 0.5, "No data", color=DIM, fontsize=13, ha="center", va="center", transform=ax.transAxes)
        else:
            # Grafana's time series defaults: lines of width 1, no fill, unless the panel says.
            custom = defaults.get("custom", {})
            fill = custom.get("fillOpacity", 0) / 100
            width = custom.get("lineWidth", 1)
            top = 0.0
            for i, (name, xs, ys) in enumerate(series):
                color = PALETTE[i % len(PALETTE)]
                ax.plot(xs, ys, color=color, linewidth=width * 1.2)
                if fill:
                    ax.fill_between(xs, ys, color=color, alpha=fill, linewidth=0)
                top = max([top] + [y for y in ys if not math.isnan(y)])
            lo = defaults.get("min", 0 if top >= 0 else None)
            hi = defaults.get("max")
            if hi is None and top == 0:
                hi = 1
            ax.set_ylim(bottom=lo, top=hi)
            # The legend: Grafana's list mode under the plot.
            per_row = max(1, int(w // 260))
            for i, (name, _, _) in enumerate(series):
                r, c = divmod(i, per_row)
                lx = (x0 + 10 + c * (w - 20) / per_row) * px_w
                ly = 1 - (y_top + h - legend_px + 4 + r * 18 + 6) * px_h
                fig.text(lx, ly, "▬", color=PALETTE[i % len(PALETTE)], fontsize=9, va="center")
                fig.text(lx + 16 * px_w, ly, name, color=TEXT, fontsize=8.5, va="center")

    caption = [
        "The dashboard's own queries (charts/monsoon/dashboards/monsoon.json) evaluated by a real Prometheus "
        f"{prom.version()} over a real run of monsoon against the stand-ins (SecantusDB as MongoDB, noida-db as "
        "Elasticsearch);",
        "drawn by tools/dashboard/render.py because Grafana cannot run here.",
    ]
    if note:
        caption.append(note[0].upper() + note[1:] + ".")
    for i, line in enumerate(caption):
        fig.text(GAP_PX * px_w, (footer_px - 12 - 16 * i) * px_h, line, color=DIM, fontsize=8.5, va="center")
    fig.savefig(out, dpi=DPI, facecolor=BG)
    return errors


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--start", type=float, required=True)
    ap.add_argument("--end", type=float, required=True)
    ap.add_argument("--step", type=float, default=0, help="seconds; default: the scrape interval")
    ap.add_argument("--dashboard", default=str(ROOT / "charts/monsoon/dashboards/monsoon.json"))
    ap.add_argument("--events", help="JSON list of {time, text} drawn as annotations")
    ap.add_argument("--note", default="", help="a line under the caption: what ran")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    prom = Prometheus(args.prometheus)
    dashboard = json.loads(Path(args.dashboard).read_text())
    # Grafana's step is the range over the panel's width in pixels, never below the data
    # source's scrape interval; for a run of minutes on a half-width panel that is the latter.
    step = args.step or prom.scrape_interval()
    events = json.loads(Path(args.events).read_text()) if args.events else []
    errors = draw(dashboard, prom, args.start, args.end, step, events, args.note, args.out)
    for e in errors:
        print(f"render.py: query refused by Prometheus (a bug in the dashboard): {e}", file=sys.stderr)
    print(f"render.py: wrote {args.out}")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
