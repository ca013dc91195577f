"""The one place that decides how a model's MoE layers run, once, at load.

    configure(model, path=None)   # called by k2mlx.loading.load_model

`path` (or K2MLX_MOE_PATH when it is None) is validated here, before any work:
  auto (default)  "switch" (the model's own switch_mlp call: MLX's gather_qmm, what mlx-lm
                  runs) unless the kernels were measured on this machine, with this layer's
                  dtype, bits, group size and expert shapes, to agree with the reference and
                  be faster at 1 token and at small batches (k2mlx.kernels.probe). The result
                  is cached in $K2MLX_CACHE/moe-path.json (default ~/.cache/k2mlx), keyed by
                  chip, OS, MLX version, backend, kernel sources and shape, so the timed run
                  (a few seconds) happens once per machine and shape.
  switch | reference | kernel   forced. "kernel" is refused at load where it cannot run.
On the CPU "auto" is "switch" at once: the kernels are Metal/CUDA. The C++ twin of their
bodies (k2mlx.kernels.cpp) is a correctness tool for tests and `k2mlx selftest`, never a
runtime path. The choice lands on each MoE layer's `plan` and on `model.moe_plan` (shown by
`k2mlx selftest`); the forward pass only reads the plan.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from k2mlx.errors import K2Error
from k2mlx.kernels.cachedir import cache_root
from k2mlx.kernels.dispatch import LayerPlan
from k2mlx.kernels.launch import NSG, ROWS, TT, dims, gpu_backend, kernel_unsupported
from k2mlx.kernels.reference import Experts
from k2mlx.kernels.router import router_unsupported
from k2mlx.kernels.sources import SRC

log = logging.getLogger(__name__)

PATHS = ("auto", "switch", "reference", "kernel")
ENV = "K2MLX_MOE_PATH"
CACHE_FILE = "moe-path.json"
CACHE_FORMAT = 1
MAX_CACHE_BYTES = 1 << 20


@dataclass
class Decision:
    """The choice for one kind of layer (one shape): experts and router paths, and why."""

    experts: str
    router: str
    source: str  # "cpu", "override", "unsupported", "measured", "cache"
    reason: str
    layers: list[str] = field(default_factory=list)
    key: str | None = None

    def summary(self) -> str:
        return f"experts {self.experts}, router {self.router} ({self.source}: {self.reason})"


@dataclass
class MoePlan:
    requested: str
    backend: str | None
    decisions: list[Decision]

    def summary(self) -> str:
        if not self.decisions:
            return "no MoE layers"
        return "; ".join(f"{len(d.layers)} layers: {d.summary()}" for d in self.decisions)


def requested_path(path: str | None = None) -> str:
    """The path asked for (argument, else K2MLX_MOE_PATH, else auto), validated."""
    if path is None:
        path, where = os.environ.get(ENV, "auto"), ENV
    else:
        where = "moe_path"
    path = path.strip().lower()
    if path not in PATHS:
        raise K2Error(f"{where} must be one of {', '.join(PATHS)}, not {path!r}")
    return path


# ---- the cache key ----

def chip() -> str:
    import mlx.core as mx

    try:
        return str(mx.device_info().get("device_name") or platform.processor() or platform.machine())
    except (AttributeError, RuntimeError):  # an MLX without device_info
        return platform.processor() or platform.machine()


def os_name() -> str:
    mac = platform.mac_ver()[0]
    return f"macOS {mac}" if mac else f"{platform.system()} {platform.release()}"


@lru_cache(maxsize=1)
def kernels_hash() -> str:
    """Kernel sources and launch constants: a changed kernel is measured again."""
    h = hashlib.sha256(f"TT={TT} ROWS={ROWS} NSG={NSG}".encode())
    for f in sorted(SRC.iterdir()):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def shape_of(moe) -> dict:
    """What the probe's result depends on in one MoE layer."""
    ex = Experts.of(moe.switch_mlp)
    E, D, I, gs, bits = dims(ex)
    if not ex.quantized:
        gs = bits = None
    g = moe.gate
    dtype = (ex.gate.scales if ex.gate.quantized else ex.gate.weight).dtype
    return {"dtype": str(dtype).rsplit(".", 1)[-1], "bits": bits, "group_size": gs,
            "mode": ex.gate.mode, "experts": E, "hidden": D, "expert_size": I, "top_k": g.top_k,
            "n_group": g.n_group, "topk_group": g.topk_group,
            "router_dtype": str(g.weight.dtype).rsplit(".", 1)[-1]}


def cache_key(backend: str, shape: dict) -> str:
    import mlx.core as mx

    return json.dumps({"chip": chip(), "os": os_name(), "mlx": mx.__version__, "backend": backend,
                       "kernels": kernels_hash(), **shape}, sort_keys=True)


# ---- the cache file: read leniently (anything odd is ignored with a warning), written atomically ----

def read_cache(path: Path | None = None) -> dict[str, dict]:
    path = path or cache_root() / CACHE_FILE
    try:
        if not path.exists():
            return {}
        if not path.is_file() or path.stat().st_size > MAX_CACHE_BYTES:
            raise ValueError("not a regular file of at most 1 MB")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
            raise ValueError(f"not a k2mlx MoE-path cache (format {CACHE_FORMAT})")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        log.warning("k2mlx: ignoring the MoE-path cache %s (%s); it will be measured again", path, e)
        return {}
    good = {}
    for k, v in data["entries"].items():
        if (isinstance(v, dict) and v.get("experts") in ("switch", "kernel")
                and v.get("router") in ("compiled", "kernel") and isinstance(v.get("reason"), str)):
            good[k] = v
        else:
            log.warning("k2mlx: ignoring a malformed entry in the MoE-path cache %s", path)
    return good


def write_cache_entry(key: str, entry: dict, path: Path | None = None) -> None:
    path = path or cache_root() / CACHE_FILE
    entries = read_cache(path)
    entries[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"format": CACHE_FORMAT, "entries": entries}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:  # a read-only home is no reason to fail a load: measure next time
        log.warning("k2mlx: could not write the MoE-path cache %s", path, exc_info=True)


# ---- deciding ----

_decided: dict[str, Decision] = {}  # this process: a second load does not re-read or re-measure


def measured_decision(moe, backend: str, budget_s: float = 3.0, use_cache: bool = True,
                      timed=None) -> Decision:
    """The auto decision for a layer like `moe` on `backend`: from the cache, or measured
    (then cached). `backend` "cpp" (the C++ twin) and fewer `timed` batch sizes than
    probe.TIMED_TOKENS are for tests (the twin takes seconds per call)."""
    from k2mlx.kernels import probe

    key = cache_key(backend, shape_of(moe))
    if use_cache and key in _decided:
        return _decided[key]
    entry = read_cache().get(key) if use_cache else None
    if entry is not None:
        d = Decision(entry["experts"], entry["router"], "cache", entry["reason"], key=key)
    else:
        g = moe.gate
        t0 = time.perf_counter()
        timed = timed or probe.TIMED_TOKENS
        m = probe.measure_experts(moe.switch_mlp, g.top_k, backend, budget_s * 0.8, timed)
        use_k, why = probe.decide_experts(m)
        r_why = router_unsupported(g.weight.shape[0], g.top_k, g.n_group, g.topk_group)
        if r_why is None:
            rm = probe.measure_router(g.weight.shape[0], g.top_k, g.n_group, g.topk_group,
                                      g.routed_scaling_factor, g.norm_topk_prob, g.weight.dtype,
                                      backend, budget_s * 0.2, timed)
            use_r, r_why = probe.decide_router(rm)
        else:
            use_r, rm = False, {}
        reason = f"{why}; {r_why}; measured in {time.perf_counter() - t0:.1f} s"
        d = Decision("kernel" if use_k else "switch", "kernel" if use_r else "compiled",
                     "measured", reason, key=key)
        log.info("k2mlx: MoE path on %s: %s", backend, d.summary())
        if use_cache:
            write_cache_entry(key, {"experts": d.experts, "router": d.router, "reason": reason,
                                    "measured": {"experts": m, "router": rm},
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    _decided[key] = d
    return d


def _decide(moe, requested: str, backend: str | None) -> Decision:
    ex = Experts.of(moe.switch_mlp)
    why_not = kernel_unsupported(ex)
    if requested in ("switch", "reference"):
        return Decision(requested, "compiled", "override", f"{requested} asked for")
    if requested == "kernel":
        if backend is None:
            raise K2Error("MoE path 'kernel' needs Metal or CUDA; this MLX runs on the CPU")
        if why_not:
            raise K2Error(f"MoE path 'kernel': the expert kernels cannot run this model: {why_not}")
        g = moe.gate
        r = "kernel" if router_unsupported(g.weight.shape[0], g.top_k, g.n_group, g.topk_group) is None else "compiled"
        return Decision("kernel", r, "override", "kernel asked for")
    if backend is None:
        return Decision("switch", "compiled", "cpu", "MLX runs on the CPU; the kernels are Metal/CUDA")
    if why_not:
        return Decision("switch", "compiled", "unsupported", why_not)
    return measured_decision(moe, backend)


def moe_layers(model):
    """(name, module) of every MoE layer: modules carrying a LayerPlan and routed experts."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "plan", None), LayerPlan) and "switch_mlp" in m]


def configure(model, path: str | None = None, backend: str | None = None) -> MoePlan:
    """Decide every MoE layer's path once and set it on the layer (and `model.moe_plan`).
    `backend`: the kernels' backend (default: this machine's GPU, or none on the CPU)."""
    requested = requested_path(path)
    backend = backend or gpu_backend()
    decisions: dict[str, Decision] = {}
    for name, moe in moe_layers(model):
        sig = json.dumps(shape_of(moe), sort_keys=True)
        if sig not in decisions:
            d = _decide(moe, requested, backend)
            decisions[sig] = Decision(d.experts, d.router, d.source, d.reason, key=d.key)
        d = decisions[sig]
        d.layers.append(name)
        p = moe.plan
        p.experts, p.router, p.name = d.experts, d.router, name
        p.backend = backend if "kernel" in (d.experts, d.router) else None
        p.experts_ran = p.router_ran = False
    plan = MoePlan(requested, backend, list(decisions.values()))
    model.moe_plan = plan
    return plan
