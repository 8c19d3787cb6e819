# ssegate in a small runtime image, as a non-root user.
#   docker build -t ssegate .
#   docker run -p 8080:8080 -e SSEGATE_REDIS_URL=redis://redis:6379/0 ssegate
# Serving HTTPS and HTTP/2 itself, from a mounted certificate directory (replaced files are
# picked up; open streams go on):
#   docker run -p 443:8080 -v /etc/ssegate/tls:/etc/ssegate-tls:ro \
#     -e SSEGATE_TLS__CERT=/etc/ssegate-tls/tls.crt -e SSEGATE_TLS__KEY=/etc/ssegate-tls/tls.key ssegate
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin ssegate

FROM debian:bookworm-slim
# ca-certificates: JWKS over https (rustls' bundled roots cover the public CAs; a private CA
# comes from here); curl: the health check.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home ssegate
COPY --from=build /src/target/release/ssegate /usr/local/bin/ssegate
USER 10001:10001
# Listen on every interface inside the container; ssegate warns at start if no auth key is set.
ENV SSEGATE_LISTEN=0.0.0.0:8080
EXPOSE 8080
# With TLS on, the listener speaks HTTPS only; the check then goes over it (the certificate
# names the public host, not 127.0.0.1, hence -k).
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || curl -kfsS https://127.0.0.1:8080/healthz || exit 1
# SIGTERM drains: open streams get a spread-out retry and end; exit within shutdown_timeout.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/ssegate"]
