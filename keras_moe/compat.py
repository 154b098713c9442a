"""Loading `.keras` files written by earlier versions of keras_moe.

Layers gain state over time (loss-weight variables, routing statistics).
Keras loads a layer's own variables by position and refuses a file with
fewer of them than the layer has. A layer lists the names of the variables
it added after the first release (always created after the older ones), and
`load_own_variables` here fills the older variables from such a file and
leaves the added ones at their initial values.
"""


def load_own_variables(layer, store, added_names):
    """`layer.load_own_variables(store)` that accepts files without `added_names`."""
    variables = layer._trainable_variables + layer._non_trainable_variables
    count = len(store.keys())
    if count != len(variables):
        older = [v for v in variables if v.name not in set(added_names)]
        if count == len(older):
            variables = older
        else:
            layer._check_load_own_variables(store)  # raises Keras' own message
    for i, variable in enumerate(variables):
        variable.assign(store[f"{i}"])
