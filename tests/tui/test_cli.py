"""`k2mlx chat` argument errors: clear messages, no traceback, before any model loads."""
from __future__ import annotations

import json

import pytest

from k2mlx.cli import main


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # an argparse flag error (k2mlx/commands/flags.py): usage + one line
        main(["chat", "--temp", "5"])
    assert e.value.code == 2 and "argument --temp: must be between 0 and 2, got 5" in capsys.readouterr().err
    assert main(["chat", "--workspace", str(tmp_path / "nope")]) == 1
    assert f"--workspace {tmp_path / 'nope'} is not a folder" in capsys.readouterr().err
    bad = tmp_path / "mcp.json"
    bad.write_text("{not json")
    assert main(["chat", "--workspace", str(tmp_path), "--mcp-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "MCP config is not valid JSON" in err and str(bad) in err
    bad.write_text(json.dumps({"mcpServers": {"x": {"args": []}}}))
    assert main(["chat", "--workspace", str(tmp_path), "--mcp-config", str(bad)]) == 1
    assert "MCP server 'x' needs a 'command' string" in capsys.readouterr().err
    assert main(["chat", "--workspace", str(tmp_path), "--mcp-config", str(tmp_path / "missing.json")]) == 1
    assert "MCP config file not found" in capsys.readouterr().err
