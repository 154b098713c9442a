"""A function with a hand-written backward pass, on every backend.

`custom_gradient(forward, backward, num_differentiable)` wraps `forward` so
that its gradient is `backward(upstream, *args)`, computed from the
arguments alone. Autodiff keeps every intermediate a function makes that its
backward pass reads; a hand-written backward keeps only the arguments and
recomputes the rest. Dropless dispatch uses it so that no `(rows, hidden)`
copy of the tokens is kept for the backward pass: the gathers are redone.

- JAX: `jax.custom_vjp`, the arguments as residuals.
- PyTorch: a `torch.autograd.Function` saving the arguments.
- TensorFlow: `tf.custom_gradient`, whose gradient function closes over the
  arguments only.

`custom_gradient(..., portable=True)` returns `forward` itself (the backend's
autodiff); the tests check that both give the same gradients.
"""

import functools

import keras

from keras_moe.backend.constants import as_tensor


def custom_gradient(forward, backward, num_differentiable, portable=False):
    """`forward` with the gradient `backward`.

    Args:
        forward: `forward(*args) -> tensor` or a tuple of tensors. The first
            `num_differentiable` arguments are float tensors that receive
            gradients; the others are integer tensors (indices) that receive
            none.
        backward: `backward(upstream, *args) -> tuple` of the gradients of
            the first `num_differentiable` arguments (same shapes and dtypes;
            `None` for a zero gradient), given the gradient `upstream` of the
            output (a tuple if `forward` returns one). It must not rely on
            state outside its arguments.
        num_differentiable: int, how many leading arguments get gradients.
        portable: bool, return `forward` (autodiff) instead. Defaults to
            `False`.

    Returns:
        A function of `*args` with `forward`'s output.
    """
    if portable:
        return forward
    backend = keras.backend.backend()
    if backend == "jax":
        fn = _jax_custom_gradient(forward, backward, num_differentiable)
    elif backend == "torch":
        fn = functools.partial(_torch_function().apply, forward, backward, num_differentiable)
    elif backend == "tensorflow":
        fn = _tf_custom_gradient(forward, backward, num_differentiable)
    else:
        return forward

    def with_tensors(*args):
        return fn(*(as_tensor(a) for a in args))

    return with_tensors


def _zeros_for_none(grads, args):
    return tuple(
        keras.ops.zeros_like(a) if g is None else g for g, a in zip(grads, args)
    )


def _jax_custom_gradient(forward, backward, num_differentiable):
    import jax

    def tupled(*args):
        outputs = forward(*args)
        return tuple(outputs) if isinstance(outputs, list) else outputs

    @jax.custom_vjp
    def fn(*args):
        return tupled(*args)

    def fn_forward(*args):
        return tupled(*args), args

    def fn_backward(args, upstream):
        grads = _zeros_for_none(backward(upstream, *args), args[:num_differentiable])
        # Integer arguments have no cotangent.
        return grads + (None,) * (len(args) - num_differentiable)

    fn.defvjp(fn_forward, fn_backward)
    return fn


def _tf_custom_gradient(forward, backward, num_differentiable):
    import tensorflow as tf

    @tf.custom_gradient
    def fn(*args):
        outputs = forward(*args)
        multiple = isinstance(outputs, (tuple, list))

        def grad(*upstream):
            upstream = tuple(upstream) if multiple else upstream[0]
            grads = _zeros_for_none(backward(upstream, *args), args[:num_differentiable])
            return list(grads) + [None] * (len(args) - num_differentiable)

        return (tuple(outputs) if multiple else outputs), grad

    def read_variables(*args):
        # A variable read inside would make tf.custom_gradient ask for the
        # variables' gradients separately; a tensor argument gets its own.
        return fn(*(tf.convert_to_tensor(getattr(a, "value", a)) for a in args))

    return read_variables


def made_once(factory):
    """`factory` called once; every call returns what it made.

    For the torch autograd Function classes (torch is imported lazily). On
    the torch backend the class is made here, at import (Keras' torch
    backend has imported torch already): made on first use inside
    `torch.compile`, its class statement would run in the traced frame,
    which dynamo cannot trace (a graph break per call). Elsewhere it is
    made on first use. Not `functools.lru_cache`: `torch.compile` traces
    through lru_cache wrappers; a read of this closure's list traces
    cleanly.
    """
    made = []
    if keras.backend.backend() == "torch":
        made.append(factory())

    @functools.wraps(factory)
    def get():
        if not made:
            made.append(factory())
        return made[0]

    return get


@made_once
def _torch_function():
    """The autograd Function, made on first use (torch is imported lazily)."""
    import torch

    class CustomGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, forward_fn, backward_fn, num_differentiable, *args):
            ctx.backward_fn = backward_fn
            ctx.num_differentiable = num_differentiable
            ctx.save_for_backward(*args)
            outputs = forward_fn(*args)
            ctx.multiple = isinstance(outputs, (tuple, list))
            return tuple(outputs) if ctx.multiple else outputs

        @staticmethod
        def backward(ctx, *upstream):
            upstream = upstream if ctx.multiple else upstream[0]
            args = ctx.saved_tensors
            n = ctx.num_differentiable
            grads = tuple(ctx.backward_fn(upstream, *args))
            grads = tuple(
                None if g is None or not ctx.needs_input_grad[3 + i] else g
                for i, g in enumerate(grads)
            )
            return (None, None, None) + grads + (None,) * (len(args) - n)

    return CustomGradient


def vjp(fn, *primals):
    """`(fn(*primals), vjp_fn)`: `vjp_fn(cotangent)` gives the primals' gradients.

    The backend's own autodiff of a small function (an activation) inside a
    hand-written backward pass; `keras.ops` has no vector-Jacobian product.

    Args:
        fn: function of float tensors, one tensor output.
        *primals: its arguments.

    Returns:
        `(output, vjp_fn)`; `vjp_fn(cotangent)` returns a tuple, one
        gradient per primal.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.vjp(fn, *primals)
    if backend == "torch":
        import torch

        if torch.compiler.is_compiling():
            # torch.compile traces `torch.func.vjp`, not `torch.autograd.grad`
            # (a graph break in every backward pass that calls this).
            return torch.func.vjp(fn, *primals)
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(True) for p in primals]
            out = fn(*leaves)

        def torch_vjp(cotangent):
            return torch.autograd.grad(out, leaves, cotangent, allow_unused=True)

        return out.detach(), torch_vjp
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            for p in primals:
                tape.watch(p)
            out = fn(*primals)

        def tf_vjp(cotangent):
            return tuple(tape.gradient(out, list(primals), output_gradients=cotangent))

        return out, tf_vjp
    raise NotImplementedError(f"vjp: no autodiff on backend {backend!r}")
