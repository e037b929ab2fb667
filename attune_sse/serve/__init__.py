"""Running it: gunicorn's settings and hooks, the launcher, the command line, the demo."""
