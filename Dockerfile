# The builder container for the `docker` stage mode: Debian trixie with mkosi, the kernel
# toolchain, Go and the ISO tools. Its tag is this file's content hash (captainos/core/docker.py).
FROM debian:trixie

ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      mkosi python3 apt dpkg gpgv debian-archive-keyring systemd-container bubblewrap zstd cpio \
      make gcc flex bison bc perl kmod xz-utils libelf-dev libssl-dev \
      gcc-aarch64-linux-gnu libc6-dev-arm64-cross pkg-config golang-go qemu-user-static \
      xorriso mtools grub-common grub-efi-amd64-bin \
      ca-certificates curl file git skopeo \
 && rm -rf /var/lib/apt/lists/*

# The pinned stack and tink-agent need a newer Go than trixie ships: take the Go toolchain
# that the Go module proxy serves as a module, at the same path as on a CI host.
ARG GO_VERSION=1.26.8
RUN arch="$(dpkg --print-architecture)" \
 && GOMODCACHE=/tmp/gomod GOFLAGS=-modcacherw go mod download "golang.org/toolchain@v0.0.1-go${GO_VERSION}.linux-${arch}" \
 && cp -a "/tmp/gomod/golang.org/toolchain@v0.0.1-go${GO_VERSION}.linux-${arch}" /usr/local/go \
 && chmod +x /usr/local/go/bin/* /usr/local/go/pkg/tool/*/* \
 && rm -rf /tmp/gomod && apt-get purge -y golang-go && apt-get autoremove -y
ENV PATH=/usr/local/go/bin:$PATH

WORKDIR /src
