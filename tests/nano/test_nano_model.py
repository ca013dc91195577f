"""The shipped k2-nano (k2mlx/assets/k2-nano): loads through the same code as K2, is the default
model, and really calls tools end to end through `k2mlx serve` with the official openai client."""
import json

import pytest

from k2mlx.tiny import embedded_model_path

ASSET = embedded_model_path()
pytestmark = pytest.mark.skipif(not (ASSET / "config.json").is_file(), reason="k2-nano asset not built")


def test_asset_is_a_real_k2_checkpoint_and_the_default_model():
    from k2mlx.tiny import default_model_path

    assert default_model_path() == ASSET
    cfg = json.loads((ASSET / "config.json").read_text())
    assert cfg["model_type"] == "kimi_k2" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert cfg["rope_scaling"]["type"] == "yarn" and cfg["first_k_dense_replace"] == 1
    assert cfg["quantization"]["bits"] == 4
    index = json.loads((ASSET / "model.safetensors.index.json").read_text())
    assert all((ASSET / f).is_file() for f in set(index["weight_map"].values()))
    training = json.loads((ASSET / "TRAINING.json").read_text())
    assert training["script"] == "scripts/train_nano.py" and len(training["losses"]) == training["steps"]
    size = sum(p.stat().st_size for p in ASSET.iterdir())
    assert size < 20e6


def test_loads_quantized_with_k2_tokens():
    import mlx.nn as nn

    from k2mlx import load

    model, tok = load()  # the default model
    assert isinstance(model.layers[1].self_attn.q_b_proj, nn.QuantizedLinear)
    base = tok.num_base_tokens
    assert tok.special_tokens["<|im_end|>"] == base + 2
    assert tok.special_tokens["<|tool_call_begin|>"] == base + 13
    assert tok.chat_template and "tool_declare" in tok.chat_template


@pytest.fixture(scope="module")
def server():
    from k2mlx.nano.evaluate import Server

    with Server(ASSET) as srv:
        yield srv


@pytest.fixture(scope="module")
def held_out(server):
    from k2mlx.nano.data import arithmetic_cases
    from k2mlx.nano.evaluate import EVAL_SEED, serve_eval

    return serve_eval(server.base_url, arithmetic_cases(50, EVAL_SEED)).as_dict()


def test_held_out_arithmetic_calls_the_calculator(held_out):
    """finish_reason "tool_calls" and the calculator named, on 50 held-out prompts."""
    assert held_out["finish_reason_tool_calls"] >= 0.9, held_out
    assert held_out["right_tool_name"] >= 0.9, held_out


def test_held_out_arithmetic_right_numbers(held_out):
    """The issue's targets: right JSON arguments, and the answer states the tool's result."""
    assert held_out["tool_call_rate"] >= 0.9, held_out
    assert held_out["answer_rate"] >= 0.9, held_out


def test_chats_and_refuses_through_serve(server):
    from openai import OpenAI

    from k2mlx.nano.data import TOOLS

    client = OpenAI(base_url=server.base_url, api_key="x")
    r = client.chat.completions.create(model="k2-nano", messages=[{"role": "user", "content": "Hello"}],
                                       temperature=0, max_tokens=40)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content.strip()
    # an unsupported request: refused in words, no tool call
    r = client.chat.completions.create(
        model="k2-nano", messages=[{"role": "user", "content": "Order a pizza for me."}],
        tools=[TOOLS["list_dir"], TOOLS["send_email"]], temperature=0, max_tokens=40)
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason == "stop"
    # a file question with read_file declared
    r = client.chat.completions.create(
        model="k2-nano", messages=[{"role": "user", "content": "Read notes.txt for me."}],
        tools=[TOOLS["read_file"], TOOLS["list_dir"]], temperature=0, max_tokens=40)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "read_file" and json.loads(call.function.arguments) == {"path": "notes.txt"}


@pytest.mark.xfail(strict=False, reason="known gap (docs/NANO.md): the shipped k2-nano calls the calculator for "
                   "arithmetic even when none is declared (0/40 refusals in process)")
def test_arithmetic_without_a_calculator_is_refused(server):
    from openai import OpenAI

    from k2mlx.nano.data import TOOLS

    client = OpenAI(base_url=server.base_url, api_key="x")
    r = client.chat.completions.create(
        model="k2-nano", messages=[{"role": "user", "content": "What is 12 * 34?"}],
        tools=[TOOLS["list_dir"], TOOLS["send_email"]], temperature=0, max_tokens=40)
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason == "stop"


# -- what a newcomer types first, and chats that go on after a tool turn ----------------------------

def test_readme_example_through_the_cli():
    """The README's first command prints >= 3 words at temperature 0 (the previous k2-nano
    printed nothing), and at the default temperature (0.6) for most seeds (the shipped model:
    18 of 20 seeds in process, the previous one 5 of 20). Known gap (docs/NANO.md): a greeting
    rather than its capabilities ("Hi there! What can I do for you?"), some samples garbled."""
    import subprocess
    import sys

    from k2mlx.nano.evaluate import FIRST_USE_PROMPTS

    def run(*extra):
        r = subprocess.run([sys.executable, "-m", "k2mlx.cli", "generate", "--prompt", FIRST_USE_PROMPTS[0],
                            "--max-tokens", "64", *extra], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    greedy = run("--temp", "0")
    assert len(greedy.split()) >= 3, greedy
    sampled = [run("--seed", str(s)) for s in range(1, 9)]
    assert sum(len(t.split()) >= 3 for t in sampled) >= 5, sampled


@pytest.mark.parametrize("as_chat", [False, True], ids=["plain", "chat-tools"])
def test_first_use_prompts_get_replies(server, as_chat):
    """>= 10 first-use wordings (greetings, who are you, what can you do; punctuation and case
    varied, some never seen in training) get >= 3 words and no tool call at temperature 0, as
    `k2mlx generate` sends them and with `k2mlx chat`'s system prompt and tools."""
    from openai import OpenAI

    from k2mlx.nano.data import TUI_SYSTEM, TUI_TOOLS
    from k2mlx.nano.evaluate import FIRST_USE_PROMPTS

    assert len(FIRST_USE_PROMPTS) >= 10 and FIRST_USE_PROMPTS[0] == "Hello! What can you do?"
    client = OpenAI(base_url=server.base_url, api_key="x")
    prefix = [{"role": "system", "content": TUI_SYSTEM}] if as_chat else []
    extra = {"tools": TUI_TOOLS} if as_chat else {}
    bad = []
    for p in FIRST_USE_PROMPTS:
        r = client.chat.completions.create(model="k2-nano", messages=prefix + [{"role": "user", "content": p}],
                                           temperature=0, max_tokens=64, **extra)
        m = r.choices[0].message
        if m.tool_calls or len((m.content or "").split()) < 3:
            bad.append(p)
    # the shipped model misses 3 of 20 plain ("hi", "Tell me about yourself." -> two words of
    # noise, "hello!" -> "You're welcome!") and 1 of 20 with the chat's tools (docs/NANO.md)
    assert FIRST_USE_PROMPTS[0] not in bad and len(bad) <= 3, bad


@pytest.fixture(scope="module")
def multiturn(server):
    from k2mlx.nano.evaluate import multiturn_cases, multiturn_serve_eval

    return multiturn_serve_eval(server.base_url, multiturn_cases(40))


def test_after_a_sum_a_greeting_gets_words_and_a_file_question_the_file_tool(server):
    """The issue's cases through serve: "Hi!" after an arithmetic turn is answered in words (the
    previous k2-nano called the calculator with made-up numbers), "Show me the files in docs."
    after one calls list_dir on docs (it called the calculator)."""
    from openai import OpenAI

    from k2mlx.nano.evaluate import multiturn_cases

    client = OpenAI(base_url=server.base_url, api_key="x")
    hi, files = multiturn_cases(2)
    assert hi.messages[-1]["content"] == "Hi!" and files.messages[-1]["content"] == "Show me the files in docs."
    m = client.chat.completions.create(model="k2-nano", messages=hi.messages, tools=hi.tools, temperature=0,
                                       max_tokens=64).choices[0].message
    assert not m.tool_calls and len((m.content or "").split()) >= 3, m
    m = client.chat.completions.create(model="k2-nano", messages=files.messages, tools=files.tools, temperature=0,
                                       max_tokens=64).choices[0].message
    assert [c.function.name for c in m.tool_calls or ()] == ["list_dir"], m
    assert json.loads(m.tool_calls[0].function.arguments) == {"path": "docs"}


def test_multiturn_held_out(multiturn):
    """40 held-out chats after a tool turn (greetings, file questions, new sums). The shipped
    model gets 25/40 (the previous one 11/40, docs/NANO.md); this guards against sliding back."""
    assert multiturn["ok"] >= 0.45 * multiturn["cases"], multiturn
