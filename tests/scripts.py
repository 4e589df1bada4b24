"""Load a script of the repository (bench/, examples/) as a module, for tests that call
its main() at a small size."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(relative_path):
    """The module of ROOT / relative_path (e.g. "bench/float64.py"), freshly executed."""
    path = ROOT / relative_path
    name = "fastrnn_" + "_".join(path.with_suffix("").parts[-2:])
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
