"""wrapcal's built-in plugins, found through the ``wrapcal`` entry-point group."""
