"""Batches per second the host can feed the GPU-size synthetic demo (``experiments.synthetic
--config=gpu``: 256x512 images, batch 8), with the embedded pair rendered for every batch (the
generator called by the pipeline's workers, as before) and rendered once (``RenderedSource``, as a
run does now), through the source phase's own stream (``cbst_jax.trainer.mixed_iterator``). No
network runs: this is the step rate the host alone allows, the bound of a device faster than it.

    python -m benchmarks.bench_synthetic_pipeline --images 200 --batches 40 --workers 2

Both variants are timed interleaved, ``--chunk`` batches each in turn (a drifting load hits them
alike), after one untimed batch each; also the one-off time of rendering the split once. One JSON
line per variant on stdout.
"""
import argparse
import json
import os
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="source images (the split cycled over)")
    parser.add_argument("--batches", type=int, default=40, help="batches timed per variant")
    parser.add_argument("--chunk", type=int, default=5, help="batches per variant per turn")
    parser.add_argument("--workers", type=int, default=2, help="input.workers (threads, as the recipe)")
    parser.add_argument("--variant", default="gpu", help="the synthetic recipe's variant")
    args = parser.parse_args(argv)
    from cbst_jax import settings
    from cbst_jax.data.splits import Splits, open_side
    from cbst_jax.data.synthetic import RenderedSource
    from cbst_jax.trainer import mixed_iterator
    from experiments.configs import synthetic

    config = synthetic.get_config(args.variant)
    config.synthetic.num_source = args.images
    config.input.workers = args.workers
    on_the_fly = open_side(config, "source", config.source.split)
    t0 = time.perf_counter()
    rendered = RenderedSource(on_the_fly, args.workers)
    render_s = time.perf_counter() - t0
    streams = {}
    for name, source in (("rendered per batch", on_the_fly), ("rendered once", rendered)):
        data = Splits(source, source, None, [], None, None, {})
        it = mixed_iterator(data, settings.source_phase(config, config.seed))
        next(it)  # the workers' start
        streams[name] = (it, [])
    for _ in range(-(-args.batches // args.chunk)):
        for it, times in streams.values():
            for _ in range(args.chunk):
                t = time.perf_counter()
                next(it)
                times.append(time.perf_counter() - t)
    for name, (it, times) in streams.items():
        it.close()
        seconds = sum(times)
        print(json.dumps(dict(variant=name, batches_per_s=round(len(times) / seconds, 2),
                              images_per_s=round(len(times) * config.input.batch_size / seconds, 1),
                              batch=config.input.batch_size, size=[config.synthetic.height, config.synthetic.width],
                              workers=args.workers, worker_kind=config.input.worker_kind, batches=len(times),
                              render_once_s=round(render_s, 1) if name == "rendered once" else None,
                              images=args.images, load_avg=[round(x, 2) for x in os.getloadavg()])))


if __name__ == "__main__":
    main()
