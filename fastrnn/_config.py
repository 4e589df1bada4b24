"""TEMPORARY thread config; replaced by the compiled-kernel version."""
import os
_n = [int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or os.cpu_count() or 1]
def set_num_threads(n): _n[0] = int(n)
def get_num_threads(): return _n[0]
def config(): return {"openmp": False, "num_threads": _n[0]}
def show_config(): print(config())
