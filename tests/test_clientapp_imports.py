"""What a ClientApp process imports. In deployment flwr 1.42 runs every message in a fresh `flwr-clientapp` process
(docs/PERFORMANCE.md, Deployment), so what the ClientApp module imports is paid per message: torch, transformers, peft
and sentence-transformers cost ~9 s of a process's start on 2 cores. A query message with the server's query vectors
(what the ServerApp's query run always sends) needs none of them; train and evaluate import them themselves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL_LIBRARIES = ("torch", "transformers", "peft", "sentence_transformers")

SCRIPT = """
import json, sys
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from fedrag_app.flower import client_app

LIBRARIES = {libraries!r}
at_import = [m for m in LIBRARIES if m in sys.modules]
args = json.loads(sys.argv[1])
metadata = Metadata(
    run_id=1, message_id="m0", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="q0",
    created_at=0.0, ttl=3600, message_type="query.retrieve",
)
query = {{"questions": ["q"], "vectors": args["vectors"], "top-k": 2, "embedding-model": args["model"]}}
context = Context(run_id=1, node_id=7, node_config=args["node"], state=RecordDict(), run_config={{}})
reply = client_app.retrieve_passages(Message(RecordDict({{"query": ConfigRecord(query)}}), metadata=metadata), context)
after = [m for m in LIBRARIES if m in sys.modules]
print(json.dumps({{"counts": list(reply.content["docs"]["counts"]), "at-import": at_import, "after": after}}))
"""


def test_a_query_message_with_the_servers_vectors_imports_no_model_library(small_shard_path, retriever, tmp_path):
    vector = retriever.encode_queries(["who founded the red cross"]).cpu().numpy()[0]
    node = {
        "partition-id": 0,
        "num-partitions": 1,
        "data-path": str(tmp_path / "train.jsonl"),
        "store-path": small_shard_path,
        "federated-retrieval": True,
    }
    args = {"vectors": vector.tolist(), "model": retriever.name, "node": node}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(libraries=MODEL_LIBRARIES), json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["counts"] == [2], "the node answered from its shard"
    assert out["at-import"] == [], f"the ClientApp module imports {out['at-import']}"
    assert out["after"] == [], f"a query message with the server's vectors imported {out['after']}"
