# The builder container for the `docker` stage mode: Debian trixie with mkosi, the kernel
# toolchain, Go and the ISO tools. Its tag is this file's content hash (captainos/docker.py).
FROM debian:trixie

ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      mkosi python3 apt dpkg gpgv debian-archive-keyring systemd-container bubblewrap zstd cpio \
      make gcc flex bison bc perl kmod xz-utils libelf-dev libssl-dev \
      gcc-aarch64-linux-gnu libc6-dev-arm64-cross pkg-config libseccomp-dev golang-go \
      xorriso mtools grub-common grub-efi-amd64-bin grub-efi-arm64-bin \
      ca-certificates curl file git \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
