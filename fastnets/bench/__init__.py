"""The benchmark suite (DESIGN section 6): one harness behind `python -m fastnets.bench` and the
pytest-benchmark suite in benchmarks/.

    harness.py    timing (do_bench medians on a GPU, wall-clock medians on a CPU), peak memory, the run
    roofline.py   the machine's measured copy bandwidth and matrix rate; an op's roofline floor
    ops.py        the op cases: shapes, bytes and FLOPs, stock baselines, fastnets backends
    models.py     the model cases: stock form against fastnets.fuse(), inference and a training step
    report.py     progress, the terminal table, JSON, plots, targets, the README table
    measured.py   the FASTEST/PROVEN entries for fastnets/_measured.py from a committed GPU run
    __main__.py   the command line

It imports no fastnets kernel module at import time: the cases look their ops up when they run, and
a case whose op has not landed yet is skipped with that reason.
"""
