"""SparseMoE's training step traces as one graph under torch.compile, compiled once.

Keras' `jit_compile=True` on PyTorch is `torch.compile` of the training step.
A graph break splits the step into pieces that run eagerly in between, and a
recompilation on every step compiles forever: before these tests, the
dropless layer's forward broke the graph 21 times (an autograd Function
class made inside the trace, `torch.autograd.grad` in a backward pass,
Keras' torch `max` and `segment_sum`, a cache written inside the trace) and
the step recompiled on every call (Keras' in-place clearing of the router's
losses made dynamo guard on the previous step's loss tensor).

Dynamo only (a backend that counts and runs the captured graphs eagerly), so
the test takes seconds, not an Inductor compile.
"""

import keras
import numpy as np
import pytest

from keras_moe.layers import SparseMoE

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="torch.compile is PyTorch's"
)


class _CountingBackend:
    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.mark.parametrize(
    "capacity_factor, dtype",
    [(None, "float32"), (None, "bfloat16"), (1.25, "float32")],
    ids=["dropless-float32", "dropless-bfloat16", "capacity-float32"],
)
def test_training_step_is_one_graph_compiled_once(capacity_factor, dtype):
    import torch

    torch._dynamo.reset()
    layer = SparseMoE(
        num_experts=4,
        intermediate_dim=8,
        top_k=2,
        gated=True,
        capacity_factor=capacity_factor,
        shared_intermediate_dim=8,
        dtype=dtype,
    )
    x = keras.ops.convert_to_tensor(
        np.random.default_rng(0).standard_normal((2, 6, 8)).astype("float32")
    )
    layer.build(x.shape)

    def forward_loss(x):
        y = layer(x, training=True)
        loss = keras.ops.mean(keras.ops.square(keras.ops.cast(y, "float32")))
        for aux in layer.losses:
            loss = loss + keras.ops.cast(aux, "float32")
        return loss

    backend = _CountingBackend()
    # fullgraph: any graph break raises.
    compiled = torch.compile(forward_loss, backend=backend, fullgraph=True)
    eager_loss = float(forward_loss(x))
    for _ in range(4):
        for v in layer.trainable_variables:
            v.value.grad = None
        loss = compiled(x)
        loss.backward()
    # The first two calls may compile (Keras sets a global call-context
    # attribute on its first call); later steps reuse the graph.
    graphs_after_two = backend.graphs
    for _ in range(3):
        compiled(x).backward()
    assert backend.graphs == graphs_after_two <= 2
    np.testing.assert_allclose(float(loss), eager_loss, rtol=1e-2 if dtype == "bfloat16" else 1e-5)
    assert all(v.value.grad is not None for v in layer.trainable_variables if v.trainable)
