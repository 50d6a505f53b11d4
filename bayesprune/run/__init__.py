"""The command line and its jobs over run directories: fit, extract, depth, draft, router, route, evaluate."""
