"""The endpoint issue's client tests, unchanged, against a server whose model runs on two ranks
(`k2mlx serve --hosts 127.0.0.1,127.0.0.1`), as a pipeline and under tensor parallelism: the
engine and server run on top of `PipelineModel` / `TensorModel` exactly as on a local model
(prefix cache, batching, tools, streams)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "server"))

import test_clients as _clients  # noqa: E402
from k2serve_util import start_server, stop_server  # noqa: E402

# every client test that runs against the shared `server` fixture (the others start their own
# single-process servers to check CLI flags, which says nothing about the pipeline)
for _name in dir(_clients):
    if _name.startswith("test_") and _name not in ("test_non_loopback_bind_without_key_is_refused",
                                                   "test_api_key_is_enforced",
                                                   "test_cluster_endpoint_absent_on_single_process"):
        globals()[_name] = getattr(_clients, _name)
oa, an = _clients.oa, _clients.an


@pytest.fixture(scope="module", params=["pipeline", "tensor"])
def server(tiny_checkpoint, tmp_path_factory, request):
    os.environ["K2MLX_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    proc, base = start_server(tiny_checkpoint, "--max-batch", "8", "--hosts", "127.0.0.1,127.0.0.1",
                              "--parallel", request.param)
    yield base
    stop_server(proc)


@pytest.fixture(scope="module")
def no_stop(tiny_tokenizer) -> dict[str, float]:
    return {str(t): -100 for t in tiny_tokenizer.eos_token_ids}


def test_cluster_endpoint_lists_ranks(server):
    """GET /v1/cluster: rank 0's health snapshot (hosts, ranks, layers, memory, health)."""
    import httpx

    r = httpx.get(server + "/v1/cluster", timeout=10)
    assert r.status_code == 200
    ranks = r.json()["ranks"]
    assert [x["rank"] for x in ranks] == [0, 1]
    assert all(x["health"] == "ok" for x in ranks)
    layers = [x["layers"] for x in ranks]
    if r.json()["parallel"] == "tensor":  # every rank runs every layer (half of each)
        assert layers[0] == layers[1] == [0, 4]
    else:
        assert layers[0][0] == 0 and layers[1][0] == layers[0][1]  # contiguous [start, stop) split
