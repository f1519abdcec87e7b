
from elastic_impl.multiprocessing.subprocess_handler.subprocess_handler import SubprocessHandler

__all__ = ["get_subprocess_handler"]


def get_subprocess_handler(
    entrypoint: str,
    args: tuple,
    env: dict[str, str],
    stdout: str | None,
    stderr: str | None,
    local_rank_id: int,
    numa_options: object | None = None,
) -> SubprocessHandler:
    from elastic_impl.multiprocessing import prewarm

    options = dict(entrypoint=entrypoint, args=args, env=env, stdout=stdout, stderr=stderr,
                   local_rank_id=local_rank_id, numa_options=numa_options)
    pool = prewarm.current_pool()
    if pool is not None:  # an agent with pre-warmed interpreters is starting its workers (prewarm.serving)
        return prewarm.PrewarmedSubprocessHandler(pool, **options)
    return SubprocessHandler(**options)
