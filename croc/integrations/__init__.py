"""Optional integrations with other libraries.

Nothing is imported here, so ``import croc.integrations`` never needs the integrated library;
import a submodule (e.g. :mod:`croc.integrations.transformers`) to use it.
"""
