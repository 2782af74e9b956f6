"""ablate's public API for plugins: your own representations, without forking ablate.

    import numpy as np
    from ablation_cli.api import representation

    @representation("col_norms", version=1, features=lambda shape: [f"col{j}" for j in range(shape[1])])
    def col_norms(x: np.ndarray) -> np.ndarray:  # (N, out, in) float32 -> (N, F)
        return np.linalg.norm(x, axis=1)

Then ``plugins = ["reps.py"]`` and ``representations = [..., "col_norms"]`` in the experiment config
(or an entry point in the group ``ablate.representations`` of your package). ``ablate reps`` lists it.
A classifier is a factory ``(seed) -> estimator`` decorated with :func:`classifier` (entry-point
group ``ablate.classifiers``), used as ``classifiers = [..., "<name>"]``.

- ``unit = "matrix"`` (the default): the function gets a stack of one layer's factor matrices,
  ``(N, out, in)`` float32, and returns ``(N, F)``. A layer config selects it per layer.
- ``unit = "module"``: the function gets ``(down, up, scale)`` of one module (a LoRA pair such as attn1.to_q):
  ``down`` ``(N, r, in)``, ``up`` ``(N, out, r)``, ``scale`` the alpha/r per LoRA ``(N,)`` that its library
  applies (kohya ``.alpha``, PEFT ``adapter_config.json``, diffusers metadata; 1.0 where the LoRA has no
  alpha), and returns ``(N, F)``. A layer config selects the module
  when it selects both its factors.
- ``features``: the feature names, one per column: a list, or a function of the unit's shape (a
  matrix: ``(out, in)``; a module: its down factor's ``(r, in)``) that returns the list.
- Numpy in, numpy out (a torch tensor is accepted too). Bump ``version`` when the numbers change on
  purpose; any edit of the plugin's source file already makes its cells stale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ablation_cli.features.plugins import ATTRIBUTE, FeatureNames, Unit, declare
from ablation_cli.training import plugins as classifier_plugins

__all__ = ["classifier", "representation"]

F = TypeVar("F", bound=Callable[..., Any])


def representation(name: str | None = None, *, features: FeatureNames, version: int = 1, unit: Unit = "matrix",
                   description: str = "") -> Callable[[F], F]:
    """Declare ``function`` an ablate representation named ``name`` (default: the function's name).
    The function is returned unchanged: call it yourself in a notebook as before."""

    def decorate(function: F) -> F:
        setattr(function, ATTRIBUTE, declare(function, name, version, unit, features, description))
        return function

    return decorate


def classifier(name: str | None = None, *, version: int = 1, seeded: bool = True,
               description: str = "") -> Callable[[F], F]:
    """Declare ``factory`` an ablate classifier: ``factory(seed)`` returns a fresh object with
    ``fit(X, y)`` and ``predict_proba(X)`` (X: the standardised features, float32; y: class indices),
    like a scikit-learn estimator. ``seeded=False``: the fit does not depend on the seed, so a cell
    fits it once and reports its result for every run. Use it as ``classifiers = ["<name>"]``."""

    def decorate(factory: F) -> F:
        declared = classifier_plugins.declare(factory, name, version, seeded, description)
        setattr(factory, classifier_plugins.ATTRIBUTE, declared)
        return factory

    return decorate
