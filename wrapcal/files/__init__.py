"""The ``.wrapcal`` file: its format, loading it back, and the model families it may rebuild.

``format`` writes and reads the container (safetensors with a JSON configuration and a
digest); ``load`` rebuilds a wrapped model from it, trusting nothing in the file;
``families`` is the allow-list of architectures (with allow-listed arguments) a file can
name; ``cifar_resnets`` holds the small reference ResNets that list includes.
"""
