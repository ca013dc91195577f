"""The persistent prefix cache (k2mlx/engine/disk_cache.py) on the tiny K2 checkpoint: what is
read back is exactly what a fresh prefill computes, a restart hits, and bad, foreign, raced or
half-written files never load."""
from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from k2mlx.engine.disk_cache import DiskPrefixCache, chain_hashes, decode_block, kv_arrays, kv_caches, model_identity
from k2mlx.engine.events import Done, TextDelta
from k2mlx.engine.request import GenerationRequest, SamplingParams

BLOCK = 16


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    from k2mlx import load

    return load(tiny_checkpoint)


@pytest.fixture(scope="module")
def identity(loaded, tiny_checkpoint):
    model = loaded[0]
    return model_identity(tiny_checkpoint, model.args, model.layer_range)


def layers_of(model) -> list[int]:
    return list(model.layer_range)


def make_disk(tmp_path, model, identity, **kw) -> DiskPrefixCache:
    kw.setdefault("block", BLOCK)
    return DiskPrefixCache(tmp_path / "pc", kw.pop("max_bytes", 1 << 30), identity, layers_of(model), **kw)


def prompt_tokens(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(10, 400, size=n)]


def stored(tmp_path, model, identity, toks):
    """A disk cache holding toks' blocks (written and flushed), and the cache they came from."""
    _, cache = prefill(model, toks)
    disk = make_disk(tmp_path, model, identity)
    disk.save(toks, kv_arrays(cache))
    disk.flush()
    return disk, cache


def prefill(model, tokens):
    import mlx.core as mx

    cache = model.make_cache()
    logits = model(mx.array([tokens]), cache=cache)
    mx.eval(logits)
    return logits, cache


def test_blocks_read_back_exactly_and_continue_like_a_fresh_prefill(tmp_path, loaded, identity):
    import mlx.core as mx

    model = loaded[0]
    toks = prompt_tokens(5 * BLOCK + 3)
    full, _ = prefill(model, toks)                      # [1, L, V] reference, no cache
    _, cache = prefill(model, toks[:4 * BLOCK + 7])
    disk = make_disk(tmp_path, model, identity)
    assert disk.save(toks[:4 * BLOCK + 7], kv_arrays(cache)) == 4  # whole blocks only
    disk.flush()
    n, kv = disk.lookup(toks, limit=len(toks) - 1)
    assert n == 4 * BLOCK
    for (k, v), c in zip(kv, cache):               # bit-exact round trip of the latent cache
        assert mx.array_equal(k, c.keys[..., :n, :]) and mx.array_equal(v, c.values[..., :n, :])
    rest = model(mx.array([toks[n:]]), cache=kv_caches(kv))  # [1, L - n, V]
    err = mx.abs(rest - full[:, n:]).max().item() / mx.abs(full).max().item()
    assert err < 1e-5
    disk.close()


def test_restart_hits_and_usage_reports_cached_tokens(tmp_path, loaded, identity):
    from k2mlx.engine import Engine

    model, tok = loaded
    toks = prompt_tokens(6 * BLOCK + 5, seed=1)

    def ask(engine):
        r = GenerationRequest(prompt_tokens=toks, max_tokens=12, sampling=SamplingParams(temperature=0.0),
                              parse=False)
        events = list(engine.generate(r))
        return "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]

    cold = Engine(model, tok, max_batch=1, cache_bytes=0)
    try:
        ref_text, ref_done = ask(cold)
    finally:
        cold.close()
    assert ref_done.usage.cached_tokens == 0
    for restart in range(2):  # the first run writes, the second (a "restarted server") reads
        eng = Engine(model, tok, max_batch=1, cache_bytes=0, prompt_cache=make_disk(tmp_path, model, identity))
        try:
            text, done = ask(eng)
        finally:
            eng.close()
        assert text == ref_text
        assert done.usage.cached_tokens == (0 if restart == 0 else 6 * BLOCK)


def test_garbled_truncated_and_linked_files_are_removed_and_never_used(tmp_path, loaded, identity, caplog):
    model = loaded[0]
    toks = prompt_tokens(4 * BLOCK, seed=2)
    disk, cache = stored(tmp_path, model, identity, toks)
    chains = chain_hashes(identity, toks, BLOCK)
    paths = [disk.folder / (c + ".kvblock") for c in chains]
    data = bytearray(paths[1].read_bytes())
    data[-5] ^= 0xFF                                    # one flipped byte in block 1's data
    paths[1].write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="k2mlx.engine.disk_cache"):
        n, _ = disk.lookup(toks + [1])
    assert n == BLOCK and not paths[1].exists() and "digest" in caplog.text
    paths[2].write_bytes(paths[2].read_bytes()[:-7])    # truncated
    outside = tmp_path / "secret"
    outside.write_bytes(paths[0].read_bytes())
    paths[3].unlink()
    paths[3].symlink_to(outside)                        # planted link: never followed
    disk.save(toks, kv_arrays(cache))                   # block 1 is written again
    disk.flush()
    n, _ = disk.lookup(toks + [1])
    assert n == 2 * BLOCK and not paths[2].exists()
    assert disk.bad_files >= 2
    assert outside.exists()
    disk.close()


def test_another_model_or_quantization_never_hits(tmp_path, loaded, identity, tiny_checkpoint):
    model = loaded[0]
    toks = prompt_tokens(3 * BLOCK, seed=3)
    disk, _ = stored(tmp_path, model, identity, toks)
    other = [
        model_identity(tiny_checkpoint, model.args, model.layer_range, {"bits": 4, "group_size": 64}),
        model_identity(tiny_checkpoint, model.args, range(0, 1)),
        model_identity(None, model.args, model.layer_range),
    ]
    for ident in other:
        assert ident != identity
        d = make_disk(tmp_path, model, ident)
        assert d.lookup(toks + [1]) == (0, None)
        d.close()
    # a file copied into another model's folder under the right name is refused by its metadata
    foreign = make_disk(tmp_path, model, other[0])
    src = disk.folder / (chain_hashes(identity, toks, BLOCK)[0] + ".kvblock")
    dst = foreign.folder / (chain_hashes(other[0], toks, BLOCK)[0] + ".kvblock")
    dst.write_bytes(src.read_bytes())
    assert foreign.lookup(toks + [1]) == (0, None) and not dst.exists()
    foreign.close()
    disk.close()


def test_two_caches_sharing_a_folder_do_not_corrupt_each_other(tmp_path, loaded, identity):
    model = loaded[0]
    seqs = [prompt_tokens(4 * BLOCK, seed=s) for s in range(4)]
    caches = [kv_arrays(prefill(model, s)[1]) for s in seqs]
    a, b = make_disk(tmp_path, model, identity), make_disk(tmp_path, model, identity)

    # both writer threads write the same blocks at once (saves queue on this thread: MLX arrays
    # are evaluated only on the thread that made them)
    for i in range(4):
        a.save(seqs[i], caches[i])
        b.save(seqs[3 - i], caches[3 - i])
    a.flush()
    b.flush()
    for s in seqs:
        for d in (a, b):
            assert d.lookup(s + [1])[0] == 4 * BLOCK
    assert a.bad_files == b.bad_files == 0
    a.close()
    b.close()


def test_size_budget_evicts_least_recently_used(tmp_path, loaded, identity):
    model = loaded[0]
    seqs = [prompt_tokens(2 * BLOCK, seed=10 + s) for s in range(6)]
    caches = [kv_arrays(prefill(model, s)[1]) for s in seqs]
    probe = make_disk(tmp_path / "probe", model, identity)
    probe.save(seqs[0], caches[0])
    probe.flush()
    per_block = probe.nbytes // 2
    probe.close()
    disk = make_disk(tmp_path, model, identity, max_bytes=5 * per_block)
    for s, c in zip(seqs, caches):
        disk.save(s, c)
        disk.flush()
        time.sleep(0.01)  # distinct mtimes
    assert disk.nbytes <= 5 * per_block
    assert disk.lookup(seqs[-1] + [1])[0] == 2 * BLOCK   # newest kept
    assert disk.lookup(seqs[0] + [1])[0] == 0            # oldest gone
    disk.close()


def test_kill_during_writes_leaves_nothing_that_loads(tmp_path, loaded, identity, tiny_checkpoint):
    """A writer process is SIGKILLed while it writes; every block file left either decodes or is
    absent, and the next cache removes the dead writer's temporary files."""
    root = tmp_path / "pc"
    code = textwrap.dedent(f"""
        import numpy as np, mlx.core as mx
        from k2mlx import load
        from k2mlx.engine.disk_cache import DiskPrefixCache, kv_arrays
        model, _ = load({str(tiny_checkpoint)!r})
        d = DiskPrefixCache({str(root)!r}, 1 << 30, {identity!r}, list(model.layer_range), block={BLOCK})
        print("ready", flush=True)
        i = 0
        while True:
            toks = [int(t) for t in np.random.default_rng(i).integers(10, 400, size=8 * {BLOCK})]
            c = model.make_cache()
            model(mx.array([toks]), cache=c)
            d.save(toks, kv_arrays(c))
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 120
        while not list(root.glob("*/*.kvblock")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # well inside the stream of writes
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    model = loaded[0]
    folder = next(p for p in root.iterdir() if p.is_dir())
    files = [f for f in folder.iterdir() if f.suffix == ".kvblock"]
    assert files, "the writer wrote nothing"
    for f in files:
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        meta = json.loads(raw[8:8 + n])["__metadata__"]
        meta_tokens = [int(t) for t in meta["tokens"].split(",")]
        decode_block(raw, identity, f.stem, meta_tokens, layers_of(model))  # raises if not whole
    d = make_disk(tmp_path, model, identity)  # a dead writer's temporary files are removed
    assert not [f for f in folder.iterdir() if f.name.startswith(".tmp-")]
    d.close()
