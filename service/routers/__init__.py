"""One APIRouter per resource, all mounted under ``/v1`` by :func:`service.app.create_app`."""
