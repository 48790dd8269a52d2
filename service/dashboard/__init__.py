"""The web dashboard: a dependency-free single-page app served by the API at ``/``."""
