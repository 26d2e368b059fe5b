"""The application layer: command implementations, launch, logging and signal handling.

Everything here may read the environment, install signal handlers and print; the library
modules beside it (config, data, model, parallel, training) do none of that.
"""
