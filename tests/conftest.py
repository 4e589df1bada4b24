"""Shared test settings: hypothesis profiles and the markers of the reliability tests.

Profiles (``pytest --hypothesis-profile=NAME``):

* ``ci`` (default): derandomised, so every run draws the same examples; 1,000 examples
  per test, about 70 s for the property tests on two cores.
* ``long``: random seeds and many examples; ``pytest -m fuzz
  --hypothesis-profile=long`` runs more than 100,000 examples in all
  (see docs/reliability.md for the last run's figures).
* ``dev``: 500 random examples per test, for development.
* ``sanitize``: derandomised too, 300 examples per test (ASan/UBSan builds run
  several times slower; used by .ci/sanitize).

The markers ``fuzz`` and ``slow`` are registered in pyproject.toml.

Fixture ``one_kernel_thread``: test files of small problems take it with
``pytestmark = pytest.mark.usefixtures("one_kernel_thread")``. Fixture
``fast_path_off``: eval calls take the general path.
"""

import pytest
from hypothesis import HealthCheck, settings

import fastrnn

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("ci", derandomize=True, max_examples=1000, **_common)
settings.register_profile("sanitize", derandomize=True, max_examples=300, **_common)
settings.register_profile("long", max_examples=6_000, **_common)
settings.register_profile("dev", max_examples=500, **_common)   # a quick random run
settings.load_profile("ci")



@pytest.fixture(scope="module")
def one_kernel_thread():
    """Small problems run fastest (and most predictably on a shared machine) on one thread."""
    old = fastrnn.get_num_threads()
    fastrnn.set_num_threads(1)
    yield
    fastrnn.set_num_threads(old)


@pytest.fixture
def fast_path_off(monkeypatch):
    """Eval calls take the general path (fastrnn.functional): the fast path's entries
    (the modules' __call__ tries eval_call, their forward layer_forward / cell_forward)
    all decline."""
    from fastrnn import _fastpath
    for name in ("eval_call", "layer_forward", "cell_forward"):
        monkeypatch.setattr(_fastpath, name, lambda *args, **kwargs: None)
