"""The status bar (model, prefill/decode tok/s of the last reply, context used of the limit)
and the cluster panel (hosts, ranks, layers, memory, health) shown when attached to a cluster."""
from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from k2mlx.tui.messages import ReplyStats


def _k(n: int) -> str:
    return f"{n / 1000:.1f}k" if n >= 10_000 else str(n)


def _gb(v) -> str:
    if isinstance(v, (int, float)):
        if v >= 2**30:
            return f"{v / 2**30:.1f} GB"
        return f"{v / 2**20:.0f} MB" if v >= 2**20 else f"{v:g}"
    return str(v) if v is not None else "?"


class StatusBar(Static):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.model = "connecting…"
        self.state = ""
        self.stats: ReplyStats | None = None
        self.limit: int | None = None
        self.tools = 0
        self.extra = ""

    def on_resize(self) -> None:
        self.update(self.render_text())

    def set(self, **fields) -> None:
        for k, v in fields.items():
            setattr(self, k, v)
        self.update(self.render_text())

    def _fields(self, short: bool) -> list[tuple[str, str]]:
        s = self.stats
        if s is None:
            speed = ("pf – · dec – t/s" if short else "prefill – · decode – tok/s", "dim")
        else:
            mark = "" if s.measured == "server" else "~"
            pf, dec = f"{mark}{_k(round(s.prefill_tps))}", f"{mark}{s.decode_tps:.1f}"
            speed = (f"pf {pf} · dec {dec} t/s" if short else f"prefill {pf} · decode {dec} tok/s", "")
        used = s.context_used if s else 0
        if self.limit:
            pct = 100 * used / self.limit
            ctx = (f"ctx {_k(used)}/{_k(self.limit)}" + ("" if short else f" ({pct:.0f}%)"), "red" if pct > 90 else "")
        else:
            ctx = (f"ctx {_k(used)}", "")
        fields = [speed, ctx, (f"tools {self.tools}" if self.tools else "tools off", "")]
        if s is not None and s.constrained:  # the last reply was held to the tools' schemas
            fields.append(("schema" if short else "schema-checked", "green"))
        return fields + ([(self.extra, "")] if self.extra else [])

    def render_text(self) -> Text:
        """Every field fits the bar's width: long forms where they fit (model name up to 24
        characters kept), else short ones, and the model name gives way last."""
        width = self.size.width
        sep = " │ "
        state = len(f" {self.state}") if self.state else 0
        fields = self._fields(short=False)
        rest = state + sum(len(sep) + len(f) for f, _ in fields)
        if width and min(len(self.model), 24) + 2 + rest > width:
            fields = self._fields(short=True)
            rest = state + sum(len(sep) + len(f) for f, _ in fields)
        model = self.model
        if width and len(model) + 2 + rest > width:
            room = max(6, width - rest - 2)
            model = model if len(model) <= room else model[:room - 1] + "…"
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(f" {model} ", style="bold reverse")
        if self.state:
            t.append(f" {self.state}", style="yellow")
        for text, style in fields:
            t.append(sep, style="dim")
            t.append(text, style=style)
        return t


class ClusterPanel(Static):
    """Fed with the JSON of GET /v1/cluster; accepts `hosts` or `ranks` lists of dicts."""

    def show_info(self, info: dict | None) -> None:
        self.update(cluster_renderable(info))


def cluster_renderable(info: dict | None):
    """Rich renderable of a cluster snapshot (None: not attached)."""
    if not info:
        return Text("not attached to a cluster", style="dim")
    rows = info.get("ranks") or info.get("hosts") or info.get("nodes") or []
    table = Table(box=None, padding=(0, 1), expand=True, show_edge=False)
    table.add_column("#", style="dim", no_wrap=True)
    table.add_column("host", no_wrap=True, overflow="ellipsis", max_width=14)
    for col in ("layers", "mem", "health"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        layers = r.get("layers")
        if isinstance(layers, (list, tuple)) and len(layers) == 2:
            layers = f"{layers[0]}–{layers[1] - 1}"  # [first, end): k2mlx.distributed's ranges
        mem = r.get("memory") or r.get("memory_bytes") or r.get("mem")
        if isinstance(mem, dict):  # k2mlx.distributed health snapshot: mlx_active / peak_rss bytes
            used = mem.get("mlx_active") or mem.get("used") or mem.get("active") or mem.get("peak_rss")
            total = mem.get("total") or mem.get("limit")
            mem = f"{_gb(used)}/{_gb(total)}" if total else _gb(used)
        else:
            mem = _gb(mem)
        health = str(r.get("health") or r.get("status") or "?")
        style = "green" if health in ("ok", "healthy", "up") else "red"
        table.add_row(str(r.get("rank", "?")), str(r.get("host", "?")), str(layers if layers is not None else "?"),
                      mem, Text(health, style=style))
    backend = f" · {info['backend']}" if info.get("backend") else ""
    title = Text(f"cluster{backend} · {len(rows)} ranks\n", style="bold")
    if info.get("error"):
        title.append(f"{info['error']}\n", style="red")
    from rich.console import Group

    return Group(title, table)
