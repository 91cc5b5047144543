"""gx: the top layer. The `gx` command line and the recipe pipeline, the only code that imports
both `gemini_core` (the library) and `sweeps` (mixture search built on it)."""
