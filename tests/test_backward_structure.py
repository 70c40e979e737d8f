"""The DiT backward program keeps its shape on XLA:CPU: each block's backward reads one stored
residual-stream gradient (`dit.materialize_gradient`) instead of recomputing the gradient chain
of every later block inside its own fusions.

Speed itself is a benchmark's business (benchmarks/vs_pytorch.py, BENCHMARKS.md); what a test
can check without timing is the structure that made the difference: without the boundary, the
largest fusion of a depth-L gradient has O(L) operands (222 for DiT-S/2: the residual gradient
chain over all later blocks, recomputed per consumer, quadratic work in depth), with it the
size of one block's backward, whatever the depth.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dydit_jax.models import DiT, dit as dit_lib

SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, num_heads=4,
             num_classes=10)


def largest_fusion_operands(depth: int) -> int:
    model = DiT(**SMALL, depth=depth)
    x, t, y = jnp.zeros((2, 8, 8, 4)), jnp.array([1.0, 500.0]), jnp.array([1, 2])
    params = model.init(jax.random.PRNGKey(0), x, t, y)
    grad = jax.jit(jax.grad(lambda p: jnp.mean(model.apply(p, x, t, y) ** 2)))
    hlo = grad.lower(params).compile().as_text()
    counts = [len(re.findall(r"parameter\(\d+\)", body))
              for body in re.findall(r"\n%fused[\w.\-]* \(.*?\n}\n", hlo, flags=re.S)]
    return max(counts)


def test_largest_backward_fusion_does_not_grow_with_depth():
    shallow, deep = largest_fusion_operands(2), largest_fusion_operands(8)
    assert deep <= shallow + 4, (shallow, deep)


def test_without_the_boundary_the_fusions_grow(monkeypatch):
    """The test above has teeth: with the boundary replaced by the identity, XLA fuses the
    residual gradient chain across blocks and the largest fusion grows with depth."""
    monkeypatch.setattr(dit_lib, "materialize_gradient", lambda x: x)
    shallow, deep = largest_fusion_operands(2), largest_fusion_operands(8)
    assert deep > shallow + 20, (shallow, deep)


def test_the_boundary_leaves_values_and_gradients_unchanged():
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5))
    f = lambda a: jnp.sum(jnp.sin(dit_lib.materialize_gradient(a * 2.0)) ** 2)  # noqa: E731
    g = lambda a: jnp.sum(jnp.sin(a * 2.0) ** 2)  # noqa: E731
    np.testing.assert_array_equal(f(x), g(x))
    np.testing.assert_array_equal(jax.grad(f)(x), jax.grad(g)(x))
    nan = x.at[0, 0].set(jnp.nan)                    # the conditional's other branch
    np.testing.assert_array_equal(jax.grad(f)(nan), jax.grad(g)(nan))
