"""One rendezvous node for the rendezvous benchmark (one OS process per node).

python -m benchmarks._rdzv_node IMPL CONTROL_PORT N NODE ROUNDS RUN_PREFIX [etcd ETCD_ENDPOINT]
IMPL is the package that mirrors torch.distributed.elastic ("torch.distributed.elastic" or "elastic_impl").
The parent hosts a TCPStore on CONTROL_PORT; it is the control channel (go/done barriers, results) and, by default,
the store the c10d rendezvous backend uses; its client is then wrapped to count operations and bytes. With
``etcd ENDPOINT`` the rendezvous runs over that etcd server instead, through each implementation's registry (ours:
``etcd-v3``; upstream has only ``etcd-v2``), and store cost is not counted.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import time
from datetime import timedelta


def _counting_store_class(dist):
    class CountingStore(dist.Store):
        """Delegates to a real store; counts operations and the bytes of keys and values moved."""

        def __init__(self, inner):
            super().__init__()
            self._inner = inner
            self._lock = threading.Lock()
            self.reset()

        def reset(self):
            with self._lock:
                self.ops, self.bytes, self.by_op = 0, 0, {}

        def snapshot(self):
            with self._lock:
                return {"ops": self.ops, "bytes": self.bytes, "by_op": dict(self.by_op)}

        def _count(self, op, *payload):
            size = sum(len(p) if isinstance(p, (bytes, str)) else 8 for p in payload)
            with self._lock:
                self.ops += 1
                self.bytes += size
                self.by_op[op] = self.by_op.get(op, 0) + 1

        def set(self, key, value):
            self._count("set", key, value)
            return self._inner.set(key, value)

        def get(self, key):
            value = self._inner.get(key)
            self._count("get", key, value)
            return value

        def add(self, key, amount):
            self._count("add", key, amount)
            return self._inner.add(key, amount)

        def compare_set(self, key, expected, desired):
            value = self._inner.compare_set(key, expected, desired)
            self._count("compare_set", key, expected, desired, value)
            return value

        def check(self, keys):
            self._count("check", *keys)
            return self._inner.check(keys)

        def delete_key(self, key):
            self._count("delete_key", key)
            return self._inner.delete_key(key)

        def num_keys(self):
            self._count("num_keys")
            return self._inner.num_keys()

        def wait(self, keys, timeout=None):
            self._count("wait", *keys)
            return self._inner.wait(keys) if timeout is None else self._inner.wait(keys, timeout)

        def append(self, key, value):
            self._count("append", key, value)
            return self._inner.append(key, value)

        def multi_get(self, keys):
            values = self._inner.multi_get(keys)
            self._count("multi_get", *keys, *values)
            return values

        def multi_set(self, keys, values):
            self._count("multi_set", *keys, *values)
            return self._inner.multi_set(keys, values)

        def set_timeout(self, timeout):
            return self._inner.set_timeout(timeout)

    return CountingStore


def main(argv: list[str]) -> int:
    impl, port, n, node, rounds, prefix = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]), argv[5]
    etcd_endpoint = argv[7] if len(argv) > 7 and argv[6] == "etcd" else None
    import torch.distributed as dist

    control = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
    try:
        dynamic = importlib.import_module(f"{impl}.rendezvous.dynamic_rendezvous")
        c10d = importlib.import_module(f"{impl}.rendezvous.c10d_rendezvous_backend")
        api = importlib.import_module(f"{impl}.rendezvous")
        if etcd_endpoint:
            # Imported before "ready", as the c10d modules are: otherwise 16 nodes importing the etcd client at the
            # same moment on 2 cores add seconds to the first round's clock.
            etcd_module = "etcd_v3_rendezvous_backend" if impl == "elastic_impl" else "etcd_rendezvous_backend"
            importlib.import_module(f"{impl}.rendezvous.{etcd_module}")
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        control.set(f"{prefix}/error/{node}", f"{type(e).__name__}: {e}".splitlines()[0])
        control.add(f"{prefix}/ready", 1)
        return 3
    counting = _counting_store_class(dist)(
        dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120)))
    control.add(f"{prefix}/ready", 1)
    handlers = []
    for r in range(rounds):
        control.wait([f"{prefix}/go{r}"])
        run_id = f"{prefix}-r{r}"
        counting.reset()
        result = {"node": node, "pid": os.getpid()}
        try:
            if etcd_endpoint:
                handler = api.rendezvous_handler_registry.create_handler(api.RendezvousParameters(
                    backend="etcd-v3" if impl == "elastic_impl" else "etcd-v2", endpoint=etcd_endpoint,
                    run_id=run_id, min_nodes=n, max_nodes=n, join_timeout=300))
            else:
                backend = c10d.C10dRendezvousBackend(counting, run_id)
                handler = dynamic.DynamicRendezvousHandler.from_backend(
                    run_id=run_id, store=counting, backend=backend, min_nodes=n, max_nodes=n,
                    timeout=dynamic.RendezvousTimeout(join=timedelta(seconds=300)))
            handlers.append(handler)
            info = handler.next_rendezvous()
            result["t_end"] = time.time()
            # Older signatures return (store, rank, world_size); current ones a RendezvousInfo.
            if isinstance(info, tuple):
                result["rank"], result["world_size"] = info[1], info[2]
            else:
                result["rank"], result["world_size"] = info.rank, info.world_size
            if not etcd_endpoint:
                result.update(counting.snapshot())
        except Exception as e:  # noqa: BLE001 - reported to the parent as one line
            result["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        control.set(f"{prefix}/res{r}/{node}", json.dumps(result))
        control.wait([f"{prefix}/done{r}"])
    for handler in handlers:
        try:
            handler.shutdown()
        except Exception:  # noqa: BLE001, S110 - shutdown is best effort once measuring is over
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
