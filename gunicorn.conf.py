"""gunicorn settings for attune-sse, the production entry: ``gunicorn -c gunicorn.conf.py``.

The settings live in the package (``attune_sse/gunicorn_conf.py``), so an
installed wheel serves the same way without this file:
``gunicorn -c python:attune_sse.serve.gunicorn_conf``. The attune-sse config file comes
from ATTUNE_CONFIG; ATTUNE__SECTION__KEY variables override its keys.
"""

from attune_sse.serve.gunicorn_conf import *  # noqa: F403  (every setting and hook of the packaged file)
