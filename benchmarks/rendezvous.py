"""Rendezvous latency and store cost for N local agents (c10d, min = max = N), one OS process per node."""

from __future__ import annotations

import json
import math
import time
import uuid
from datetime import timedelta

from benchmarks._harness import (
    Unavailable,
    bench_env,
    free_port,
    module_available,
    python,
    ratio,
    run_side,
    spawn,
    stop_group,
    summarize,
)

IMPLS = {"ours": "elastic_impl", "upstream": "torch.distributed.elastic"}


def measure(side: str, n: int, rounds: int, timeout: float = 60.0, etcd_endpoint: str | None = None) -> dict:
    impl = IMPLS[side]
    reason = module_available(f"{impl}.rendezvous.dynamic_rendezvous")
    if reason:
        raise Unavailable(reason)
    import torch.distributed as dist

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=timeout), wait_for_workers=False)
    prefix = f"bench-{side}-{n}-{uuid.uuid4().hex[:6]}"
    env = bench_env()
    over_etcd = ["etcd", etcd_endpoint] if etcd_endpoint else []
    procs = [spawn([python(), "-m", "benchmarks._rdzv_node", impl, str(port), str(n), str(i), str(rounds), prefix,
                    *over_etcd], env)
             for i in range(n)]
    try:
        # Every node has imported and connected before the clock starts: we time rendezvous, not `import torch`.
        # N processes importing torch at once on 2 (shared) cores take a while, hence a start-up budget per node.
        deadline = time.time() + timeout + 10 * n
        while store.add(f"{prefix}/ready", 0) < n:
            dead = [p.returncode for p in procs if p.poll() is not None]
            if dead:
                raise Unavailable(f"a node process exited rc={dead[0]} before it was ready")
            if time.time() > deadline:
                raise Unavailable(f"nodes not ready within {timeout + 10 * n:.0f}s")
            time.sleep(0.05)
        errors = [store.get(f"{prefix}/error/{i}").decode() for i in range(n) if store.check([f"{prefix}/error/{i}"])]
        if errors:
            raise Unavailable(errors[0])
        latencies, ops, nbytes, by_op = [], [], [], {}
        for r in range(rounds):
            t0 = time.time()
            store.set(f"{prefix}/go{r}", "1")
            keys = [f"{prefix}/res{r}/{i}" for i in range(n)]
            # Upstream needs seconds per round at N = 16 (more on a loaded machine); the bound only stops a hang.
            store.wait(keys, timedelta(seconds=timeout + 10 * n))
            results = [json.loads(store.get(k)) for k in keys]
            store.set(f"{prefix}/done{r}", "1")
            failed = [res["error"] for res in results if "error" in res]
            if failed:
                raise Unavailable(f"rendezvous failed: {failed[0]}")
            ranks = sorted(res["rank"] for res in results)
            if ranks != list(range(n)) or {res["world_size"] for res in results} != {n}:
                raise Unavailable(f"rendezvous gave invalid ranks {ranks} / world sizes")
            latencies.append(max(res["t_end"] for res in results) - t0)
            ops.append(sum(res.get("ops", 0) for res in results))
            nbytes.append(sum(res.get("bytes", 0) for res in results))
            for res in results:
                for op, count in res.get("by_op", {}).items():
                    by_op[op] = by_op.get(op, 0) + count
        for p in procs:
            p.wait(timeout=30)
        out = summarize(latencies)
        if etcd_endpoint:
            return out  # store cost is counted on the c10d store only
        out["store_ops_per_rendezvous"] = summarize(ops)["median"]
        out["store_bytes_per_rendezvous"] = summarize(nbytes)["median"]
        out["store_ops_per_node"] = out["store_ops_per_rendezvous"] / n
        out["store_bytes_per_node"] = out["store_bytes_per_rendezvous"] / n
        out["store_ops_by_kind"] = {k: v / rounds for k, v in sorted(by_op.items())}
        return out
    finally:
        for p in procs:
            stop_group(p, grace=2.0)
        del store


def run(quick: bool) -> dict:
    sizes = (2, 4) if quick else (2, 4, 8, 16)
    rounds = 1 if quick else 5
    cases = {}
    broken: dict[str, str] = {}
    for n in sizes:
        case = {}
        for side in ("upstream", "ours"):
            # A side that failed at a smaller N would only burn its timeout again at a larger one.
            case[side] = {"unavailable": broken[side]} if side in broken else run_side(measure, side, n, rounds)
            if "unavailable" in case[side] and side not in broken:
                broken[side] = f"failed at N={n}: {case[side]['unavailable']}"
        case["ratio"] = ratio(case["ours"], case["upstream"])
        cases[f"N={n}"] = case
    cases.update(_etcd_cases(sizes[-1] if quick else 16, 1 if quick else 3))
    growth = {side: _growth_exponent(cases, side, "store_ops_per_rendezvous") for side in ("ours", "upstream")}
    byte_growth = {side: _growth_exponent(cases, side, "store_bytes_per_rendezvous") for side in ("ours", "upstream")}
    return {
        "description": "N local agents (one process each), c10d on one TCPStore (and, at N=16, over one etcd), "
                       "min=max=N: all started -> all have a rank (s); store ops/bytes summed over nodes per "
                       "rendezvous (c10d only)",
        "unit": "s", "target": "N=16: ours <= 0.5x upstream, store ops O(N)",
        "cases": cases,
        # k in cost ~ N^k between the smallest and largest N (1 = linear, 2 = quadratic).
        "store_ops_growth_exponent": growth,
        "store_bytes_growth_exponent": byte_growth,
    }


def _etcd_cases(n: int, rounds: int) -> dict:
    """N nodes over one real etcd server: ours (etcd-v3: keyed arrivals, leases) vs upstream (etcd-v2, the only
    etcd backend it has; this etcd serves both APIs)."""
    try:
        from elastic_impl.rendezvous.etcd_server import EtcdServer, find_etcd_binary

        find_etcd_binary()
    except (ImportError, FileNotFoundError) as e:
        reason = {"unavailable": f"no etcd server to run against: {e}"}
        return {f"N={n} etcd": {"ours": reason, "upstream": reason, "ratio": None}}
    server = EtcdServer()
    try:
        server.start(timeout=60)
        case = {side: run_side(measure, side, n, rounds, etcd_endpoint=server.get_endpoint())
                for side in ("upstream", "ours")}
    finally:
        server.stop()
    case["ratio"] = ratio(case["ours"], case["upstream"])
    case["note"] = "ours: etcd-v3 backend (keyed arrivals, lease heartbeats); upstream: etcd-v2 (it has no v3 backend)"
    return {f"N={n} etcd": case}


def _growth_exponent(cases: dict, side: str, key: str) -> float | None:
    points = [(int(name.split("=")[1]), case[side].get(key)) for name, case in cases.items()
              if name.split("=")[1].isdigit()]
    points = [(n, v) for n, v in points if v]
    if len(points) < 2:
        return None
    (n0, v0), (n1, v1) = points[0], points[-1]
    return math.log(v1 / v0) / math.log(n1 / n0)
