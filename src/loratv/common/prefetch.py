"""Read-ahead: read the next chunk on a worker thread while the caller computes on the current one."""

from concurrent.futures import ThreadPoolExecutor


def prefetched(jobs, read):
    """Yield (job, read(job, slot)) in order, reading one job ahead. `slot` alternates 0, 1 so that `read` can
    reuse two buffer sets: a result is valid until the caller asks for the next one.

    Args:
        jobs: the jobs, in order (consumed into a list first).
        read: called as read(job, slot) on one worker thread; its exceptions surface at the matching yield.

    Yields:
        (job, read(job, slot)) for each job in order; nothing for no jobs.
    """
    jobs = list(jobs)
    if not jobs:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratv-reader") as pool:
        pending = pool.submit(read, jobs[0], 0)
        for k, job in enumerate(jobs):
            result = pending.result()
            if k + 1 < len(jobs):
                pending = pool.submit(read, jobs[k + 1], (k + 1) % 2)
            yield job, result
