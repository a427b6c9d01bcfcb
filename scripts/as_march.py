"""Run a Python module with the compiled CPU kernels built for another instruction set than this CPU's own.

    python scripts/as_march.py haswell -m remix.kernels.bench --tokens 32      # the kernels an AVX2-only CPU gets
    python scripts/as_march.py haswell -m pytest -q tests/test_kernels.py

The kernels are normally built with -march=native; here with -march=MARCH (any GCC -march value this CPU can run, e.g.
haswell for AVX2 + FMA without AVX-512), in a build directory of their own, then the module runs as `python -m` would
run it. For checking and timing the code paths of CPUs one does not have; the project itself never needs it.
"""

from __future__ import annotations

import os
import runpy
import sys


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "-m":
        sys.exit("usage: python scripts/as_march.py MARCH -m MODULE [ARGS...]")
    march, module, rest = argv[0], argv[2], argv[3:]
    from remix.kernels import cpu_ext

    cpu_ext.FLAG_SETS = [[f"-march={march}", "-fopenmp"]]
    env_tag = cpu_ext._env_tag
    cpu_ext._env_tag = lambda: f"{env_tag()}_{march}"
    if cpu_ext.load() is None:
        sys.exit(f"the kernels did not build with -march={march}")
    sys.argv = [module, *rest]
    sys.path[0] = os.getcwd()  # as `python -m` has it (not this script's folder)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
