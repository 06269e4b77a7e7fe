"""`lmos serve`: an HTTP JSON server over a workdir, with dynamic batching."""
