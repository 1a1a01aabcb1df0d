# dicom-node on a CUDA PyTorch base (GPU inference; falls back to CPU without a GPU).
# Build: docker build -t dicom-node .   Run: docker run --gpus all -p 11112:11112 \
#   -v /srv/dicom-node:/data -v /srv/dicom-node/config.yaml:/app/config.yaml dicom-node
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OMP_WAIT_POLICY=PASSIVE

WORKDIR /app
COPY pyproject.toml README.md config.yaml constraints.txt ./
COPY dicom_node ./dicom_node
COPY inference ./inference
COPY storage ./storage

COPY scripts/docker_constraints.py ./scripts/

# The tested versions (constraints.txt) of every package the base image lacks; its own
# packages (torch and what torch pins) stay, and torch is pinned so that nnunetv2's
# dependencies cannot replace it.
RUN python scripts/docker_constraints.py constraints.txt /tmp/constraints.txt \
    && pip install --no-cache-dir -c /tmp/constraints.txt ".[postgres]"

RUN sed -i 's|^  data_dir: var |  data_dir: /data|' /app/config.yaml \
    && grep -q 'data_dir: /data' /app/config.yaml

# Patient data: the service's user only (the node also runs with umask 027 at least).
RUN useradd --system --uid 1000 --home /data dicomnode && mkdir -p /data \
    && chown dicomnode /data && chmod 0750 /data
USER 1000
VOLUME ["/data"]
EXPOSE 11112 2762

ENV DICOM_NODE_CONFIG=/app/config.yaml
HEALTHCHECK --interval=60s --timeout=20s CMD ["dicom-node", "status", "--check", "--json"]
ENTRYPOINT ["dicom-node"]
CMD ["serve"]
