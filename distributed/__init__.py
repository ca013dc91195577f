"""Pipeline (default) or tensor parallelism across hosts over `mx.distributed` (installed as
`k2mlx.distributed`).

Modules
- `hosts`: host parsing, cluster files, `ClusterSpec` (one JSON env var per rank).
- `health`: heartbeats with a deadline on a side TCP channel; any lost rank stops every rank
  with a ClusterError naming host and rank (exit code 3).
- `pipeline`: `PipelineModel` (rank 0) and `worker_loop` (other ranks); wire format in its doc.
- `remote_cache`: rank 0's stand-ins for remote layers' KV caches (ops replayed remotely).
- `launch`: start/watch/stop ranks (local processes or `ssh -tt`); `python -m k2mlx.distributed.launch`.
- `rank`: the entry point of one rank; `preflight`: ssh checks; `cli`: `--hosts` and `cluster`.
- `scenarios`: engine-free rank-0 roles used by the tests and `scripts/bench_pipeline.py`.
- `tensor`: `--parallel tensor` (1/N of every layer per rank, two all_sums per layer;
  `TensorModel` on rank 0, lock-step workers); `slices`: each tensor rank reads only its slices;
  `tensor_plan`: `k2mlx plan --parallel tensor`.
- `state`: one state file per running cluster (claimed exclusively; `cluster status/down`).

How the engine drives it (rank 0)
- Unchanged: `PipelineModel` has `__call__(tokens, cache) -> logits` and `make_cache()`; mlx-lm's
  `BatchGenerator` cache calls (merge, extend, filter, extract, trim, prepare, finalize,
  deepcopy) work on the returned cache list. Output equals the single process (tested to 1e-5).
- Overlap (a second Mac adds throughput): the engine (`k2mlx/engine/overlap.py`) keeps
  `pipe.stages` independent groups of sequences (each its own BatchGenerator and cache list)
  and steps them alternately with the two-phase API:

      pa = pipe.submit(tokens_a, cache_a)   # rank 0's layers for A, sent on; returns at once
      pb = pipe.submit(tokens_b, cache_b)   # rank 0 computes B while rank 1 computes A
      la = pa.result()                      # logits of A; sample, then submit A's next step
      pa = pipe.submit(next_a, cache_a)
      lb = pb.result() ...

  Results come back in submit order. Do not touch a group's caches while its step is in flight.
  Each step's header carries the last step rank 0 had collected; workers keep it (`stats()`
  "seen"), a record that steps really overlapped on the wire.
- Prefill: a call with L > 1 returns only the last position's logits, [B, 1, vocab] (computed
  and sent back for that position only; mlx-lm's BatchGenerator discards prefill logits anyway).
  Set `pipe.full_logits = True` (or `submit(..., last_only=False)`) for every position.
"""
