"""GET /metrics in Prometheus' text exposition format.

HTTP requests are counted by route template (`/v1/models/{model_id:path}`), never by raw path,
with one label for every path no route serves, so the series are bounded by the app's routes
times the status codes, and no request can choose a label's text."""
from __future__ import annotations


class HttpCounters:
    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}

    def note(self, route: str, status: int) -> None:
        key = (route, int(status) if 100 <= int(status) <= 599 else 0)
        self.requests[key] = self.requests.get(key, 0) + 1


def escape(value) -> str:
    """A label value as the text format requires: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _line(out: list, name: str, kind: str, help_: str, samples) -> None:
    out.append(f"# HELP {name} {help_}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        lab = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
        out.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")


def render(engine, http: HttpCounters) -> str:
    s, pc = engine.stats, engine.prefix_cache
    out: list[str] = []
    _line(out, "k2mlx_http_requests_total", "counter", "HTTP requests by route and status",
          [({"route": p, "status": st}, n) for (p, st), n in sorted(http.requests.items())])
    _line(out, "k2mlx_requests_total", "counter", "generation requests accepted by the engine", [({}, s.requests)])
    _line(out, "k2mlx_requests_finished_total", "counter", "generation requests finished, by reason",
          [({"reason": r}, n) for r, n in sorted(s.finished.items())])
    _line(out, "k2mlx_prompt_tokens_total", "counter", "prompt tokens submitted", [({}, s.prompt_tokens)])
    _line(out, "k2mlx_generation_tokens_total", "counter", "tokens generated", [({}, s.generated_tokens)])
    _line(out, "k2mlx_generation_tokens_per_second", "gauge", "decode throughput over the last 5 s",
          [({}, round(s.tokens_per_second, 3))])
    _line(out, "k2mlx_queue_depth", "gauge", "requests waiting for a batch slot", [({}, max(0, s.queue_depth))])
    _line(out, "k2mlx_active_slots", "gauge", "sequences in the running batch", [({}, s.active)])
    _line(out, "k2mlx_max_slots", "gauge", "batch size limit", [({}, engine.max_batch)])
    _line(out, "k2mlx_prefix_cache_hits_total", "counter", "requests that reused a cached prefix", [({}, pc.hits)])
    _line(out, "k2mlx_prefix_cache_misses_total", "counter", "requests with no cached prefix", [({}, pc.misses)])
    _line(out, "k2mlx_prefix_cache_tokens_total", "counter", "prompt tokens served from the prefix cache",
          [({}, pc.cached_tokens)])
    _line(out, "k2mlx_prefix_cache_bytes", "gauge", "bytes held by the prefix cache", [({}, pc.nbytes)])
    _line(out, "k2mlx_up", "gauge", "1 while the model can serve", [({}, 0 if engine.failure else 1)])
    return "\n".join(out) + "\n"
