# StationThis core: one image for all four processes (points, workflows, comfyui, gateway).
# docker-compose.yml picks the process with `command: ["python", "-m", "<module>"]`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so code changes do not reinstall them.
COPY requirements.txt constraints.txt ./
RUN pip install -r requirements.txt -c constraints.txt

# Generated protobuf code: the same protoc call as `make protos` (google/api/*.proto come from
# googleapis-common-protos in site-packages).
COPY protos ./protos
RUN mkdir -p gen \
    && python -m grpc_tools.protoc -Iprotos \
        -I"$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
        --python_out=gen --pyi_out=gen --grpc_python_out=gen \
        --descriptor_set_out=gen/descriptors.binpb --include_source_info --include_imports \
        $(find protos -name '*.proto')

COPY common ./common
COPY comfydeploy ./comfydeploy
COPY services ./services
COPY gateway ./gateway

ENV PYTHONPATH=/app:/app/gen

RUN useradd --system --uid 10001 --no-create-home stationthis
USER stationthis

# No default process: compose (or `docker run IMAGE python -m <module>`) chooses one.
CMD ["python", "-c", "raise SystemExit('choose a process: python -m services.points | services.workflows | services.comfyui | gateway')"]
