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
