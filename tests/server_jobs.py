"""Data safety on a real Milvus server: whole `embed-job run`s against a server started in a
fresh network namespace (see milvus_server.py), run as a script under ``unshare -n``:

    unshare -n python tests/server_jobs.py

It checks that a collection made by hand and another job's index survive, and that a lost
sync state is rebuilt from the server; exits 0 after printing OK_LINE.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from helpers.cli import run  # noqa: E402
from helpers.jobs import demo_docs, make_job, state_dir  # noqa: E402
from helpers.rows import milvus_collections  # noqa: E402
from milvus_server import PORT, serve_in_namespace  # noqa: E402

URI = f"http://127.0.0.1:{PORT}"
OK_LINE = "server data-safety scenario ok"
SMALL = {"chunking": {"max_tokens": 64, "overlap_tokens": 0},
         "batching": {"token_budget": 512, "max_batch_size": 8},
         "sink": {"uri": URI, "retry_base_delay_s": 0.01}}


def hand_made(name: str) -> None:
    from pymilvus import DataType, MilvusClient

    client = MilvusClient(URI)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("pk", DataType.VARCHAR, max_length=64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=4)
    index = client.prepare_index_params()
    index.add_index(field_name="vector", index_type="AUTOINDEX", metric_type="COSINE")
    client.create_collection(name, schema=schema, index_params=index)
    client.close()


def scenario(tmp: Path) -> None:
    docs = demo_docs(8)
    a = make_job(tmp / "a", docs, **SMALL)
    first = run(a, process=True)
    assert first.exit_code == 0, first.stderr
    hand_made("t__my_backup")
    # another job, same collection name, other dimension: refused before embedding
    b = make_job(tmp / "b", docs[:3], name="other", model={"dimension": 128}, **SMALL)
    done = run(b, process=True)
    assert done.exit_code == 2 and "made by job 't'" in done.stderr and \
        done.report["tokens_embedded"] == 0, done.stderr
    # a model change with keep_previous 0 drops only the job's own previous collection
    changed = make_job(tmp / "a", docs, **{**SMALL, "chunking": {"max_tokens": 48,
                                                                 "overlap_tokens": 0}},
                       sync={"keep_previous": 0})
    done = run(changed, process=True)
    assert done.exit_code == 0, done.stderr
    collections = milvus_collections(URI)
    assert collections == sorted(["t__my_backup", done.report["target"]]), collections
    # the sync state is lost: rebuilt from the server, nothing embedded again
    shutil.rmtree(state_dir(changed).root)
    done = run(changed, process=True)
    assert done.exit_code == 5 and done.report["tokens_embedded"] == 0, done.stderr
    assert "rebuilt from the live generation" in done.stderr, done.stderr
    said = next(line for line in done.stderr.splitlines() if "rebuilt from the live" in line)
    print(f"collections {milvus_collections(URI)}; {said[said.find('sync state'):][:110]}",
          flush=True)


def main() -> int:
    return serve_in_namespace(lambda _, data: scenario(data / "jobs"), OK_LINE)


if __name__ == "__main__":
    sys.exit(main())
