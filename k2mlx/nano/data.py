"""Deterministic synthetic conversations that teach k2-nano to chat and call tools.

Every conversation is an OpenAI-style message list plus the tools declared for it, so the same
objects feed training (rendered by `k2mlx.chat.template`) and the held-out evaluation through
`k2mlx serve` with the official openai client. All randomness comes from one `random.Random(seed)`,
so a seed fixes the data exactly.

Kinds: greetings, short answers and first-use questions ("who are you", "what can you do", in
several wordings); arithmetic answered with the `calculator` tool; questions about
files answered with `list_dir` / `read_file`; weather with `get_weather`; and a refusal whenever no
declared tool fits; "repeat after me" copy exercises; multi-turn chats where a tool turn is followed by a greeting,
a file question or a new sum; and, in 6% of conversations, exactly the TUI's
tool list and system prompt. Tool declarations vary in number and order (and the needed tool is sometimes
missing), so the model has to read them rather than memorise one layout.
"""
from __future__ import annotations

import json
import operator
import random
import re
from dataclasses import dataclass, field

from k2mlx.calculator import safe_eval  # noqa: F401  (re-exported: the evaluation scores with it)


def _fn(name: str, description: str, props: dict[str, tuple[str, str]], required: list[str]) -> dict:
    """An OpenAI function declaration; `props` maps each parameter to (JSON type, description)."""
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {k: {"type": t, "description": d} for k, (t, d) in props.items()},
        "required": required}}}


def _tool(name: str, description: str, params: dict[str, tuple[str, str]]) -> dict:
    """A declaration whose parameters are all required."""
    return _fn(name, description, params, list(params))


TOOLS: dict[str, dict] = {
    "calculator": _tool(
        "calculator", "Evaluate an arithmetic expression.",
        {"expression": ("string", "The expression to evaluate")},
    ),
    "list_dir": _tool("list_dir", "List the files in a folder.", {"path": ("string", "Folder path")}),
    "read_file": _tool("read_file", "Read a text file.", {"path": ("string", "File path")}),
    "get_weather": _tool("get_weather", "Current weather for a city.", {"city": ("string", "City name")}),
    "send_email": _tool(
        "send_email", "Send an email.",
        {"to": ("string", "Recipient address"), "body": ("string", "Message text")},
    ),
    "search_web": _tool("search_web", "Search the web.", {"query": ("string", "Search terms")}),
}


_WS = "relative to the workspace"
# What `k2mlx chat` declares (its built-in tools, in its order) and its default system prompt,
# frozen here so the shipped model's data does not drift with the TUI's code; a test checks that
# the two stay equal.
TUI_TOOLS: list[dict] = [
    _fn("read_file", "Read a text file in the workspace. Optional line offset/limit.",
        {"path": ("string", f"file path {_WS}"), "offset": ("integer", "first line (0-based)"),
         "limit": ("integer", "number of lines")}, ["path"]),
    _fn("list_dir", "List the entries of a directory in the workspace.",
        {"path": ("string", f"directory {_WS} (default '.')")}, []),
    _fn("glob", "Find files in the workspace matching a glob pattern such as '**/*.py'.",
        {"pattern": ("string", f"glob pattern {_WS}")}, ["pattern"]),
    _fn("grep", "Search files in the workspace for a regular expression; prints path:line: text.",
        {"pattern": ("string", "Python regular expression"), "path": ("string", "file or directory (default '.')"),
         "include": ("string", "only files whose name matches this glob, e.g. '*.py'")}, ["pattern"]),
    _fn("write_file", "Create or overwrite a file in the workspace with the given content.",
        {"path": ("string", f"file path {_WS}"), "content": ("string", "the full new content")}, ["path", "content"]),
    _fn("edit_file", "Replace an exact string in a file (old_string must occur exactly once unless replace_all).",
        {"path": ("string", f"file path {_WS}"), "old_string": ("string", "exact text to replace"),
         "new_string": ("string", "replacement text"), "replace_all": ("boolean", "replace every occurrence")},
        ["path", "old_string", "new_string"]),
    _fn("run_shell", "Run a shell command in the workspace (timeout in seconds, output capped).",
        {"command": ("string", "the command line"), "timeout": ("number", "seconds"),
         "cwd": ("string", f"directory {_WS}")}, ["command"]),
    TOOLS["calculator"],
]
TUI_SYSTEM = ("You are Kimi, an AI assistant created by Moonshot AI, running locally through k2mlx. "
              "You can use tools to read, search and edit files in the user's workspace and run commands there.")
# The TUI's file tools also appear one by one among the others, so either wording means the same tool.
_VARIANTS = {"read_file": TUI_TOOLS[0], "list_dir": TUI_TOOLS[1]}

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_OP_WORDS = {"+": ["plus"], "-": ["minus"], "*": ["times", "multiplied by"]}

_ARITH_SYMBOLIC = [
    "What is {a} {op} {b}?", "What's {a} {op} {b}?", "Calculate {a} {op} {b}.", "Compute {a} {op} {b}",
    "How much is {a} {op} {b}?", "Can you work out {a} {op} {b}?", "{a} {op} {b} = ?",
    "Please calculate {a} {op} {b}.", "what is {a} {op} {b}", "Use the calculator: {a} {op} {b}",
    "I need {a} {op} {b}.", "Quick question: what is {a} {op} {b}?",
]
_ARITH_WORDS = ["What is {a} {w} {b}?", "How much is {a} {w} {b}?", "Calculate {a} {w} {b}."]
_ARITH_FOLLOWUPS = ["And {a} {op} {b}?", "Now {a} {op} {b}.", "What about {a} {op} {b}?", "And what is {a} {op} {b}?",
                    "Next one: {a} {op} {b}"]
_ARITH_ANSWERS = [
    "{a} {op} {b} = {r}.", "The answer is {r}.", "{a} {op} {b} is {r}.", "It comes to {r}.",
    "The result is {r}.",
]
_NO_CALC = [
    "I can't compute that reliably without a calculator tool, and none is available here.",
    "Sorry, I don't have a calculator tool, so I can't work that out for you.",
]

_GREETINGS = [
    ("Hi!", "Hello! How can I help you today?"),
    ("Hello", "Hi there! What can I do for you?"),
    ("hey", "Hey! How can I help?"),
    ("Good morning!", "Good morning! How can I help you today?"),
    ("Good evening", "Good evening! What can I do for you?"),
    ("How are you?", "I'm doing well, thanks for asking! How can I help?"),
    ("Who are you?", "I'm k2-nano, a tiny model with the Kimi K2 architecture. I can chat and use tools."),
    ("What can you do?", "I can chat, do arithmetic with a calculator tool, and look at files with list_dir and read_file."),
    ("What is your name?", "My name is k2-nano."),
    ("Thanks!", "You're welcome!"),
    ("Thank you very much", "You're very welcome! Anything else?"),
    ("Bye", "Goodbye! Have a nice day."),
    ("Tell me a joke", "Why did the tensor break up with the scalar? It needed more dimensions."),
    ("What color is the sky?", "On a clear day the sky is blue."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("Say something nice", "You're doing great, keep it up!"),
    ("Are you a robot?", "I'm a small language model called k2-nano."),
]

# What a newcomer types first (the README's example among them). Each base wording has one answer;
# its variants (lower case, no punctuation) share it, so a reply is a function of the words.
_HELLO = "Hello! How can I help you today?"
_ME = "I'm k2-nano, a tiny model with the Kimi K2 architecture. I can chat and use tools."
_CAN = "I can chat, do arithmetic with a calculator tool, and look at files with list_dir and read_file."
_FIRST_USE = [
    ("Hello! What can you do?", "Hello! " + _CAN),
    ("Hi! What can you do?", "Hello! " + _CAN),
    ("Hey, what can you do?", "Hello! " + _CAN),
    ("Hi, what can you do for me?", "Hello! " + _CAN),
    ("What can you help me with?", _CAN),
    ("What are you able to do?", _CAN),
    ("How can you help me?", _CAN),
    ("What do you do?", _CAN),
    ("What are your capabilities?", _CAN),
    ("What can I ask you?", _CAN),
    ("Help", "Sure! " + _CAN),
    ("Can you help me?", "Sure! " + _CAN),
    ("Hi, who are you?", "Hello! " + _ME),
    ("Hello, who are you?", "Hello! " + _ME),
    ("Hey! Who are you?", "Hello! " + _ME),
    ("What are you?", _ME),
    ("Who is this?", _ME),
    ("Introduce yourself.", _ME),
    ("Tell me about yourself.", _ME),
    ("Which model are you?", _ME),
    ("Are you Kimi?", "I'm k2-nano, a tiny model with the Kimi K2 architecture, not the full Kimi K2."),
    ("Hi there!", "Hi there! What can I do for you?"),
    ("Hello there", "Hi there! What can I do for you?"),
    ("Hey there!", "Hey! How can I help?"),
    ("Good afternoon!", "Good afternoon! How can I help you today?"),
    ("Hi! How are you?", "I'm doing well, thanks for asking! How can I help?"),
    ("Hello world", _HELLO),
    ("Greetings!", _HELLO),
    ("Howdy", _HELLO),
    ("Are you there?", "Yes, I'm here! How can I help?"),
    ("test", "Hello! I'm here and working. How can I help?"),
    ("What is k2mlx?", "k2mlx runs Kimi K2 on Apple Silicon with MLX, and I'm k2-nano, its tiny built-in model."),
]


def _variant(r: random.Random, text: str) -> str:
    """The wording as typed, or lower case, or without punctuation, or both."""
    plain = re.sub(r"[!?.,]", "", text)
    return r.choice((text, text, text.lower(), plain, plain.lower()))


_DIRS = ["docs", "src", "notes", "photos", "projects", "data", "music", "tests", "config", "home"]
_FILES = [
    "README.md", "notes.txt", "todo.txt", "main.py", "config.yaml", "report.pdf", "data.csv",
    "index.html", "song.mp3", "photo.jpg", "plan.md", "setup.py", "log.txt", "ideas.md", "list.txt",
    "draft.txt", "budget.csv", "app.js", "style.css", "Makefile",
]
_TEXT_FILES = ["notes.txt", "todo.txt", "README.md", "plan.md", "ideas.md", "list.txt", "draft.txt", "log.txt"]
_CONTENTS = [
    "Meeting moved to Friday at 3 pm.", "Buy milk, eggs and bread.", "Fix the login bug before release.",
    "The server runs on port 8080.", "Call Alice about the budget.", "Project deadline is June 12.",
    "Remember to water the plants.", "Version 2 adds dark mode.", "Backup finished without errors.",
    "Dinner with Sam on Saturday.", "Read chapter 4 of the book.", "The password hint is blue sky.",
    "Train the model for 3 epochs.", "Pay the rent on the first.", "Tests pass on Linux and macOS.",
]
_LIST_Q = [
    "What files are in {d}?", "List the contents of {d}.", "What's inside the {d} folder?",
    "Show me the files in {d}.", "Which files does {d} have?", "ls {d}",
]
_LIST_A = ["The folder {d} contains: {items}.", "{d} has {n} files: {items}.", "In {d} I found: {items}."]
_READ_Q = [
    "What does {p} say?", "Read {p} for me.", "Open {p} and tell me what it says.",
    "What's in the file {p}?", "Show me {p}.",
]
_READ_A = ["{p} says: {c}", "The file {p} contains: {c}", "Here is {p}: {c}"]

_CITIES = ["Paris", "Tokyo", "London", "Berlin", "Madrid", "Rome", "Oslo", "Cairo", "Lima", "Seoul"]
_WEATHER = ["Sunny, 21 C", "Rainy, 12 C", "Cloudy, 17 C", "Snow, -2 C", "Windy, 9 C", "Clear, 25 C"]
_WEATHER_Q = ["What's the weather in {c}?", "How is the weather in {c} today?", "Is it raining in {c}?"]
_WEATHER_A = ["The weather in {c}: {w}.", "In {c} it is {w} right now."]
_UNSUPPORTED = [
    ("Send an email to bob@example.com saying hello.", "send_email"),
    ("Search the web for cheap flights.", "search_web"),
    ("Book a table for two tonight.", None),
    ("Play some music.", None),
    ("Turn off the lights.", None),
    ("Order a pizza for me.", None),
    ("Set an alarm for 7 am.", None),
]
_REFUSALS = [
    "Sorry, none of the available tools can do that.",
    "I can't help with that: there is no suitable tool available.",
    "I'm sorry, I don't have a tool for that.",
]
_SYSTEMS = [None, None, "You are a helpful assistant.", "You are k2-nano, a helpful assistant."]
_REPEAT_Q = ["Repeat after me: {x}", "Say {x}", "Please repeat this: {x}", "Echo {x}", "Can you say {x}?"]
_WORDS = ["apple", "river", "blue", "seven", "k2mlx", "hello world", "green tea", "moon", "piano", "delta"]


@dataclass
class Conversation:
    messages: list[dict]
    tools: list[dict] | None
    kind: str
    meta: dict = field(default_factory=dict)


def _pick(r: random.Random, options: list):
    """(index, option): the index of a question's phrasing picks its answer's wording."""
    i = r.randrange(len(options))
    return i, options[i]


def _styled(answers: list[str], style: int) -> str:
    """The answer wording is a function of the question's wording, never a coin flip: a greedy
    reply then has one clear best token, and the 4-bit model makes the same choice as the float one
    (with random wordings the first answer token is a near-tie that quantization flips)."""
    return answers[style % len(answers)]


class Generator:
    """Draws conversations from one seeded RNG; `conversation()` picks a kind by weight."""

    KINDS = (("arithmetic", 50), ("list_dir", 10), ("read_file", 10), ("weather", 4),
             ("refusal", 10), ("greeting", 10), ("repeat", 8), ("multiturn", 12))
    TUI_SHARE = 0.06  # conversations declaring exactly what `k2mlx chat` declares
    MULTITURN_TUI_SHARE = 0.4  # a chat after a tool turn is what `k2mlx chat` sees most
    TUI_KINDS = ("arithmetic", "list_dir", "read_file", "refusal", "greeting")

    def __init__(self, seed: int, weights: dict[str, float] | None = None):
        self.kinds = tuple((k, (weights or {}).get(k, w)) for k, w in self.KINDS)  # --mix overrides
        self.rng = random.Random(seed)
        self._call_index = 0
        self._style = 0  # the phrasing of the last arithmetic question (picks its answer's wording)

    # -- helpers ---------------------------------------------------------------------------
    def _tools(self, needed: list[str], exclude: tuple[str, ...] = ()) -> list[dict] | None:
        """The needed tools plus 0-3 random others (1-3 when none is needed), shuffled; the file
        tools are declared in the TUI's wording a third of the time."""
        r = self.rng
        others = [n for n in TOOLS if n not in needed and n not in exclude]
        extra = r.choice((0, 1, 1, 2, 2, 3)) if needed else r.randint(1, 3)
        names = list(needed) + r.sample(others, min(extra, len(others)))
        r.shuffle(names)
        return [_VARIANTS[n] if n in _VARIANTS and r.random() < 0.33 else TOOLS[n] for n in names]

    def _prefix(self) -> list[dict]:
        system = self.rng.choice(_SYSTEMS)
        return [{"role": "system", "content": system}] if system else []

    def _call(self, name: str, args: dict) -> tuple[dict, str]:
        call_id = f"functions.{name}:{self._call_index}"
        self._call_index += 1
        msg = {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": call_id, "type": "function",
                            "function": {"name": name, "arguments": json.dumps(args)}}],
        }
        return msg, call_id

    def _tool_exchange(self, name, args, result, answer) -> list[dict]:
        call, call_id = self._call(name, args)
        return [call, {"role": "tool", "tool_call_id": call_id, "content": result},
                {"role": "assistant", "content": answer}]

    # -- kinds -----------------------------------------------------------------------------
    def arithmetic_question(self, followup: bool = False) -> tuple[str, str, int]:
        """(user text, canonical expression, value) with 1-3 digit operands."""
        r = self.rng
        digits = lambda: r.choice((1, 2, 2, 3, 3))  # noqa: E731
        a, b = r.randint(0, 10 ** digits() - 1), r.randint(0, 10 ** digits() - 1)
        op = r.choice(list(OPS))
        expr = f"{a} {op} {b}"
        if followup and r.random() < 0.5:
            self._style, template = _pick(r, _ARITH_FOLLOWUPS)
            text = template.format(a=a, b=b, op=op)
        elif r.random() < 0.15:
            self._style, template = _pick(r, _ARITH_WORDS)
            text = template.format(a=a, b=b, w=r.choice(_OP_WORDS[op]))
        else:
            self._style, template = _pick(r, _ARITH_SYMBOLIC)
            text = template.format(a=a, b=b, op=op)
        return text, expr, OPS[op](a, b)

    def arithmetic_exchange(self, followup: bool = False) -> tuple[list[dict], dict]:
        """User question, calculator call, its result, the answer stating it."""
        text, expr, value = self.arithmetic_question(followup)
        a, op, b = expr.split(" ")
        answer = _styled(_ARITH_ANSWERS, self._style).format(a=a, op=op, b=b, r=value)
        msgs = [{"role": "user", "content": text}] + self._tool_exchange(
            "calculator", {"expression": expr}, str(value), answer)
        return msgs, {"expression": expr, "value": value}

    def arithmetic(self, with_tool: bool = True, tools: list[dict] | None = None,
                   max_exchanges: int = 1) -> tuple[list[dict], list[dict] | None, dict]:
        """One to `max_exchanges` questions in a row (later ones copy from the newest question
        only: more copying per token of prompt, and the model learns which number is current)."""
        r = self.rng
        if not with_tool:
            text, expr, value = self.arithmetic_question()
            return [{"role": "user", "content": text}, {"role": "assistant", "content": _styled(_NO_CALC, self._style)}], \
                self._tools([], exclude=("calculator",)), {"expression": expr, "value": value}
        tools = tools or self._tools(["calculator"])
        msgs, meta = self.arithmetic_exchange()
        n = r.choices((1, 2, 3), (0.45, 0.35, 0.2))[0] if max_exchanges > 1 else 1
        for _ in range(n - 1):
            more, _m = self.arithmetic_exchange(followup=True)
            msgs += more
        return msgs, tools, meta

    def _listing(self, items: list[str]) -> str:
        """A plain listing, or the TUI's `list_dir` rows (kind, size, name)."""
        r = self.rng
        if r.random() < 0.5:
            return "\n".join(items)
        return "\n".join(f"{'file':4} {r.randint(0, 99999)!s:>9} {name}" for name in items)

    def list_dir(self, tools: list[dict] | None = None):
        r = self.rng
        d = r.choice(_DIRS)
        items = r.sample(_FILES, r.randint(1, 4))
        style, q = _pick(r, _LIST_Q)
        user = {"role": "user", "content": q.format(d=d)}
        answer = _styled(_LIST_A, style).format(d=d, n=len(items), items=", ".join(items))
        needed = ["list_dir"] + (["read_file"] if r.random() < 0.5 else [])
        msgs = [user] + self._tool_exchange("list_dir", {"path": d}, self._listing(items), answer)
        return msgs, tools or self._tools(needed), {"path": d}

    def read_file(self, tools: list[dict] | None = None):
        r = self.rng
        p = r.choice(_TEXT_FILES)
        if r.random() < 0.5:
            p = f"{r.choice(_DIRS)}/{p}"
        content = r.choice(_CONTENTS)
        style, q = _pick(r, _READ_Q)
        user = {"role": "user", "content": q.format(p=p)}
        answer = _styled(_READ_A, style).format(p=p, c=content)
        needed = ["read_file"] + (["list_dir"] if r.random() < 0.5 else [])
        msgs = [user] + self._tool_exchange("read_file", {"path": p}, content, answer)
        return msgs, tools or self._tools(needed), {"path": p}

    def weather(self, tools: list[dict] | None = None):
        r = self.rng
        c, w = r.choice(_CITIES), r.choice(_WEATHER)
        style, q = _pick(r, _WEATHER_Q)
        user = {"role": "user", "content": q.format(c=c)}
        answer = _styled(_WEATHER_A, style).format(c=c, w=w)
        return [user] + self._tool_exchange("get_weather", {"city": c}, w, answer), \
            tools or self._tools(["get_weather"]), {"city": c}

    def refusal(self, tools: list[dict] | None = None):
        """A request no declared tool can serve: unsupported tasks, or weather / files /
        arithmetic when their tool is not declared. With `tools` given (the TUI's set), only
        requests none of them serves."""
        r = self.rng
        pick = r.random()
        if tools is not None:
            if pick < 0.3:
                style, q = _pick(r, _WEATHER_Q)
                text = q.format(c=r.choice(_CITIES))
            else:
                style, (text, _) = _pick(r, _UNSUPPORTED)
            return [{"role": "user", "content": text},
                    {"role": "assistant", "content": _styled(_REFUSALS, style)}], tools, {}
        if pick < 0.3:
            return self.arithmetic(with_tool=False)
        if pick < 0.45:
            style, q = _pick(r, _WEATHER_Q)
            text = q.format(c=r.choice(_CITIES))
            exclude = ("get_weather",)
        elif pick < 0.6:
            style, q = _pick(r, _LIST_Q + _READ_Q)
            text = q.format(d=r.choice(_DIRS), p=r.choice(_TEXT_FILES))
            exclude = ("list_dir", "read_file")
        else:
            style, (text, tool) = _pick(r, _UNSUPPORTED)
            exclude = (tool,) if tool else ()
        msgs = [{"role": "user", "content": text}, {"role": "assistant", "content": _styled(_REFUSALS, style)}]
        return msgs, self._tools([], exclude=exclude), {}

    def greeting(self, tools: list[dict] | None = None):
        """Small talk and first-use questions (greetings, "who are you", "what can you do")."""
        r = self.rng
        q, a = r.choice(_GREETINGS) if r.random() < 0.4 else r.choice(_FIRST_USE)
        if tools is None:
            tools = self._tools([]) if r.random() < 0.6 else None
        return [{"role": "user", "content": _variant(r, q)}, {"role": "assistant", "content": a}], tools, {}

    def multiturn(self, tools: list[dict] | None = None):
        """A tool turn, then one or two turns of any kind in the same chat: after a sum a greeting
        gets a greeting (not a calculator call), a file question gets the file tool, and a new sum
        copies the new numbers (never the earlier ones)."""
        r = self.rng
        tools = tools or self._tools(["calculator", "list_dir", "read_file"])
        kind = r.choice(("arithmetic", "arithmetic", "list_dir", "read_file"))
        msgs = self._turn(kind, tools, False)
        for _ in range(r.choices((1, 2), (0.7, 0.3))[0]):
            nxt = r.choice(("greeting", "greeting", "greeting", "list_dir", "read_file", "arithmetic", "arithmetic"))
            msgs += self._turn(nxt, tools, kind == "arithmetic")
            kind = nxt
        return msgs, tools, {}

    def _turn(self, kind: str, tools: list[dict], after_sum: bool) -> list[dict]:
        if kind == "arithmetic":
            return self.arithmetic_exchange(followup=after_sum)[0]
        return getattr(self, kind)(tools=tools)[0]

    def repeat(self, tools: list[dict] | None = None):
        """Say back a number, an expression or a few words exactly: pure copying, the skill every
        tool call's arguments and every answer that states a result depend on."""
        r = self.rng
        pick = r.random()
        if pick < 0.45:
            x = str(r.randint(0, 10 ** r.randint(1, 7) - 1))
        elif pick < 0.8:
            x = self.arithmetic_question()[1]
        else:
            x = " ".join(r.sample(_WORDS, r.randint(1, 3)))
        if tools is None:
            tools = self._tools([]) if r.random() < 0.5 else None
        return [{"role": "user", "content": r.choice(_REPEAT_Q).format(x=x)},
                {"role": "assistant", "content": x}], tools, {"text": x}

    def conversation(self, kind: str | None = None) -> Conversation:
        r = self.rng
        self._call_index = 0
        if kind is None:
            names, weights = zip(*self.kinds)
            kind = r.choices(names, weights)[0]
        history: list[dict] = []
        if kind not in ("greeting", "multiturn") and r.random() < 0.15:
            q, a = r.choice(_GREETINGS[:6])  # an earlier small-talk turn, for multi-turn context
            history = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        tui_share = self.MULTITURN_TUI_SHARE if kind == "multiturn" else self.TUI_SHARE
        if kind in self.TUI_KINDS + ("multiturn",) and r.random() < tui_share:
            prefix, tools = [{"role": "system", "content": TUI_SYSTEM}], list(TUI_TOOLS)
        else:
            prefix, tools = self._prefix(), None
        if kind == "arithmetic":
            msgs, tools, meta = self.arithmetic(tools=tools, max_exchanges=3)
        else:
            msgs, tools, meta = getattr(self, kind)(tools=tools)
        return Conversation(prefix + history + msgs, tools, kind, meta)


def generate(n: int, seed: int, kind: str | None = None, weights: dict[str, float] | None = None) -> list[Conversation]:
    """`n` conversations from `seed` (same seed and weights, same list)."""
    g = Generator(seed, weights)
    return [g.conversation(kind) for _ in range(n)]


def arithmetic_cases(n: int, seed: int) -> list[Conversation]:
    """Held-out arithmetic cases for the evaluation: each has the calculator declared (among
    others), and `meta` holds the expression and its value. The messages are the full exchange;
    the prompt is `messages[:-3]` and the tool turn is `messages[-2]`."""
    g = Generator(seed)
    out = []
    for _ in range(n):
        g._call_index = 0
        msgs, tools, meta = g.arithmetic(with_tool=True)
        out.append(Conversation(g._prefix() + msgs, tools, "arithmetic", meta))
    return out
