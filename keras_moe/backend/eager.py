"""Eager JAX calls of a layer's computation, compiled once and reused.

Outside `jit`, JAX runs `keras.ops` op by op, and every loop primitive
(`lax.fori_loop`, `lax.scan`, `lax.while_loop`) is compiled anew on each call
because its body is a fresh closure. Dropless dispatch loops over experts
and blocks, so an eager call of a dropless layer cost ~0.4 s of compilation
where a capacity-mode call takes milliseconds. Inside `fit`, `predict` and
`jax.jit` this does not arise (the step is traced once), but eager calls —
interactive use, `model(x)`, tests — pay it on every call.

`eager_jit(layer, key, fn, *args)` runs `fn(layer, *args)` through a
`jax.jit` compiled once per layer configuration, variable shapes, `key` and
argument shapes, with the layer's variables passed as arguments (through a
`keras.StatelessScope`), so later calls — of this layer or of another one
configured alike — reuse the compiled program with their own weights.
Elsewhere (other backends, traced arguments, layers whose config cannot be
serialized) it returns `None` and the caller runs `fn` itself.
"""

import json

import keras

# (layer class, config, variable shapes and dtypes, key) -> jitted function
_COMPILED = {}
_MAX_ENTRIES = 256


def _layer_key(layer):
    try:
        config = json.dumps(layer.get_config(), sort_keys=True, default=repr)
    except Exception:  # noqa: BLE001 - unserializable configs just run eagerly
        return None
    variables = tuple((tuple(v.shape), str(v.dtype)) for v in layer.variables)
    return type(layer), config, variables, layer.dtype_policy.name


def eager_jit(layer, key, fn, *args):
    """`fn(layer, *args)` compiled and cached under eager JAX, else `None`.

    Args:
        layer: a built Keras layer whose variables `fn` reads (and does not
            write: no random state, no updates).
        key: hashable, what else selects the program (strategy, flags).
        fn: `fn(layer, *args)` returning a tensor or a structure of tensors.
        *args: tensors.

    Returns:
        The result, or `None` where this does not apply (not JAX, arguments
        being traced, a symbolic or stateless scope active, an unserializable
        layer config).
    """
    if keras.backend.backend() != "jax":
        return None
    import jax
    from keras.src.backend.common.stateless_scope import in_stateless_scope
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope

    if in_stateless_scope() or in_symbolic_scope():
        return None
    leaves = jax.tree_util.tree_leaves(args)
    if any(isinstance(t, jax.core.Tracer) for t in leaves):
        return None
    layer_key = _layer_key(layer)
    if layer_key is None:
        return None
    cache_key = layer_key + (key,)
    compiled = _COMPILED.get(cache_key)
    if compiled is None:
        if len(_COMPILED) >= _MAX_ENTRIES:
            _COMPILED.clear()
        # The first layer of this configuration traces the program; later
        # layers pass their own variable values in place of its variables.
        template, variables = layer, list(layer.variables)

        def run(values, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn(template, *args)

        compiled = _COMPILED[cache_key] = jax.jit(run)
    values = [v.value for v in layer.variables]
    return compiled(values, *args)
