# Two images from one file (docker-compose.yml builds both):
#   --target dashboard  the dashboard and `fitscope db upgrade`: fitscope without torch
#   --target worker     adds torch: CPU wheels by default; for CUDA,
#                       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim AS deps
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FITSCOPE_HOME=/home/fitscope/.fitscope
WORKDIR /app
COPY pyproject.toml ./
# Every dependency but torch, read from pyproject.toml so the two never disagree.
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if not d.startswith('torch')))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && useradd --create-home --uid 10001 fitscope

FROM deps AS dashboard
COPY README.md alembic.ini ./
COPY services services
COPY worker worker
COPY dashboard dashboard
COPY migrations migrations
COPY examples examples
# Editable, so the code runs from /app and finds examples/ and migrations/ beside it.
RUN pip install --no-deps -e .
USER fitscope
EXPOSE 8501
CMD ["fitscope", "dashboard"]

FROM deps AS worker
# Before the code, so a code change does not download torch again. The pinned version comes from
# pyproject.toml; the index decides CPU or CUDA wheels. Only that index: with
# PyPI beside it pip could pick PyPI's torch, which brings the CUDA libraries (gigabytes) along.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" \
    "$(python -c "import tomllib; print(next(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if d.startswith('torch')))")"
COPY README.md alembic.ini ./
COPY services services
COPY worker worker
COPY dashboard dashboard
COPY migrations migrations
COPY examples examples
# Editable, so the code runs from /app and finds examples/ and migrations/ beside it.
RUN pip install --no-deps -e .
USER fitscope
CMD ["fitscope", "worker", "--queues", "cpu"]
