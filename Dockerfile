# modeltailor: the API, job workers and Ray nodes all run this one image.
# torch is installed first, alone, from the CPU wheel index, so that installing the
# project afterwards finds torch==2.13.0 satisfied and never pulls a CUDA build.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    MODELTAILOR_DATA_DIR=/data \
    RAY_USAGE_STATS_ENABLED=0

RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY . .
# ray[default] (same version as pyproject pins) adds the Ray dashboard to the image.
RUN pip install . "ray[default]==2.60.0" \
    && python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

RUN useradd --create-home --uid 1000 modeltailor && mkdir -p /data && chown modeltailor /data
USER modeltailor
VOLUME ["/data"]
EXPOSE 8000
CMD ["modeltailor", "serve", "--host", "0.0.0.0", "--port", "8000"]
