"""Approval policy: tools that write or run ask first (`ask_all`: every tool asks, read-only ones
too). Allow once, allow once with the network (run_shell in a sandbox), allow always (for this
session: by tool name), or deny. A denied call never runs; the model is told it was denied.
A tool marked `always_asks` (run_shell without an OS sandbox) asks every time: neither
"always" nor --yes lifts it, since nothing but the user stands between it and the machine."""
from __future__ import annotations

from enum import Enum


class Decision(str, Enum):
    ONCE = "once"
    NETWORK = "network"  # once, with the network allowed for this call
    ALWAYS = "always"
    DENY = "deny"


class ApprovalPolicy:
    def __init__(self, auto_approve: bool = False, ask_all: bool = False):
        if auto_approve and ask_all:
            raise ValueError("auto_approve (--yes) and ask_all (--ask-all) contradict each other")
        self.auto_approve = auto_approve  # --yes: trust every tool (never the default)
        self.ask_all = ask_all  # --ask-all: read-only tools ask too
        self.always: set[str] = set()

    def guarded(self, tool) -> bool:
        """Whether this tool is one that asks (before --yes or "allow always" lift it)."""
        return tool.needs_approval or self.ask_all

    def needs_prompt(self, tool) -> bool:
        if getattr(tool, "always_asks", False):
            return True
        return self.guarded(tool) and not self.auto_approve and tool.name not in self.always

    def record(self, tool, decision: Decision) -> None:
        if decision is Decision.ALWAYS and not getattr(tool, "always_asks", False):
            self.always.add(tool.name)
