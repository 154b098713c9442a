"""Integrations of keras_moe with other Keras libraries.

Each integration is a subpackage imported on its own (it imports the library
it integrates), e.g. `import keras_moe.integrations.keras_hub`.
"""
