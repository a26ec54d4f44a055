"""File layouts of parameters: tensor names, shapes and transposes, and the files that hold them.

Each module converts one layout to and from a model family's pure parameter dict; none imports loading,
checkpointing or the training loop.
"""
