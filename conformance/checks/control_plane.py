"""torch.distributed.elastic.control_plane: worker_main serves the worker's control-plane socket while active."""

from __future__ import annotations

import json

from conformance.registry import check


@check("control_plane.worker_main", timeout=60)
def worker_main(ctx) -> None:
    """A real worker process: inside ``with worker_main()`` POST /handler/ping over $TORCH_WORKER_SERVER_SOCKET
    answers pong and /handler/ lists the handlers; after the block nothing listens on the socket."""
    socket_path = str(ctx.tmpdir / "worker.sock")
    proc = ctx.run_python("worker_main", socket_path,
                          env={"TORCH_WORKER_SERVER_SOCKET": socket_path, "TORCH_CPP_LOG_LEVEL": "FATAL"})
    ctx.expect_equal(proc.returncode, 0, f"worker under worker_main() failed: {proc.stderr.strip()[-300:]!r}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    ctx.expect_equal(report["ping"], [200, "pong"], "POST /handler/ping inside worker_main()")
    status, body = report["handlers"]
    ctx.expect(status == 200 and "ping" in json.loads(body), f"GET /handler/ lists no 'ping': {report['handlers']}")
    ctx.expect_equal(report["after"], "ConnectionRefusedError", "the control-plane socket after leaving worker_main()")
    plain = ctx.run_python("exit", "0")  # without the variable nothing is served and nothing fails
    ctx.expect_equal(plain.returncode, 0, "a worker without TORCH_WORKER_SERVER_SOCKET")
    with ctx.get("control_plane.worker_main")():
        pass
