"""Approval policy: tools that write or run ask first (`ask_all`: every tool asks, read-only ones
too). Allow once, allow always (for this
session: by tool name), or deny. A denied call never runs; the model is told it was denied."""
from __future__ import annotations

from enum import Enum


class Decision(str, Enum):
    ONCE = "once"
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
        return self.guarded(tool) and not self.auto_approve and tool.name not in self.always

    def record(self, tool, decision: Decision) -> None:
        if decision is Decision.ALWAYS:
            self.always.add(tool.name)
