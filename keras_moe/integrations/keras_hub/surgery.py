"""Changing a built keras-hub model in place, so that it still saves and loads.

keras-hub backbones are functional models whose decoder layers hold their
feed-forward sublayers as attributes. A conversion here swaps such sublayers
(or, where a decoder computes its feed-forward inline, the decoder's class
for one whose `call` uses a swapped-in layer) on the built model, keeping its
functional graph, inputs, outputs and every other weight.

`.keras` files hold a backbone's constructor config and its weights by
attribute path. A converted backbone therefore becomes an instance of a
registered subclass of its class (`Sparse<Backbone>`) whose config records
the conversions and whose constructor re-applies them, so
`keras.models.load_model` rebuilds the same structure and loads the weights
into it.
"""

import warnings

import keras
from keras import ops

#: Conversion kind -> function `(backbone, **arguments)` converting in place.
#: Filled by the modules that define conversions.
CONVERSIONS = {}

# Backbone class -> its converted subclass.
_CONVERTED_CLASSES = {}
# Decoder class -> (mixin) -> its subclass with an overridden `call`.
_DECODER_CLASSES = {}

# Cached compiled functions that close over the old variables.
_COMPILED_FUNCTIONS = ("train_function", "test_function", "predict_function", "generate_function")


def converted_class(base):
    """The registered `Sparse<Name>` subclass of a keras-hub backbone class.

    Instances record the conversions applied to them in their config
    (`keras_moe_conversions`) and re-apply them when constructed from it.
    Classes of the keras-hub models this integration knows are made (and
    registered as serializable under `"keras_moe"`) when the integration is
    imported; a file saved from a converted instance of another backbone
    class loads after `converted_class(ThatClass)` has been called once.

    Args:
        base: a `keras_hub.models.Backbone` subclass (or an already
            converted class, returned as is).

    Returns:
        The converted subclass.
    """
    if getattr(base, "_keras_moe_base", None) is not None:
        return base
    if base in _CONVERTED_CLASSES:
        return _CONVERTED_CLASSES[base]

    def __init__(self, *args, keras_moe_conversions=(), **kwargs):
        base.__init__(self, *args, **kwargs)
        _set_conversions(self, [])
        for conversion in keras_moe_conversions:
            apply_conversion(self, conversion["kind"], dict(conversion["arguments"]))
        if keras_moe_conversions:
            _after_surgery(self)

    def get_config(self):
        config = base.get_config(self)
        config["keras_moe_conversions"] = [
            {"kind": c["kind"], "arguments": dict(c["arguments"])}
            for c in getattr(self, "_keras_moe_conversions", [])
        ]
        return config

    cls = type(
        f"Sparse{base.__name__}",
        (base,),
        {
            "__init__": __init__,
            "get_config": get_config,
            "__module__": __name__,
            "__doc__": (
                f"`{base.__name__}` converted by keras_moe (see "
                "`keras_moe.integrations.keras_hub`); its config lists the "
                "conversions in `keras_moe_conversions`."
            ),
            "_keras_moe_base": base,
        },
    )
    cls = keras.saving.register_keras_serializable(package="keras_moe")(cls)
    _CONVERTED_CLASSES[base] = cls
    return cls


def _set_conversions(backbone, conversions):
    # Not a tracked attribute: a plain list of JSON-able dicts.
    object.__setattr__(backbone, "_keras_moe_conversions", conversions)


def apply_conversion(backbone, kind, arguments):
    """Converts `backbone` in place by the conversion `kind` and records it."""
    CONVERSIONS[kind](backbone, **arguments)
    conversions = list(getattr(backbone, "_keras_moe_conversions", []))
    conversions.append({"kind": kind, "arguments": dict(arguments)})
    _set_conversions(backbone, conversions)


def convert_model(model, kind, arguments):
    """Converts a backbone, or a task's backbone, in place; returns `model`.

    The backbone becomes an instance of `converted_class(type(backbone))`.
    Compiled functions cached on the model are dropped (they were traced
    with the old layers), and on the PyTorch backend the models' parameter
    registries are rebuilt.
    """
    import keras_hub

    if isinstance(model, keras_hub.models.Task):
        backbone = model.backbone
    elif isinstance(model, keras_hub.models.Backbone):
        backbone = model
    else:
        raise ValueError(
            "Expected a keras_hub.models.Backbone or a keras_hub.models.Task (e.g. a "
            f"CausalLM). Received: {type(model).__name__}"
        )
    for owner in {id(model): model, id(backbone): backbone}.values():
        optimizer = getattr(owner, "optimizer", None)
        if optimizer is not None and getattr(optimizer, "built", False):
            warnings.warn(
                f"The optimizer of this {type(owner).__name__} was built for its old "
                "variables; call `compile()` again before training the converted model.",
                stacklevel=3,
            )
    apply_conversion(backbone, kind, arguments)
    conversions = backbone._keras_moe_conversions
    object.__setattr__(backbone, "__class__", converted_class(type(backbone)))
    _set_conversions(backbone, conversions)
    for owner in {id(model): model, id(backbone): backbone}.values():
        _after_surgery(owner)
    return model


def _after_surgery(model):
    for name in _COMPILED_FUNCTIONS:
        if getattr(model, name, None) is not None:
            setattr(model, name, None)
    if hasattr(model, "_functional_layer_ids"):
        object.__setattr__(
            model, "_functional_layer_ids", {id(layer) for layer in model._flatten_layers()}
        )
    refresh_torch_parameters(model)


def refresh_torch_parameters(layer):
    """Rebuilds the torch parameter registries of `layer` and its sublayers.

    On the PyTorch backend each built Keras layer registers the torch
    parameters of all its variables when built; after sublayers were
    swapped, those registries would still hold the old variables and miss
    the new ones. Other backends have no such registry.
    """
    if keras.backend.backend() != "torch":
        return
    for sublayer in layer._flatten_layers(include_self=True):
        if hasattr(sublayer, "_torch_params"):
            sublayer._track_variables()


def replace_sublayer(parent, attr, new):
    """Puts layer `new` at `parent.<attr>`, in the old layer's place if any.

    The old layer (and its variables) leaves the parent's tracking, so it is
    neither saved nor trained; the new one takes its position among the
    parent's sublayers.
    """
    old = getattr(parent, attr, None)
    tracker = parent._tracker
    locked = tracker.locked
    tracker.unlock()
    try:
        if old is not None and tracker.is_in_store("layers", old):
            tracker.replace_tracked_value("layers", old, new)
        setattr(parent, attr, new)
    finally:
        if locked:
            tracker.lock()


def remove_sublayer(parent, attr):
    """Deletes `parent.<attr>` and untracks it (its variables go with it)."""
    old = getattr(parent, attr)
    parent._tracker.untrack(old)
    delattr(parent, attr)


def build_under(parent, layer, input_shape):
    """Builds `layer` as if `parent` had built it: variable paths under `parent`."""
    layer._parent_path = parent.path
    layer.build(input_shape)
    return layer


def assign_weights(layer, weights):
    """Assigns `{attribute path: tensor}` to `layer`'s variables, checking shapes."""
    for path, value in weights.items():
        variable = layer
        for name in path.split("."):
            variable = getattr(variable, name)
        value = ops.convert_to_tensor(value)
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"Cannot assign a tensor of shape {tuple(value.shape)} to `{path}` of shape "
                f"{tuple(variable.shape)} in {layer.name}."
            )
        variable.assign(ops.cast(value, variable.dtype))


def swap_decoder_class(decoder, mixin):
    """Makes `decoder` an instance of a subclass of its class with `mixin` first.

    Used where a keras-hub decoder computes its feed-forward inline in
    `call`: the mixin's `call` is the decoder's with the feed-forward
    replaced. Decoders are not serialized on their own (backbones rebuild
    them from their config), so these subclasses need no registration.
    """
    base = type(decoder)
    key = (base, mixin)
    if key not in _DECODER_CLASSES:
        _DECODER_CLASSES[key] = type(
            f"MoE{base.__name__}",
            (mixin, base),
            {"__module__": mixin.__module__},
        )
    object.__setattr__(decoder, "__class__", _DECODER_CLASSES[key])


def transformer_layers(backbone):
    """The decoder layers of a keras-hub backbone."""
    layers = getattr(backbone, "transformer_layers", None)
    if not layers:
        raise ValueError(
            f"{type(backbone).__name__} has no `transformer_layers`; keras_moe converts "
            "keras-hub decoder backbones (Mixtral, Qwen, Llama, Gemma, ...)."
        )
    return list(layers)


def keras_hub_class(module, name):
    """`keras_hub.src.models.<module>.<name>`, or None if this keras-hub lacks it.

    Model families arrive in different keras-hub releases; a conversion
    supports the families the installed keras-hub has.
    """
    import importlib

    try:
        return getattr(importlib.import_module(f"keras_hub.src.models.{module}"), name)
    except (ImportError, AttributeError):
        return None


def keras_hub_classes(*specs):
    """The classes of `(module, name)` specs this keras-hub has, as a tuple."""
    classes = (keras_hub_class(module, name) for module, name in specs)
    return tuple(cls for cls in classes if cls is not None)
