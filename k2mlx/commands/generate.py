"""`k2mlx generate`: stream one completion to stdout; speed and memory to stderr."""
from __future__ import annotations

import argparse

from k2mlx.commands.flags import number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint folder (default: the embedded k2-nano model)")
    parser.add_argument("--prompt", default="Hello! Who are you?", help="the user message (or raw text with --raw)")
    parser.add_argument("--system", help="a system message")
    parser.add_argument("--max-tokens", type=number(1, kind=int), default=256,
                        help="most tokens to generate (default 256)")
    parser.add_argument("--temp", type=number(0, 2), default=0.6,
                        help="sampling temperature, 0..2; 0 is greedy (default 0.6)")
    parser.add_argument("--top-p", type=number(0, 1, above=True), default=1.0,
                        help="nucleus sampling mass, above 0 up to 1 (default 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat format")
    parser.add_argument("--hosts", help="run as a pipeline over these hosts: a comma list (rank order) or a "
                        "cluster file; see `k2mlx cluster`")
    from k2mlx.distributed.cli import add_parallel_argument

    add_parallel_argument(parser)
    parser.add_argument("--show-reasoning", action="store_true", help="print <think> reasoning (dimmed) too")


def run(args) -> int:
    import sys

    from k2mlx.events import Done, ParseWarning, PrefillProgress, ReasoningDelta, TextDelta, ToolCallBegin, ToolCallEnd
    from k2mlx.engine.request import GenerationRequest, SamplingParams

    if getattr(args, "hosts", None):  # pipeline over several hosts (k2mlx.distributed)
        from k2mlx.distributed.cli import run_on_cluster

        return run_on_cluster(args, "generate")
    path = args.model
    if path is None:
        from k2mlx.loading.resolve import default_model_path

        path = str(default_model_path())
    from k2mlx import load
    from k2mlx.engine import Engine

    model, tokenizer = getattr(args, "preloaded", None) or load(path)
    engine = Engine(model, tokenizer, max_batch=1, cache_bytes=0)
    sampling = SamplingParams(temperature=args.temp, top_p=args.top_p, seed=args.seed)
    out, err = sys.stdout, sys.stderr
    bar = ProgressBar(err) if err.isatty() else None  # a bar only where a person watches
    if args.raw:
        req = GenerationRequest(prompt=args.prompt, max_tokens=args.max_tokens, sampling=sampling,
                                progress=bar is not None)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        req = GenerationRequest(messages=messages, max_tokens=args.max_tokens, sampling=sampling,
                                progress=bar is not None)
    done = None
    try:
        for ev in engine.generate(req):
            if isinstance(ev, PrefillProgress):
                bar.update(ev)
                continue
            if bar is not None:
                bar.clear()
            if isinstance(ev, TextDelta):
                out.write(ev.text)
                out.flush()
            elif isinstance(ev, ReasoningDelta) and args.show_reasoning:
                out.write(f"\x1b[2m{ev.text}\x1b[0m" if out.isatty() else ev.text)
                out.flush()
            elif isinstance(ev, ToolCallBegin):
                out.write(f"\n[tool call {ev.id}: {ev.name}(")
            elif isinstance(ev, ToolCallEnd):
                out.write(f"{ev.arguments})]\n")
            elif isinstance(ev, ParseWarning):
                print(f"warning: {ev.message}", file=err)
            elif isinstance(ev, Done):
                done = ev
    except KeyboardInterrupt:
        engine.close()
        print("\ninterrupted", file=err)
        return 130
    engine.close()
    out.write("\n")
    out.flush()
    if done is not None:
        t = done.timings
        print("=" * 10, file=err)
        print(f"prompt: {_tokens(t.prompt_tokens)}{_rate(t.prefill_tps, t.prompt_tokens, 'prefill')}", file=err)
        # the first token comes out of prefill: a decode rate needs at least two
        print(f"generation: {_tokens(t.generated_tokens)}"
              f"{_rate(t.decode_tps, t.generated_tokens - 1, 'decode')}", file=err)
        print(f"peak memory: {t.peak_memory_bytes / 1e9:.3f} GB", file=err)
        print(f"finish: {done.finish_reason}", file=err)
        if done.error:
            print(f"error: {done.error}", file=err)
            return 1
    return 0


class ProgressBar:
    """One self-rewriting stderr line while a long prompt is read: tokens done / total and the
    time left. Drawn only for prompts of several chunks (short ones finish before a person
    could read it); cleared before the reply starts."""

    MIN_TOKENS = 1024

    def __init__(self, stream):
        self.stream, self.shown = stream, False

    def update(self, ev) -> None:
        if ev.total < self.MIN_TOKENS:
            return
        width = 30
        filled = int(width * ev.done / ev.total)
        eta = f", {ev.eta_s:.0f} s left" if ev.eta_s is not None else ""
        self.stream.write(f"\r\x1b[2Kprefill [{'#' * filled}{'.' * (width - filled)}] "
                          f"{ev.done}/{ev.total} tokens{eta}")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self.shown = False


def _tokens(n: int) -> str:
    return f"{n} token{'' if n == 1 else 's'}"


def _rate(tps: float, n: int, what: str) -> str:
    """', 12.3 tokens/s (decode)', or nothing when there is nothing to time (never '0.0')."""
    return f", {tps:.1f} tokens/s ({what})" if n > 0 and tps > 0 else ""
