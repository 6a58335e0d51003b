FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
# CPU torch from the PyTorch CPU index keeps the image small; GPU students live elsewhere.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -e '.[student]'
ENV HF_HUB_OFFLINE=1
EXPOSE 8000
CMD ["distill", "serve", "--host", "0.0.0.0"]
