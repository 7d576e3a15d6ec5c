"""collector.py: a job's process freezes its imports so that full garbage collections skip them (issue 15, goal 5).

Run in a process of its own: a frozen object is never collected, so freezing pytest's own process would keep every
earlier test's objects for the rest of the session."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

CHILD = r"""
import gc, json, weakref
import torch, transformers, peft  # what a run imports before its job starts (unsloth too, on a GPU)
from unsloth_med import collector

start = collector.track()
gc.collect()
tracked_before = len(gc.get_objects())
frozen = collector.freeze_imports()

class Node:
    pass

node = Node()
node.self, node.weights = node, torch.zeros(1024)  # a reference cycle holding a tensor: only the collector frees it
alive = weakref.ref(node)
del node
gc.collect()
print(json.dumps({"frozen": frozen, "tracked_before": tracked_before, "tracked_after": len(gc.get_objects()),
                  "cycle_freed": alive() is None, "record": collector.since(start)}))
"""


def test_freezing_the_imports_leaves_full_collections_little_to_walk_and_still_frees_new_garbage():
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # The imported libraries are most of what the collector tracked: all of it is frozen, little is left to walk.
    assert result["frozen"] > 100_000 and result["frozen"] >= 0.9 * result["tracked_before"], result
    assert result["tracked_after"] < 0.05 * result["frozen"], result
    # What the job creates afterwards is still collected: a cycle made after the freeze is freed.
    assert result["cycle_freed"], result
    # The record run.json gets: the collections since track() (the child's two and freeze_imports' own; the
    # interpreter may add its own), their seconds, and the frozen count.
    record = result["record"]
    assert record["collections"] >= 3 and record["seconds"] > 0, record
    assert record["frozen_objects"] == result["frozen"], record
