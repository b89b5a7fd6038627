# Multi-stage build: compile in the Rust image, run from a slim Debian image as a non-root user.
# Configuration is read from /etc/turnstile (mount your own over it); the ledger lives in /var/lib/turnstile.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY benches ./benches
RUN cargo build --release --locked --bin turnstile && strip target/release/turnstile
# In a container the listeners must face the container network, not its loopback.
RUN sed -i 's/^listen = "127.0.0.1:8080"/listen = "0.0.0.0:8080"/; s/^admin_listen = "127.0.0.1:9090"/admin_listen = "0.0.0.0:9090"/' config/turnstile.toml

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/turnstile --create-home turnstile
COPY --from=build /src/target/release/turnstile /usr/local/bin/turnstile
COPY --from=build /src/config/ /etc/turnstile/
USER turnstile
WORKDIR /var/lib/turnstile
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/turnstile"]
CMD ["serve", "--config", "/etc/turnstile/turnstile.toml"]
