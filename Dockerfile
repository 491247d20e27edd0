# syncnode in a container: one node, its data in the /data volume, run as a non-root user.
#   docker build -t syncnode .
#   docker run -d --name syncnode -v syncnode-data:/data -p 8443:8443 -p 11112:11112 syncnode
#   docker exec syncnode syncnode id          # the node id to give to peers
# The admin API stays on the container's loopback (the health check uses it); publish it
# only with SYNCNODE_API_HOST=0.0.0.0 and SYNCNODE_API_KEY set.
FROM debian:bookworm-slim

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 syncnode \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --shell /usr/sbin/nologin \
       syncnode \
    && install -d -o syncnode -g syncnode -m 0700 /data

COPY pyproject.toml README.md /src/
COPY syncnode /src/syncnode
RUN python3 -m venv /opt/syncnode \
    && /opt/syncnode/bin/pip install --no-cache-dir /src \
    && rm -rf /src

COPY --chmod=0755 packaging/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh

ENV PATH=/opt/syncnode/bin:$PATH \
    SYNCNODE_DATA=/data \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
USER 10001:10001
WORKDIR /data
EXPOSE 8443 11112
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["docker-entrypoint.sh", "healthcheck"]
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["run"]
