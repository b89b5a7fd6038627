# Small image: a static (musl) binary on an empty base, run as a non-root user (uid 10001).
# Configuration is read from /etc/turnstile (mount your own over it); the ledger lives in
# /var/lib/turnstile/ledger (mount a volume there).
FROM docker.io/library/rust:1-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY benches ./benches
RUN CARGO_PROFILE_RELEASE_STRIP=true cargo build --release --locked --bin turnstile
# Inside a container: listen on the container network, keep the ledger on the volume.
RUN sed -i -e 's/^listen = "127.0.0.1:8080"/listen = "0.0.0.0:8080"/' \
           -e 's/^admin_listen = "127.0.0.1:9090"/admin_listen = "0.0.0.0:9090"/' \
           -e 's|^dir = "data/ledger"|dir = "/var/lib/turnstile/ledger"|' config/turnstile.toml \
 && mkdir -p /out/var/lib/turnstile

FROM scratch
COPY --from=build /src/target/release/turnstile /usr/local/bin/turnstile
COPY --from=build /src/config/ /etc/turnstile/
COPY --from=build --chown=10001:10001 /out/var/lib/turnstile /var/lib/turnstile
USER 10001:10001
WORKDIR /var/lib/turnstile
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/turnstile"]
CMD ["serve", "--config", "/etc/turnstile/turnstile.toml"]
