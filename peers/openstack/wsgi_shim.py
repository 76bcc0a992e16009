"""Serve an OpenStack WSGI module under gunicorn: `GB_WSGI_MODULE=keystone.wsgi.api`.

Keystone's, Placement's and Nova's WSGI modules hand the process's command line to oslo.config,
which rejects gunicorn's own arguments; clearing argv before the import lets them read only their
config files (found through OS_*_CONFIG_DIR in the environment).
"""

import importlib
import os
import sys

sys.argv = sys.argv[:1]
application = importlib.import_module(os.environ["GB_WSGI_MODULE"]).application
