# One image for now (worker, dashboard, migrate); issue 6 splits a light dashboard image off.
FROM python:3.11-slim
WORKDIR /app
# CPU torch by default; the pinned version keeps pip from pulling CUDA packages.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY services services
COPY worker worker
COPY dashboard dashboard
COPY migrations migrations
RUN pip install --no-cache-dir --extra-index-url ${TORCH_INDEX_URL} .
COPY alembic.ini ./
RUN useradd --create-home fitscope
USER fitscope
