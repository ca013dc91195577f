"""A role for tests of the disk prompt cache on a pipeline (disk_pipeline.py): what a server's
engine does, with the disk cache opened the way `k2mlx serve` opens it (`open_disk_cache`), run
on rank 0 of a cluster (`--role k2mlx.distributed.disk_scenarios:disk_cache_logprobs`) or on a
local model."""
from __future__ import annotations

import argparse
import json


def disk_cache_logprobs(pipe, tokenizer, *, out: str, prompts: list[list[int]], prompt_cache_dir: str | None = None,
                        prompt_cache_gb: float = 1.0, prompt_cache_block: int = 256, no_prompt_cache: bool = False,
                        model: str | None = None, spec=None, **_) -> int:
    """Each prompt once, in order, with the in-memory prefix cache off (so a hit can only come
    from disk): the top-5 logprobs of its first 4 greedy tokens and its cached-token count."""
    from k2mlx.commands.serve import open_disk_cache
    from k2mlx.engine.engine import Engine
    from k2mlx.engine.events import Done, TextDelta
    from k2mlx.engine.request import GenerationRequest, SamplingParams

    ns = argparse.Namespace(prompt_cache_dir=prompt_cache_dir, prompt_cache_gb=prompt_cache_gb,
                            no_prompt_cache=no_prompt_cache, prompt_cache_block=prompt_cache_block)
    disk = open_disk_cache(ns, pipe, spec.model if spec is not None else model)
    ban = {t: -100.0 for t in tokenizer.eos_token_ids}
    res: dict = {"runs": []}
    eng = Engine(pipe, tokenizer, max_batch=4, cache_bytes=0, overlap=False, prompt_cache=disk)
    try:
        for p in prompts:
            req = GenerationRequest(prompt_tokens=p, max_tokens=4, parse=False, logprobs=True, top_logprobs=5,
                                    sampling=SamplingParams(temperature=0.0, logit_bias=ban))
            evs = list(eng.generate(req))
            if not isinstance(evs[-1], Done) or evs[-1].error is not None:
                raise RuntimeError(f"request failed: {evs[-1]}")
            rows = [lp for e in evs if isinstance(e, TextDelta) and e.logprobs for lp in e.logprobs]
            res["runs"].append({"logprobs": [[lp, [v for _, v in tops]] for _, lp, tops in rows],
                                "cached": evs[-1].usage.cached_tokens})
        res["stats"] = disk.stats() if disk is not None else None
    finally:
        eng.close()  # writes the queued blocks (and, on a pipeline, sends the last save ops)
    with open(out, "w") as f:
        json.dump(res, f)
    return 0

