"""The synthetic conversation generator and the assistant-only loss mask."""
import json
from collections import Counter

import pytest

from k2mlx.nano.data import OPS, TOOLS, TUI_SYSTEM, TUI_TOOLS, arithmetic_cases, generate, safe_eval


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = generate(200, 5), generate(200, 5), generate(200, 6)
    assert [(x.messages, x.tools) for x in a] == [(x.messages, x.tools) for x in b]
    assert [(x.messages, x.tools) for x in a] != [(x.messages, x.tools) for x in c]


def test_every_kind_appears_and_tool_declarations_vary():
    convs = generate(600, 0)
    kinds = Counter(c.kind for c in convs)
    assert set(kinds) == {"arithmetic", "list_dir", "read_file", "weather", "refusal", "greeting", "repeat",
                          "multiturn"}
    layouts = {tuple(t["function"]["name"] for t in c.tools or ()) for c in convs}
    assert len(layouts) > 50  # order and number of tools change
    positions = Counter(
        [t["function"]["name"] for t in c.tools].index("calculator") for c in convs if c.kind == "arithmetic"
    )
    assert len(positions) >= 3  # the calculator is not always first


def test_tool_calls_match_declarations_and_results():
    for c in generate(400, 1):
        declared = {t["function"]["name"] for t in c.tools or ()}
        for i, m in enumerate(c.messages):
            for call in m.get("tool_calls", ()):
                assert call["function"]["name"] in declared
                assert call["id"].startswith(f"functions.{call['function']['name']}:")
                args = json.loads(call["function"]["arguments"])
                assert c.messages[i + 1] == {"role": "tool", "tool_call_id": call["id"],
                                             "content": c.messages[i + 1]["content"]}
                if call["function"]["name"] == "calculator":
                    value = safe_eval(args["expression"])
                    assert c.messages[i + 1]["content"] == str(value)
                    assert str(value) in c.messages[i + 2]["content"]
                    # the expression's operands and operator are all in the user's question
                    question = c.messages[i - 1]["content"]
                    a, op, b = args["expression"].split(" ")
                    assert a in question and b in question
                    assert op in question or {"+": "plus", "-": "minus", "*": "times"}[op] in question \
                        or "multiplied" in question
        if c.kind == "refusal":
            assert not any(m.get("tool_calls") for m in c.messages)


def test_arithmetic_cases_cover_ops_and_sizes():
    cases = arithmetic_cases(300, 11)
    ops = Counter(c.meta["expression"].split()[1] for c in cases)
    assert set(ops) == set(OPS)
    sizes = {len(c.meta["expression"].split()[0]) for c in cases}
    assert sizes == {1, 2, 3}
    assert all(any(t["function"]["name"] == "calculator" for t in c.tools) for c in cases)
    assert all(c.messages[-3]["tool_calls"][0]["function"]["name"] == "calculator" for c in cases)


def test_arithmetic_conversations_chain_questions_and_copy_exercises_exist():
    convs = generate(800, 3)
    calls = Counter(sum(bool(m.get("tool_calls")) for m in c.messages) for c in convs if c.kind == "arithmetic")
    assert set(calls) == {1, 2, 3}  # later questions in one conversation: copy from the newest one
    for c in convs:
        if c.kind == "repeat":
            assert c.messages[-1]["content"] == c.meta["text"] and c.meta["text"] in c.messages[-2]["content"]


def test_answer_wording_follows_the_question_wording():
    """No coin-flip wordings: the same question shape always gets the same answer shape (a greedy
    reply has one best first token, so 4-bit and float pick the same)."""
    import re

    def shape(text):
        text = re.sub(r"-?\d+", "N", text)
        return re.sub(r" [-+*] ", " OP ", text)  # "plus" etc. stay: they are another wording

    seen: dict[str, set] = {}
    for c in generate(1500, 8):
        msgs = c.messages
        for i, m in enumerate(msgs):
            if m["role"] != "user":
                continue
            if c.kind == "arithmetic" and msgs[i + 1].get("tool_calls"):
                answer = msgs[i + 3]["content"]  # after the call and the tool result
            elif c.kind in ("refusal", "greeting", "repeat") and i == len(msgs) - 2:
                answer = msgs[i + 1]["content"]
            else:
                continue
            key = (c.kind, shape(m["content"]) if c.kind != "repeat" else "")
            seen.setdefault(key, set()).add(shape(answer) if c.kind != "repeat" else "same")
    assert len(seen) > 30
    assert {k: v for k, v in seen.items() if len(v) > 1} == {}


def test_tui_declarations_are_the_ones_k2mlx_chat_sends():
    """k2-nano is trained on the TUI's exact tool list and system prompt (8% of conversations),
    so `k2mlx chat` on the default model calls its tools. If the TUI's tools change, this fails:
    update TUI_TOOLS and retrain."""
    from k2mlx.tui.app import DEFAULT_SYSTEM
    from k2mlx.tui.tools.builtin import builtin_tools
    from k2mlx.tui.tools.confine import Workspace

    assert [t.spec() for t in builtin_tools(Workspace("."))] == TUI_TOOLS
    assert DEFAULT_SYSTEM == TUI_SYSTEM
    tui = [c for c in generate(1500, 4) if c.tools == TUI_TOOLS]
    assert 0.04 < len(tui) / 1500 < 0.15
    assert {c.kind for c in tui} == {"arithmetic", "list_dir", "read_file", "refusal", "greeting", "multiturn"}
    assert all(c.messages[0] == {"role": "system", "content": TUI_SYSTEM} for c in tui)


@pytest.mark.parametrize("bad", ["__import__('os')", "2 ** 9999", "a + 1", "1 +", "1 / 0", "True + 1"])
def test_safe_eval_refuses_anything_but_arithmetic(bad):
    with pytest.raises(ValueError):
        safe_eval(bad)


def test_loss_mask_covers_exactly_the_assistant_turns(tmp_path):
    from k2mlx.chat.template import render, render_tokens
    from k2mlx.nano.train import encode_conversation, instruct_template, tokenizer_texts
    from k2mlx.tokenizer import load_tokenizer, save_tokenizer, train_bpe

    convs = generate(60, 2)
    template = instruct_template()
    save_tokenizer(tmp_path, train_bpe(tokenizer_texts(convs, template), 300), thinking=False,
                   chat_template=template)
    tok = load_tokenizer(tmp_path)
    for c in convs:
        ids, mask = encode_conversation(c, tok, template)
        # the pieces, joined, are the whole rendered conversation
        assert tok.decode(ids) == render(c.messages, c.tools, add_generation_prompt=False, template=template)
        # masked spans, in order, are the assistant turns: content / tool calls through <|im_end|>
        spans, cur = [], []
        for t, m in zip(ids, mask):
            if m:
                cur.append(t)
            elif cur:
                spans.append(cur)
                cur = []
        if cur:
            spans.append(cur)
        assistants = [m for m in c.messages if m["role"] == "assistant"]
        # training sees exactly the prompt tokens the server builds for the first assistant turn
        first = next(i for i, m in enumerate(c.messages) if m["role"] == "assistant")
        prompt = render_tokens(tok, c.messages[:first], c.tools, add_generation_prompt=True)
        assert ids[: len(prompt)] == prompt and mask[len(prompt) - 1] == 0 and mask[len(prompt)] == 1
        assert len(spans) == len(assistants)
        for span, m in zip(spans, assistants):
            text = tok.decode(span)
            assert text.endswith("<|im_end|>")
            assert "<|im_assistant|>" not in text and "<|im_user|>" not in text
            if m.get("tool_calls"):
                assert m["tool_calls"][0]["function"]["arguments"] in text
            else:
                assert text == m["content"] + "<|im_end|>"


def test_mix_overrides_kind_weights():
    base = Counter(c.kind for c in generate(600, 9))
    more = Counter(c.kind for c in generate(600, 9, weights={"refusal": 60}))
    assert more["refusal"] > 2 * base["refusal"] and set(more) == set(base)
    assert [c.messages for c in generate(50, 9, weights=None)] == [c.messages for c in generate(50, 9)]


def test_first_use_wordings_have_one_answer_each():
    """Greetings and first-use questions in any of their typed forms (lower case, no punctuation)
    map to one answer, and the README's example is among them."""
    import re

    convs = [c for c in generate(3000, 12, weights={"greeting": 100}) if c.kind == "greeting"]
    answers: dict[str, set] = {}
    for c in convs:
        key = re.sub(r"[!?.,]", "", c.messages[-2]["content"]).lower()
        answers.setdefault(key, set()).add(c.messages[-1]["content"])
    assert {k: v for k, v in answers.items() if len(v) > 1} == {}
    texts = {c.messages[-2]["content"] for c in convs}
    assert {"Hello! What can you do?", "hello what can you do", "who are you", "Who are you?"} <= texts
    assert all(len(a.split()) >= 3 for v in answers.values() for a in v if not a.startswith("You're"))


def test_multiturn_chats_follow_a_tool_turn_with_the_right_kind_of_reply():
    """After a tool turn: a greeting gets words and no call, a file question its file tool with the
    folder or file it names, a new sum the calculator with the new operands (checked for every
    call by test_tool_calls_match_declarations_and_results)."""
    convs = [c for c in generate(600, 13, weights={"multiturn": 100}) if c.kind == "multiturn"]
    seen = Counter()
    for c in convs:
        users = [i for i, m in enumerate(c.messages) if m["role"] == "user"]
        assert len(users) >= 2 and c.messages[users[0] + 1].get("tool_calls")  # the chat opens with a tool turn
        declared = {t["function"]["name"] for t in c.tools}
        assert {"calculator", "list_dir", "read_file"} <= declared
        for i in users[1:]:
            reply = c.messages[i + 1]
            calls = reply.get("tool_calls") or []
            if not calls:
                seen["words"] += 1
                assert len(reply["content"].split()) >= 2
                continue
            name = calls[0]["function"]["name"]
            seen[name] += 1
            if name in ("list_dir", "read_file"):
                assert json.loads(calls[0]["function"]["arguments"])["path"].split("/")[-1] in c.messages[i]["content"]
    assert min(seen[k] for k in ("words", "calculator", "list_dir", "read_file")) > 20, seen
    assert sum(c.tools == TUI_TOOLS for c in convs) > 0.25 * len(convs)
    assert all(c.messages[0] == {"role": "system", "content": TUI_SYSTEM} for c in convs if c.tools == TUI_TOOLS)
