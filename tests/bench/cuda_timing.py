# Median wall time of a GPU callable measured with CUDA events, shared by the PyTorch peers
# (sdpa_peer.py, sdpa_long.py). `torch` is passed in so callers may import it lazily.


def median_ms(torch, fn, reps, warmup=0):
    """Median of `reps` timed calls of fn() in ms, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]
