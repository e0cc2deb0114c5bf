"""A bare MPyC player for the MPC benchmark: the same secure work as the platform's stage for
``COUNT(*), SUM(x)`` with a minimum group size, and nothing else.

    python benchmarks/mpc_bare.py INPUT OUT --ssl --no-log -I i -T t -P host:port ...

INPUT (JSON): ``{"groups", "holders", "cut", "cmp_bits", "int_bits", "cap": [...] or null,
"values": [[rows...], [sums...]] or null}``. Per player: input the capped counts and the
``2 x groups`` matrix, add them, one comparison per group (``np_sgn`` of ``cap - cut``), open the
pattern, open the passing columns. OUT gets the MPC seconds and the number of passing groups.
"""

import json
import os
import sys
import time

import numpy as np

inp, out = sys.argv[1], sys.argv[2]
del sys.argv[1:3]  # MPyC parses the rest of sys.argv when imported
from mpyc.runtime import mpc  # noqa: E402


def total(stype, values, shape, senders):
    x = stype.array(np.array(values if values is not None else np.zeros(shape, dtype=object), dtype=object))
    shares = mpc.input(x.reshape(shape), senders)
    acc = shares[0]
    for s in shares[1:]:
        acc = acc + s
    return acc


async def main():
    doc = json.load(open(inp))
    g, senders = doc["groups"], list(range(doc["holders"]))
    await mpc.start()
    t0 = time.perf_counter()
    small, big = mpc.SecInt(max(doc["cmp_bits"] + 2, 16)), mpc.SecInt(doc["int_bits"])
    cap = total(small, doc["cap"], (g,), senders)
    below = mpc.np_sgn(cap - doc["cut"], l=doc["cmp_bits"], LT=True)
    values = total(big, doc["values"], (2, g), senders)
    pattern = np.asarray(await mpc.output(below)).reshape(-1)
    passing = np.flatnonzero(pattern == 0)
    opened = await mpc.output(values[:, passing]) if len(passing) else []
    seconds = time.perf_counter() - t0
    await mpc.shutdown()
    with open(out, "w") as f:
        json.dump({"seconds": seconds, "passing": len(passing), "checksum": int(np.asarray(opened).sum())}, f)


mpc.run(main())
os._exit(0)  # as the platform's player does: no interpreter teardown
