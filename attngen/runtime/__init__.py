"""Runtime: disk cache, kernel loading, launch configuration, autograd."""
