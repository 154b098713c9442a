"""Loading `.keras` files written by earlier versions of keras_moe.

Layers gain state over time (loss-weight variables, routing statistics).
Keras loads a layer's own variables by position and refuses a file with
fewer of them than the layer has. A layer lists the names of the variables
it added after the first release, in the order they were added (each always
created after the older ones), and `load_own_variables` here fills the older
variables from a file written before some of them existed, leaving the
missing ones at their initial values.
"""


def load_own_variables(layer, store, added_names):
    """`layer.load_own_variables(store)` that accepts files without `added_names`.

    A file may lack the last few of `added_names` (it was written between two
    additions) or all of them; the variables it holds must match in number
    and shape, so a file of another layer is still refused with Keras' own
    message.
    """
    variables = layer._trainable_variables + layer._non_trainable_variables
    count = len(store.keys())
    if count != len(variables):
        names = [n for n in added_names if any(v.name == n for v in variables)]
        for first_missing in range(len(names) - 1, -1, -1):
            missing = set(names[first_missing:])
            older = [v for v in variables if v.name not in missing]
            if count == len(older) and all(
                tuple(store[f"{i}"].shape) == tuple(v.shape) for i, v in enumerate(older)
            ):
                variables = older
                break
        else:
            layer._check_load_own_variables(store)  # raises Keras' own message
    for i, variable in enumerate(variables):
        variable.assign(store[f"{i}"])
